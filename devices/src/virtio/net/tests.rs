#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use vm_memory::GuestAddress;

use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::mock::{MockDriver, Seg};
use crate::{BusDevice, IrqTrigger};

const RX: usize = 0;
const TX: usize = 1;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const MRG: u64 = 1 << features::MRG_RXBUF;

struct Harness {
    el: EventLoop,
    transport: Arc<Mutex<MmioTransport>>,
    drv: MockDriver,
    stats: Arc<NetStats>,
    shared: Arc<Mutex<Worker>>,
    irqs: Arc<AtomicUsize>,
}

impl Harness {
    fn new(backend: Box<dyn NetBackend>, features: u64) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut el = EventLoop::new().unwrap();
        let net = Net::new(NetConfig::new(MAC), backend, &mut el).unwrap();
        let stats = net.stats();
        let shared = net.shared.clone();
        let irqs = Arc::new(AtomicUsize::new(0));
        let i2 = irqs.clone();
        let irq = IrqTrigger::new(move || {
            i2.fetch_add(1, Ordering::Relaxed);
        });
        let t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
        let transport = Arc::new(Mutex::new(t));
        let drv = MockDriver::probe_with_features(
            &mut *transport.lock().unwrap(),
            mem,
            2,
            QUEUE_SIZE,
            features,
        )
        .unwrap();
        assert!(transport.lock().unwrap().is_activated());
        Harness {
            el,
            transport,
            drv,
            stats,
            shared,
            irqs,
        }
    }

    fn stream() -> (Harness, UnixStream) {
        Self::stream_with(0)
    }

    fn stream_with(features: u64) -> (Harness, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let backend = StreamBackend::new(OwnedFd::from(a)).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (Harness::new(Box::new(backend), features), b)
    }

    fn notify(&self, q: u32) {
        self.transport.lock().unwrap().write(0x50, &q.to_le_bytes());
    }

    fn counters(&self) -> NetCounters {
        self.stats.snapshot()
    }

    fn pump(&mut self, n: usize) {
        for _ in 0..n {
            self.el.run_once(Some(Duration::from_millis(2))).unwrap();
        }
    }

    /// Guest transmits header + `frame`, split at `cuts`.
    fn transmit(&mut self, frame: &[u8], cuts: &[usize]) {
        let mut b = vec![0u8; VNET_HDR_LEN];
        b.extend_from_slice(frame);
        self.drv.add_readable(TX, &b, cuts).unwrap();
        self.notify(TX as u32);
    }

    fn post_rx(&mut self, n: usize, lens: &[u32]) {
        for _ in 0..n {
            self.drv.add_writable(RX, lens).unwrap();
        }
        self.notify(RX as u32);
    }

    /// Pumps until `n` rx used entries arrived (or panics).
    fn rx_used(&mut self, n: usize) -> Vec<(u16, u32, Vec<u8>)> {
        let mut got = Vec::new();
        for _ in 0..500 {
            got.extend(self.drv.take_used(RX).unwrap());
            if got.len() >= n {
                return got;
            }
            self.pump(1);
        }
        panic!("expected {n} rx buffers, got {}", got.len());
    }

    fn read_features(&self) -> u64 {
        let mut t = self.transport.lock().unwrap();
        let mut f = 0u64;
        for sel in [1u32, 0] {
            t.write(0x14, &sel.to_le_bytes());
            let mut b = [0u8; 4];
            t.read(0x10, &mut b);
            f |= u64::from(u32::from_le_bytes(b)) << (32 * sel);
        }
        f
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_prefixed(s: &mut UnixStream) -> Vec<u8> {
    let mut p = [0u8; 4];
    s.read_exact(&mut p).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(p) as usize];
    s.read_exact(&mut f).unwrap();
    f
}

fn write_prefixed(s: &mut UnixStream, f: &[u8]) {
    s.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
    s.write_all(f).unwrap();
}

/// Header fields of an rx buffer: (flags, gso_type, num_buffers).
fn hdr_of(data: &[u8]) -> (u8, u8, u16) {
    (data[0], data[1], u16::from_le_bytes([data[10], data[11]]))
}

#[test]
fn config_space_and_features() {
    let (h, _peer) = Harness::stream();
    let mut cfg = [0u8; 12];
    h.transport.lock().unwrap().read(0x100, &mut cfg[..8]);
    h.transport.lock().unwrap().read(0x108, &mut cfg[8..]);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), STATUS_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), DEFAULT_MTU);
    let f = h.read_features();
    assert_eq!(f, BASE_FEATURES, "no offloads without a virtio-net header");
    let mut dev = [0u8; 4];
    h.transport.lock().unwrap().read(0x8, &mut dev);
    assert_eq!(u32::from_le_bytes(dev), NET_DEVICE_TYPE);
}

#[test]
fn bad_configs_are_refused() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut el = EventLoop::new().unwrap();
    let be = || Box::new(StreamBackend::new(OwnedFd::from(a.try_clone().unwrap())).unwrap());
    let mut c = NetConfig::new(MAC);
    c.mtu = 10;
    assert!(matches!(
        Net::new(c, be(), &mut el),
        Err(Error::InvalidMtu(10))
    ));
    let c = NetConfig::new([1, 0, 0, 0, 0, 1]);
    assert!(matches!(
        Net::new(c, be(), &mut el),
        Err(Error::InvalidMac(_))
    ));
}

#[test]
fn tx_frames_arrive_length_prefixed_byte_exact() {
    let (mut h, mut peer) = Harness::stream();
    let irq0 = h.irqs.load(Ordering::Relaxed);
    let frames = [
        frame(60, 1),
        frame(1514, 2),
        frame(9000, 3),
        frame(MAX_FRAME_LEN, 4),
    ];
    let layouts: [&[usize]; 4] = [&[], &[VNET_HDR_LEN], &[5, 700, 30], &[VNET_HDR_LEN, 4096]];
    for (f, cuts) in frames.iter().zip(layouts) {
        h.transmit(f, cuts);
    }
    let reader = std::thread::spawn(move || (0..4).map(|_| read_prefixed(&mut peer)).collect());
    let mut used = 0;
    for _ in 0..200 {
        h.pump(1);
        used += h.drv.take_used(TX).unwrap().len();
        if used == 4 {
            break;
        }
    }
    let got: Vec<Vec<u8>> = reader.join().unwrap();
    assert_eq!(got, frames.to_vec());
    assert_eq!(used, 4);
    assert!(h.irqs.load(Ordering::Relaxed) > irq0, "tx used interrupt");
    let c = h.counters();
    assert_eq!(c.tx_frames, 4);
    assert_eq!(
        c.tx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(c.tx_malformed(), 0);
}

#[test]
fn tx_partial_writes_resume_in_order_when_the_peer_is_slow() {
    let (mut h, mut peer) = Harness::stream();
    // More than the socket buffers hold: the device meets partial writes and EAGAIN.
    let frames: Vec<Vec<u8>> = (0..60).map(|i| frame(60_000 + i, i as u8)).collect();
    for f in &frames {
        h.transmit(f, &[VNET_HDR_LEN]);
    }
    h.pump(3);
    assert!(h.counters().tx_frames < 60, "the socket cannot hold it all");
    let reader = std::thread::spawn(move || {
        (0..60)
            .map(|_| read_prefixed(&mut peer))
            .collect::<Vec<_>>()
    });
    for _ in 0..2000 {
        h.pump(1);
        if h.counters().tx_frames == 60 {
            break;
        }
    }
    // The last frame may still sit in the backend's tail buffer: keep pumping for writability.
    let mut got = None;
    for _ in 0..500 {
        if reader.is_finished() {
            got = Some(reader.join().unwrap());
            break;
        }
        h.pump(1);
    }
    assert_eq!(got.expect("reader finished"), frames);
    assert_eq!(h.counters().tx_dropped, 0);
}

#[test]
fn rx_frame_arrives_with_header_single_buffer() {
    let (mut h, mut peer) = Harness::stream();
    h.post_rx(4, &[2048]);
    let f = frame(1514, 9);
    write_prefixed(&mut peer, &f);
    let used = h.rx_used(1);
    let (_, len, data) = &used[0];
    assert_eq!(*len as usize, VNET_HDR_LEN + f.len());
    assert_eq!(hdr_of(data), (0, 0, 1));
    assert_eq!(&data[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&data[VNET_HDR_LEN..], &f[..]);
    assert_eq!(h.counters().rx_frames, 1);
    assert_eq!(h.counters().rx_bytes, 1514);
}

#[test]
fn rx_mergeable_frame_spans_several_buffers() {
    let (mut h, mut peer) = Harness::stream_with(MRG);
    assert_ne!(h.read_features() & MRG, 0);
    // Buffers of 1000 bytes (two descriptors each: 400 + 600).
    h.post_rx(16, &[400, 600]);
    let f = frame(3500, 5);
    write_prefixed(&mut peer, &f);
    let used = h.rx_used(4);
    assert_eq!(used.len(), 4, "12 + 3500 bytes in 1000-byte buffers");
    assert_eq!(hdr_of(&used[0].2).2, 4, "num_buffers");
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(lens, vec![1000, 1000, 1000, 512]);
    let mut all: Vec<u8> = Vec::new();
    for u in &used {
        all.extend_from_slice(&u.2);
    }
    assert_eq!(&all[VNET_HDR_LEN..], &f[..]);
    // A small frame next uses one buffer.
    let g = frame(100, 6);
    write_prefixed(&mut peer, &g);
    let used = h.rx_used(1);
    assert_eq!(hdr_of(&used[0].2).2, 1);
    assert_eq!(&used[0].2[VNET_HDR_LEN..], &g[..]);
    assert_eq!(h.counters().rx_frames, 2);
}

#[test]
fn rx_mergeable_waits_for_enough_buffers() {
    let (mut h, mut peer) = Harness::stream_with(MRG);
    h.post_rx(2, &[1000]);
    let f = frame(5000, 7);
    write_prefixed(&mut peer, &f);
    h.pump(20);
    assert!(
        h.drv.take_used(RX).unwrap().is_empty(),
        "not enough room yet"
    );
    h.post_rx(4, &[1000]);
    let used = h.rx_used(6);
    assert_eq!(hdr_of(&used[0].2).2, 6);
    let all: Vec<u8> = used.iter().flat_map(|u| u.2.clone()).collect();
    assert_eq!(&all[VNET_HDR_LEN..], &f[..]);
}

#[test]
fn rx_frame_too_big_for_a_buffer_is_dropped_without_mergeable() {
    let (mut h, mut peer) = Harness::stream();
    h.post_rx(2, &[1526]);
    write_prefixed(&mut peer, &frame(4000, 1));
    let small = frame(200, 2);
    write_prefixed(&mut peer, &small);
    let used = h.rx_used(1);
    assert_eq!(&used[0].2[VNET_HDR_LEN..], &small[..]);
    let c = h.counters();
    assert_eq!((c.rx_dropped, c.rx_frames), (1, 1));
}

#[test]
fn stream_oversized_and_empty_frames_are_skipped() {
    let (mut h, mut peer) = Harness::stream();
    h.post_rx(4, &[2048]);
    // A length above the limit, its bytes, an empty frame, then a good frame.
    let big = MAX_FRAME_LEN + 100;
    peer.write_all(&(big as u32).to_be_bytes()).unwrap();
    let mut w = peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&vec![0xee; big]).unwrap();
        w.write_all(&0u32.to_be_bytes()).unwrap();
        write_prefixed(&mut w, &frame(64, 3));
    });
    let used = h.rx_used(1);
    writer.join().unwrap();
    assert_eq!(&used[0].2[VNET_HDR_LEN..], &frame(64, 3)[..]);
    assert_eq!(h.counters().rx_dropped, 2);
}

/// Writes descriptor `idx` of queue `q` directly (for shapes the mock cannot build).
fn write_desc(h: &Harness, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = h.drv.queues[q].desc + 16 * u64::from(idx);
    let mem = &h.drv.mem;
    mem.write_obj(addr, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
    mem.write_obj(next, GuestAddress(d + 14)).unwrap();
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let (mut h, mut peer) = Harness::stream();
    let buf = h.drv.alloc(70_000);
    // Zero length, and a header with no frame.
    h.drv
        .add_chain(
            TX,
            &[Seg {
                addr: buf,
                len: 0,
                write: false,
            }],
        )
        .unwrap();
    h.drv
        .add_chain(
            TX,
            &[Seg {
                addr: buf,
                len: 12,
                write: false,
            }],
        )
        .unwrap();
    // Over the limit by one byte, in three descriptors.
    let third = (MAX_TX_CHAIN as u32 + 1) / 3 + 1;
    h.drv
        .add_chain(
            TX,
            &[Seg {
                addr: buf,
                len: third,
                write: false,
            }; 3],
        )
        .unwrap();
    // A write-only buffer on tx.
    h.drv
        .add_chain(
            TX,
            &[
                Seg {
                    addr: buf,
                    len: 12,
                    write: false,
                },
                Seg {
                    addr: buf + 12,
                    len: 100,
                    write: true,
                },
            ],
        )
        .unwrap();
    // Outside guest memory.
    h.drv
        .add_chain(
            TX,
            &[
                Seg {
                    addr: buf,
                    len: 12,
                    write: false,
                },
                Seg {
                    addr: 1 << 40,
                    len: 100,
                    write: false,
                },
            ],
        )
        .unwrap();
    // A descriptor loop: three descriptors, the last pointing back at the first.
    let head = h
        .drv
        .add_chain(
            TX,
            &[Seg {
                addr: buf,
                len: 20,
                write: false,
            }; 3],
        )
        .unwrap();
    write_desc(
        &h,
        TX,
        head + 2,
        buf,
        20,
        crate::virtio::mock::DESC_F_NEXT,
        head,
    );
    h.notify(TX as u32);
    h.pump(5);
    let c = h.counters();
    assert_eq!(c.tx_empty, 2, "{c:?}");
    assert_eq!(c.tx_too_big, 1, "{c:?}");
    assert_eq!(c.tx_write_only, 1, "{c:?}");
    assert_eq!(c.tx_bad_chain, 2, "{c:?}");
    assert_eq!(c.tx_frames, 0);
    assert_eq!(
        h.drv.take_used(TX).unwrap().len(),
        6,
        "every chain is given back"
    );
    // Still working.
    let f = frame(100, 8);
    h.transmit(&f, &[]);
    h.pump(3);
    assert_eq!(read_prefixed(&mut peer), f);
    assert_eq!(h.counters().tx_frames, 1);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_counted() {
    let (mut h, mut peer) = Harness::stream_with(MRG);
    let buf = h.drv.alloc(4096);
    // Too short for the header.
    h.drv.add_writable(RX, &[8]).unwrap();
    // A device-readable descriptor.
    h.drv
        .add_chain(
            RX,
            &[Seg {
                addr: buf,
                len: 2048,
                write: false,
            }],
        )
        .unwrap();
    // A loop.
    let head = h
        .drv
        .add_chain(
            RX,
            &[Seg {
                addr: buf,
                len: 64,
                write: true,
            }; 2],
        )
        .unwrap();
    write_desc(
        &h,
        RX,
        head + 1,
        buf,
        64,
        crate::virtio::mock::DESC_F_NEXT | crate::virtio::mock::DESC_F_WRITE,
        head,
    );
    // Outside guest memory.
    h.drv
        .add_chain(
            RX,
            &[Seg {
                addr: 1 << 40,
                len: 2048,
                write: true,
            }],
        )
        .unwrap();
    h.post_rx(1, &[2048]);
    let f = frame(1000, 4);
    write_prefixed(&mut peer, &f);
    let used = h.rx_used(5);
    assert_eq!(used.len(), 5);
    assert!(used[..4].iter().all(|u| u.1 == 0), "{used:?}");
    assert_eq!(used[4].1 as usize, VNET_HDR_LEN + f.len());
    assert_eq!(&used[4].2[VNET_HDR_LEN..], &f[..]);
    let c = h.counters();
    assert_eq!((c.rx_bad_buffers, c.rx_frames), (4, 1));
}

#[test]
fn no_rx_buffers_means_the_backend_is_not_read() {
    let (mut h, peer) = Harness::stream();
    peer.set_nonblocking(true).unwrap();
    let mut p = &peer;
    let f = frame(1500, 1);
    let mut prefixed = (f.len() as u32).to_be_bytes().to_vec();
    prefixed.extend_from_slice(&f);
    // Fill the socket while the guest has no rx buffers: the peer must hit EAGAIN.
    let mut sent = 0usize;
    let mut leftover: Vec<u8> = Vec::new();
    for i in 0..100_000 {
        match p.write(&prefixed) {
            Ok(n) if n == prefixed.len() => sent += 1,
            Ok(n) => {
                leftover = prefixed[n..].to_vec();
                sent += 1;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        if i % 16 == 0 {
            h.pump(1);
        }
    }
    assert!(sent < 100_000, "the device kept reading with no rx buffers");
    h.pump(10);
    assert_eq!(h.counters().rx_frames, 0);
    assert_eq!(h.counters().rx_dropped, 0);
    assert!(
        lock(&h.shared).rx_pending.is_some(),
        "one frame waits in the device"
    );
    // Buffers arrive: every frame is delivered, in order.
    let mut got = 0usize;
    for _ in 0..5000 {
        if !leftover.is_empty() {
            if let Ok(n) = p.write(&leftover) {
                leftover.drain(..n);
            }
        }
        h.post_rx(32, &[2048]);
        h.pump(1);
        for (_, _, data) in h.drv.take_used(RX).unwrap() {
            assert_eq!(&data[VNET_HDR_LEN..], &f[..]);
            got += 1;
        }
        if got == sent && leftover.is_empty() {
            break;
        }
    }
    assert_eq!(got, sent);
    assert_eq!(h.counters().rx_dropped, 0);
}

#[test]
fn dgram_backend_one_frame_per_datagram() {
    let (a, peer) = UnixDatagram::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend = DgramBackend::new(OwnedFd::from(a)).unwrap();
    let mut h = Harness::new(Box::new(backend), MRG);
    assert_eq!(h.read_features(), BASE_FEATURES);
    // Tx: one datagram per frame, no header, no prefix.
    let f = frame(1514, 3);
    h.transmit(&f, &[VNET_HDR_LEN, 100]);
    h.pump(3);
    let mut buf = vec![0u8; 70_000];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    // Rx: an oversized datagram is dropped, the next arrives.
    h.post_rx(8, &[4096]);
    let _ = peer.send(&vec![1u8; MAX_FRAME_LEN + 1]);
    let g = frame(300, 4);
    peer.send(&g).unwrap();
    let used = h.rx_used(1);
    assert_eq!(&used[0].2[VNET_HDR_LEN..], &g[..]);
    assert_eq!(hdr_of(&used[0].2).2, 1);
    let c = h.counters();
    assert_eq!((c.tx_frames, c.rx_frames), (1, 1));
    assert!(c.rx_dropped <= 1, "{c:?}");
}

/// A stream backend that claims to carry the virtio-net header (like a tap): exercises the
/// header pass-through without root.
#[derive(Debug)]
struct VnetStream(StreamBackend);

impl NetBackend for VnetStream {
    fn vnet_hdr(&self) -> bool {
        true
    }
    fn fd(&self) -> RawFd {
        self.0.fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        self.0.recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<Sent> {
        self.0.send(frame)
    }
    fn flush(&mut self) -> io::Result<bool> {
        self.0.flush()
    }
}

#[test]
fn vnet_header_backends_get_offloads_and_the_header() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend = VnetStream(StreamBackend::new(OwnedFd::from(a)).unwrap());
    let mut h = Harness::new(Box::new(backend), MRG | OFFLOAD_FEATURES);
    assert_eq!(h.read_features(), BASE_FEATURES | OFFLOAD_FEATURES);
    // Tx: the guest's header goes to the backend as is.
    let mut b = vec![1u8, 4, 54, 0, 0xb4, 5, 34, 0, 16, 0, 0, 0];
    let f = frame(3000, 1);
    b.extend_from_slice(&f);
    h.drv.add_readable(TX, &b, &[VNET_HDR_LEN]).unwrap();
    h.notify(TX as u32);
    h.pump(3);
    assert_eq!(read_prefixed(&mut peer), b);
    // Rx: the backend's header reaches the guest, num_buffers set by the device.
    h.post_rx(4, &[2048]);
    let mut r = vec![2u8, 1, 54, 0, 0xb4, 5, 0, 0, 0, 0, 0xff, 0xff];
    r.extend_from_slice(&frame(3000, 2));
    write_prefixed(&mut peer, &r);
    let used = h.rx_used(2);
    let all: Vec<u8> = used.iter().flat_map(|u| u.2.clone()).collect();
    assert_eq!(&all[..10], &r[..10]);
    assert_eq!(hdr_of(&all).2, 2);
    assert_eq!(&all[12..], &r[12..]);
}

#[test]
fn reset_then_reactivate_keeps_working() {
    let (mut h, mut peer) = Harness::stream();
    h.transport.lock().unwrap().write(0x70, &0u32.to_le_bytes());
    h.pump(2);
    let mem = h.drv.mem.clone();
    h.drv = MockDriver::probe(&mut *h.transport.lock().unwrap(), mem, 2, QUEUE_SIZE).unwrap();
    let f = frame(80, 1);
    h.transmit(&f, &[]);
    h.pump(3);
    assert_eq!(read_prefixed(&mut peer), f);
}

#[test]
fn peer_hangup_drops_tx_and_never_spins() {
    let (mut h, peer) = Harness::stream();
    drop(peer);
    h.post_rx(2, &[2048]);
    for i in 0..5 {
        h.transmit(&frame(100, i), &[]);
    }
    h.pump(5);
    assert_eq!(h.drv.take_used(TX).unwrap().len(), 5);
    let c = h.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (0, 5));
}

fn run(cmd: &str, args: &[&str]) {
    let st = std::process::Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

/// A tap device created in a network namespace of its own (the machine's namespace is never
/// touched): the guest's ARP request reaches the kernel, whose reply reaches the guest.
#[cfg(target_os = "linux")]
#[test]
fn tap_in_a_private_netns_answers_arp() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED tap_in_a_private_netns_answers_arp: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(|| {
        // Only this thread (and what it spawns) moves into the new namespace.
        sys::unshare_thread_netns().unwrap();
        let mut tap = TapBackend::open("sktap0").unwrap();
        let all = tun_offloads(OFFLOAD_FEATURES);
        assert_eq!(all, 0x17, "CSUM | TSO4 | TSO6 | UFO");
        tap.set_offloads(all).unwrap();
        tap.set_offloads(0).unwrap();
        run("ip", &["link", "set", "sktap0", "up"]);
        run("ip", &["addr", "add", "10.99.0.1/24", "dev", "sktap0"]);
        let mut h = Harness::new(Box::new(tap), MRG | OFFLOAD_FEATURES);
        assert_eq!(h.read_features(), BASE_FEATURES | OFFLOAD_FEATURES);
        h.post_rx(32, &[4096]);
        // ARP who-has 10.99.0.1 tell 10.99.0.2 from MAC.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[10, 99, 0, 2, 0, 0, 0, 0, 0, 0, 10, 99, 0, 1]);
        arp.resize(60, 0);
        h.transmit(&arp, &[]);
        let mut reply = None;
        for _ in 0..500 {
            h.pump(1);
            for (_, _, data) in h.drv.take_used(RX).unwrap() {
                let f = &data[VNET_HDR_LEN..];
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                    reply = Some(data.clone());
                }
            }
            if reply.is_some() {
                break;
            }
            h.post_rx(1, &[4096]);
        }
        let data = reply.expect("ARP reply from the tap's kernel side");
        assert_eq!(hdr_of(&data).2, 1, "num_buffers");
        let f = &data[VNET_HDR_LEN..];
        assert_eq!(&f[..6], &MAC, "to us");
        assert_eq!(&f[28..32], &[10, 99, 0, 1], "sender IP");
        assert_eq!(&f[32..38], &MAC, "target MAC");
        assert_eq!(&f[38..42], &[10, 99, 0, 2], "target IP");
        let c = h.counters();
        assert_eq!(c.tx_frames, 1);
        assert!(c.rx_frames >= 1);
        assert_eq!(c.tx_malformed() + c.tx_dropped, 0);
    })
    .join()
    .unwrap();
}

#[test]
fn tx_kicks_are_reenabled_when_drained_and_no_interrupt_is_honoured() {
    let (mut h, mut peer) = Harness::stream();
    let used_flags = |h: &Harness| -> u16 {
        h.drv
            .mem
            .read_obj::<u16>(GuestAddress(h.drv.queues[TX].used))
            .unwrap()
    };
    // Drained queue: the device wants kicks again (VRING_USED_F_NO_NOTIFY clear), or a guest
    // that waits for a kick to be heard would stall.
    let f = frame(100, 7);
    h.transmit(&f, &[]);
    let reader = std::thread::spawn(move || (read_prefixed(&mut peer), peer));
    let mut used = 0;
    for _ in 0..200 {
        h.pump(1);
        used += h.drv.take_used(TX).unwrap().len();
        if used == 1 {
            break;
        }
    }
    let (got, mut peer) = reader.join().unwrap();
    assert_eq!(got, f);
    assert_eq!(used, 1);
    assert_eq!(used_flags(&h) & 1, 0, "notifications left disabled");
    // The driver says VRING_AVAIL_F_NO_INTERRUPT: the frame goes out, no interrupt comes.
    h.drv
        .mem
        .write_obj::<u16>(1u16.to_le(), GuestAddress(h.drv.queues[TX].avail))
        .unwrap();
    let irq0 = h.irqs.load(Ordering::Relaxed);
    let a = frame(200, 8);
    h.transmit(&a, &[]);
    let reader = std::thread::spawn(move || read_prefixed(&mut peer));
    let mut used = 0;
    for _ in 0..200 {
        h.pump(1);
        used += h.drv.take_used(TX).unwrap().len();
        if used == 1 {
            break;
        }
    }
    assert_eq!(reader.join().unwrap(), a);
    assert_eq!(used, 1);
    assert_eq!(
        h.irqs.load(Ordering::Relaxed),
        irq0,
        "interrupt despite NO_INTERRUPT"
    );
}
