#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;

use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::mock::{MockDriver, Seg};
use crate::{BusDevice, IrqTrigger};

const GUEST_CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;

struct Harness {
    el: EventLoop,
    transport: Arc<Mutex<MmioTransport>>,
    drv: MockDriver,
    dir: PathBuf,
    uds: PathBuf,
    irqs: Arc<AtomicUsize>,
    shared: Arc<Mutex<Backend>>,
    got: Vec<(Header, Vec<u8>)>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "skv-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gh(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: packet::TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = temp_dir();
        let uds = dir.join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut el = EventLoop::new().unwrap();
        let vsock = Vsock::new(GUEST_CID, &uds, &mut el).unwrap();
        let shared = vsock.shared.clone();
        let irqs = Arc::new(AtomicUsize::new(0));
        let i2 = irqs.clone();
        let irq = IrqTrigger::new(move || {
            i2.fetch_add(1, Ordering::Relaxed);
        });
        let t = MmioTransport::new(Box::new(vsock), mem.clone(), irq).unwrap();
        let transport = Arc::new(Mutex::new(t));
        let drv = MockDriver::probe(&mut *transport.lock().unwrap(), mem, 3, 256).unwrap();
        assert!(transport.lock().unwrap().is_activated());
        let mut h = Harness {
            el,
            transport,
            drv,
            dir,
            uds,
            irqs,
            shared,
            got: Vec::new(),
        };
        h.post_rx(32, &[HDR_SIZE as u32, 4096]);
        h
    }

    fn notify(&self, q: u32) {
        self.transport.lock().unwrap().write(0x50, &q.to_le_bytes());
    }

    fn post_rx(&mut self, n: usize, lens: &[u32]) {
        for _ in 0..n {
            self.drv.add_writable(RX, lens).unwrap();
        }
        self.notify(RX as u32);
    }

    fn send(&mut self, h: Header, payload: &[u8], cuts: &[usize]) {
        let mut h = h;
        h.len = payload.len() as u32;
        let mut b = h.encode().to_vec();
        b.extend_from_slice(payload);
        self.drv.add_readable(TX, &b, cuts).unwrap();
        self.notify(TX as u32);
    }

    /// Runs the loop once and collects rx packets (re-posting their buffers).
    fn pump(&mut self) {
        self.el.run_once(Some(Duration::from_millis(5))).unwrap();
        let used = self.drv.take_used(RX).unwrap();
        let n = used.len();
        for (_, len, data) in used {
            if len as usize >= HDR_SIZE {
                let h = Header::from_slice(&data).unwrap();
                assert_eq!(
                    h.len as usize,
                    data.len() - HDR_SIZE,
                    "header len matches used len"
                );
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
                self.got.push((h, data[HDR_SIZE..].to_vec()));
            }
        }
        if n > 0 {
            self.post_rx(n, &[HDR_SIZE as u32, 4096]);
        }
        self.drv.take_used(TX).unwrap();
    }

    /// Pumps until `f` finds something in the received packets (removing it).
    fn wait_for(&mut self, mut f: impl FnMut(&Header) -> bool) -> (Header, Vec<u8>) {
        for _ in 0..400 {
            if let Some(i) = self.got.iter().position(|(h, _)| f(h)) {
                return self.got.remove(i);
            }
            self.pump();
        }
        panic!("packet not received; got {:?}", self.got);
    }

    fn pump_n(&mut self, n: usize) {
        for _ in 0..n {
            self.pump();
        }
    }

    /// Bytes the backend holds for all connections, both directions.
    fn buffered(&self) -> usize {
        lock(&self.shared)
            .conns
            .values()
            .map(|c| c.tx_buf.len() + c.rx_buf.len())
            .sum()
    }
}

/// Opens a guest→host connection to `port` (a listener at `<uds>_<port>`), returning the
/// accepted host end.
fn guest_connect(h: &mut Harness, gport: u32, port: u32, buf_alloc: u32) -> StdStream {
    let l = StdListener::bind(port_path(&h.uds, port)).unwrap();
    let mut req = gh(op::REQUEST, gport, port);
    req.buf_alloc = buf_alloc;
    h.send(req, &[], &[]);
    let (resp, _) = h.wait_for(|x| x.dst_port == gport);
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!(resp.src_port, port);
    assert_eq!(resp.buf_alloc as usize, CONN_BUF_SIZE);
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn read_n(s: &mut StdStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn guest_to_host_bytes_exact_over_1_2_and_many_descriptors() {
    let mut h = Harness::new();
    let irq0 = h.irqs.load(Ordering::Relaxed);
    let mut host = guest_connect(&mut h, 5000, 1234, 256 * 1024);
    assert!(
        h.irqs.load(Ordering::Relaxed) > irq0,
        "used-buffer interrupt raised"
    );
    // One descriptor (header and payload together), two (header | payload), many.
    let p1 = b"hello, host".to_vec();
    h.send(gh(op::RW, 5000, 1234), &p1, &[]);
    let p2: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    h.send(gh(op::RW, 5000, 1234), &p2, &[HDR_SIZE]);
    let p3: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    h.send(gh(op::RW, 5000, 1234), &p3, &[3, 17, 24, 1, 500, 7, 1000]);
    h.pump_n(3);
    assert_eq!(read_n(&mut host, p1.len()), p1);
    assert_eq!(read_n(&mut host, p2.len()), p2);
    assert_eq!(read_n(&mut host, p3.len()), p3);

    // Host → guest, 100 KB, received in rx chains of 1, 2 and many descriptors.
    h.post_rx(16, &[HDR_SIZE as u32 + 1000]);
    h.post_rx(16, &[5, 20, 19, 3, 700, 2000]);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let (p, d) = h.wait_for(|x| x.op == op::RW && x.dst_port == 5000);
        assert_eq!(p.src_port, 1234);
        got.extend_from_slice(&d);
    }
    assert_eq!(got, data);
}

#[test]
fn host_to_guest_connect_handshake() {
    let mut h = Harness::new();
    let mut client = StdStream::connect(&h.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // The line may arrive in pieces.
    client.write_all(b"CONNECT ").unwrap();
    h.pump_n(2);
    client.write_all(b"52\n").unwrap();
    let (req, _) = h.wait_for(|x| x.op == op::REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= LOCAL_PORT_FIRST);
    h.send(gh(op::RESPONSE, 52, req.src_port), &[], &[]);
    h.pump_n(2);
    let expect = format!("OK {}\n", req.src_port);
    assert_eq!(read_n(&mut client, expect.len()), expect.as_bytes());
    // Data both ways.
    client.write_all(b"ping").unwrap();
    let (p, d) = h.wait_for(|x| x.op == op::RW);
    assert_eq!((p.dst_port, d.as_slice()), (52, &b"ping"[..]));
    h.send(gh(op::RW, 52, req.src_port), b"pong", &[HDR_SIZE, 2]);
    h.pump_n(2);
    assert_eq!(read_n(&mut client, 4), b"pong");

    // A refused connect closes the client; a garbage line too.
    let mut c2 = StdStream::connect(&h.uds).unwrap();
    c2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c2.write_all(b"CONNECT 53\n").unwrap();
    let (req2, _) = h.wait_for(|x| x.op == op::REQUEST && x.dst_port == 53);
    h.send(gh(op::RST, 53, req2.src_port), &[], &[]);
    h.pump_n(2);
    assert_eq!(c2.read(&mut [0u8; 8]).unwrap(), 0);
    let mut c3 = StdStream::connect(&h.uds).unwrap();
    c3.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c3.write_all(b"HELLO there\n").unwrap();
    h.pump_n(3);
    assert_eq!(c3.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn credit_exhaustion_stops_and_credit_update_resumes() {
    let mut h = Harness::new();
    let mut host = guest_connect(&mut h, 6000, 77, 100);
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    host.write_all(&data).unwrap();
    let (p, d) = h.wait_for(|x| x.op == op::RW);
    assert_eq!(d, &data[..100]);
    assert_eq!(p.len, 100);
    h.pump_n(5);
    assert!(
        h.got.iter().all(|(x, _)| x.op != op::RW),
        "no data beyond the credit: {:?}",
        h.got
    );
    // The device asks for credit once it is blocked.
    h.wait_for(|x| x.op == op::CREDIT_REQUEST);
    let mut upd = gh(op::CREDIT_UPDATE, 6000, 77);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    h.send(upd, &[], &[]);
    let (_, d) = h.wait_for(|x| x.op == op::RW);
    assert_eq!(d, &data[100..200]);
    upd.fwd_cnt = 200;
    h.send(upd, &[], &[]);
    let (_, d) = h.wait_for(|x| x.op == op::RW);
    assert_eq!(d, &data[200..]);
}

#[test]
fn guest_flood_to_unread_socket_stays_bounded() {
    let mut h = Harness::new();
    let _host = guest_connect(&mut h, 7000, 88, 256 * 1024);
    // A well-behaved guest: sends while it has credit, learns credit from the device's packets.
    let (mut peer_alloc, mut peer_fwd, mut sent) = (CONN_BUF_SIZE as u32, 0u32, 0u32);
    let chunk = vec![0x5au8; 4096];
    let mut stalled = 0;
    while stalled < 20 {
        let credit = peer_alloc.saturating_sub(sent.wrapping_sub(peer_fwd)) as usize;
        if credit > 0 {
            let n = credit.min(chunk.len());
            h.send(gh(op::RW, 7000, 88), &chunk[..n], &[HDR_SIZE]);
            sent = sent.wrapping_add(n as u32);
            stalled = 0;
        } else {
            stalled += 1;
        }
        h.pump();
        for (p, _) in h.got.drain(..) {
            assert_ne!(p.op, op::RST);
            peer_alloc = p.buf_alloc;
            peer_fwd = p.fwd_cnt;
        }
        assert!(sent < 64 << 20, "credit never ran out");
    }
    let buffered = sent.wrapping_sub(peer_fwd) as usize;
    assert!(buffered <= CONN_BUF_SIZE, "buffered {buffered}");
    assert!(h.buffered() <= CONN_BUF_SIZE, "VMM holds {}", h.buffered());
    // A guest ignoring the credit is reset instead of growing VMM memory.
    h.send(gh(op::RW, 7000, 88), &chunk, &[]);
    let (p, _) = h.wait_for(|x| x.op == op::RST);
    assert_eq!((p.src_port, p.dst_port), (88, 7000));
}

#[test]
fn half_close_both_ways() {
    let mut h = Harness::new();
    let mut host = guest_connect(&mut h, 8000, 99, 256 * 1024);
    // Host write half-close → SHUTDOWN(SEND) to the guest, after the data.
    host.write_all(b"last words").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    let (_, d) = h.wait_for(|x| x.op == op::RW);
    assert_eq!(d, b"last words");
    let (s, _) = h.wait_for(|x| x.op == op::SHUTDOWN);
    assert_eq!(s.flags, SHUTDOWN_SEND);
    // The guest can still send.
    h.send(gh(op::RW, 8000, 99), b"reply", &[]);
    h.pump_n(2);
    assert_eq!(read_n(&mut host, 5), b"reply");
    // Guest SHUTDOWN(SEND) → the host reads EOF.
    let mut sd = gh(op::SHUTDOWN, 8000, 99);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[], &[]);
    h.pump_n(2);
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);
    // Full shutdown from the guest → RST, connection gone.
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(sd, &[], &[]);
    let (r, _) = h.wait_for(|x| x.op == op::RST);
    assert_eq!(r.dst_port, 8000);
}

#[test]
fn rst_on_unknown_port_and_unknown_connection() {
    let mut h = Harness::new();
    h.send(gh(op::REQUEST, 4000, 9999), &[], &[]);
    let (r, _) = h.wait_for(|x| x.dst_port == 4000);
    assert_eq!((r.op, r.src_port), (op::RST, 9999));
    h.send(gh(op::RW, 4001, 9999), b"x", &[]);
    let (r, _) = h.wait_for(|x| x.dst_port == 4001);
    assert_eq!(r.op, op::RST);
}

#[test]
fn malformed_chains_do_not_panic() {
    let mut h = Harness::new();
    let mut host = guest_connect(&mut h, 3000, 55, 256 * 1024);
    // Header shorter than 44 bytes.
    h.drv.add_readable(TX, &[1u8; 20], &[]).unwrap();
    // Write-only buffer where a read-only one is expected.
    h.drv.add_writable(TX, &[64, 64]).unwrap();
    // Descriptor outside guest memory.
    h.drv
        .add_chain(
            TX,
            &[Seg {
                addr: 1 << 40,
                len: 100,
                write: false,
            }],
        )
        .unwrap();
    // Wrong CIDs: dropped silently.
    let mut bad = gh(op::RW, 3000, 55);
    bad.src_cid = 42;
    h.send(bad, b"zz", &[]);
    // Unknown type on an unknown connection: RST.
    let mut bad = gh(op::REQUEST, 3001, 55);
    bad.type_ = 2;
    h.send(bad, &[], &[]);
    h.notify(TX as u32);
    let (r, _) = h.wait_for(|x| x.dst_port == 3001);
    assert_eq!(r.op, op::RST);
    // An rx chain too small for a header and one with only readable buffers are skipped.
    h.drv.add_writable(RX, &[10]).unwrap();
    h.drv.add_readable(RX, &[0u8; 100], &[]).unwrap();
    // The live connection still works.
    h.send(gh(op::RW, 3000, 55), b"ok", &[1]);
    h.pump_n(2);
    assert_eq!(read_n(&mut host, 2), b"ok");
    // len past the end of the chain on a live connection: RST.
    let mut hd = gh(op::RW, 3000, 55);
    hd.len = 1000;
    let mut b = hd.encode().to_vec();
    b.extend_from_slice(&[7u8; 10]);
    h.drv.add_readable(TX, &b, &[HDR_SIZE, 4]).unwrap();
    h.notify(TX as u32);
    let (r, _) = h.wait_for(|x| x.dst_port == 3000);
    assert_eq!(r.op, op::RST);
    // Unknown op on a live connection: RST.
    let _host2 = guest_connect(&mut h, 3002, 56, 4096);
    h.send(gh(99, 3002, 56), &[], &[]);
    let (r, _) = h.wait_for(|x| x.dst_port == 3002);
    assert_eq!(r.op, op::RST);
    // Device is fine afterwards.
    h.send(gh(op::REQUEST, 3003, 9), &[], &[]);
    let (r, _) = h.wait_for(|x| x.dst_port == 3003);
    assert_eq!(r.op, op::RST);
}

#[test]
fn parse_connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT "), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    assert_eq!(parse_connect(b"connect 1"), None);
}

#[test]
fn transport_reset_goes_into_the_next_usable_event_buffer() {
    let mut h = Harness::new();
    lock(&h.shared).transport_reset_pending = true;
    h.pump();
    assert!(
        h.drv.take_used(2).unwrap().is_empty(),
        "no event buffer yet"
    );
    assert!(lock(&h.shared).transport_reset_pending, "still waiting");
    let irq0 = h.irqs.load(Ordering::Relaxed);
    h.drv.add_writable(2, &[2]).unwrap(); // too small: returned empty
    h.drv.add_writable(2, &[8]).unwrap();
    h.drv.add_writable(2, &[8]).unwrap(); // left for later events
    h.notify(2);
    h.pump();
    let used = h.drv.take_used(2).unwrap();
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 4);
    assert_eq!(
        &used[1].2[..4],
        &[0, 0, 0, 0],
        "id 0 = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(!lock(&h.shared).transport_reset_pending);
    assert!(
        h.irqs.load(Ordering::Relaxed) > irq0,
        "the guest is interrupted"
    );
    h.pump();
    assert!(h.drv.take_used(2).unwrap().is_empty(), "sent once");
}

#[test]
fn stale_tx_before_a_transport_reset_is_answered_with_rst_not_acted_on() {
    let mut h = Harness::new();
    // A listener exists: without the reset this REQUEST would connect.
    let l = StdListener::bind(port_path(&h.uds, 1024)).unwrap();
    l.set_nonblocking(true).unwrap();
    let mut req = gh(op::REQUEST, 7000, 1024);
    req.len = 0;
    h.drv.add_readable(TX, &req.encode(), &[]).unwrap();
    lock(&h.shared).transport_reset_pending = true;
    lock(&h.shared).stale_tx = true;
    h.drv.add_writable(2, &[8]).unwrap();
    h.notify(2);
    let (rst, _) = h.wait_for(|x| x.dst_port == 7000);
    assert_eq!(rst.op, op::RST);
    assert!(
        l.accept().is_err(),
        "the stale request never reached the host"
    );
    assert_eq!(
        h.drv.take_used(2).unwrap().len(),
        1,
        "the reset event went out"
    );
    // A request made after the reset connects as usual.
    let _s = guest_connect(&mut h, 7001, 1025, 256 * 1024);
}
