//! The virtio-fs device (virtio 1.2 §5.11): queue 0 is "hiprio" (FORGET, INTERRUPT), queue 1
//! the request queue. Each descriptor chain carries one FUSE request in its device-readable
//! part and room for the reply in its device-writable part; the device hands the request bytes
//! to a [`FuseHandler`] (Skiff's FUSE server, [`super::fs::Server`]) and copies the reply back.
//!
//! The hiprio queue has one worker thread; the request queue has [`REQUEST_THREADS`], which
//! take chains one at a time from the shared queue, so the several READs the guest's
//! read-ahead sends at once are answered side by side (and a slow request does not hold the
//! ones behind it). Each reply is put in the used ring and signalled as soon as it is done;
//! the guest's FUSE matches replies by `unique`, in any order. Hostile-guest bounds: a
//! request is read up to [`MAX_REQUEST`] bytes (the server rejects one whose header claims
//! more), a reply never exceeds the chain's writable bytes, a broken chain is returned unused,
//! the number of threads is fixed.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::fs::ReadSink;

use super::{Error, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// Virtio device type of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 1024;
/// Size of `fuse_out_header`, which precedes a READ's data.
const OUT_HEADER: usize = 16;
/// Largest request read from a chain: a 1 MiB WRITE plus its headers.
pub const MAX_REQUEST: usize = (1 << 20) + 4096;
/// Longest tag the configuration space holds.
pub const TAG_LEN: usize = 36;
/// Threads serving the request queue.
pub const REQUEST_THREADS: usize = 4;

/// What answers FUSE requests (the FUSE server; a mock in tests).
pub trait FuseHandler: Send + Sync + 'static {
    /// Answers one request (`req` = the chain's readable bytes) with a reply of at most
    /// `max_out` bytes, or `None` for requests that take no reply.
    fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>>;

    /// Answers a READ with its data placed by `sink` right after the reply header (see
    /// [`super::fs::Server::handle_read_direct`]); `None` for anything else.
    fn handle_read_direct(
        &self,
        _req: &[u8],
        _max_out: usize,
        _sink: &mut ReadSink<'_>,
    ) -> Option<(Vec<u8>, usize)> {
        None
    }

    /// Called once on each worker thread before it serves anything (the FUSE server drops
    /// the capabilities it does not need there: they are per thread).
    fn thread_start(&self) {}
}

impl FuseHandler for super::fs::Server {
    fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>> {
        super::fs::Server::handle(self, req, max_out)
    }

    fn handle_read_direct(
        &self,
        req: &[u8],
        max_out: usize,
        sink: &mut ReadSink<'_>,
    ) -> Option<(Vec<u8>, usize)> {
        super::fs::Server::handle_read_direct(self, req, max_out, sink)
    }

    fn thread_start(&self) {
        self.limit_thread_capabilities();
    }
}

/// The chain's device-writable buffers from byte `skip` on, `len` bytes of them, as guest
/// memory slices; `None` when a buffer is not inside guest memory (the caller then answers
/// through the copying path, whose checks report it).
fn writable_slices<'m>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    mut skip: usize,
    len: usize,
) -> Option<Vec<VolatileSlice<'m>>> {
    let mut left = len;
    let mut out = Vec::new();
    for d in chain.writable() {
        if left == 0 {
            break;
        }
        let dlen = d.len() as usize;
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let addr = d.addr().checked_add(skip as u64)?;
        let take = (dlen - skip).min(left);
        skip = 0;
        out.push(mem.get_slice(addr, take).ok()?);
        left -= take;
    }
    (left == 0).then_some(out)
}

#[derive(Debug, Default)]
struct WakeState {
    pending: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Wake {
    state: Mutex<WakeState>,
    cv: Condvar,
}

impl Wake {
    fn set(&self, f: impl FnOnce(&mut WakeState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.cv.notify_one();
    }

    fn stop(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.stop = true;
        }
        self.cv.notify_all();
    }

    /// Waits for a notification; false when the worker must stop.
    fn wait(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        while !s.pending && !s.stop {
            s = match self.cv.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        s.pending = false;
        !s.stop
    }
}

#[derive(Debug)]
struct Worker {
    wake: Arc<Wake>,
    threads: Vec<JoinHandle<()>>,
}

/// The virtio-fs device.
pub struct VirtioFs {
    tag: [u8; TAG_LEN],
    handler: Arc<dyn FuseHandler>,
    acked: u64,
    workers: Vec<Worker>,
}

impl std::fmt::Debug for VirtioFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field("tag", &String::from_utf8_lossy(&self.tag))
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl VirtioFs {
    /// A device exporting `handler` under mount tag `tag` (1..=36 bytes, no NUL).
    pub fn new(tag: &str, handler: Arc<dyn FuseHandler>) -> Result<Self, Error> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(Error::Activate(format!(
                "virtio-fs tag {tag:?} must be 1 to {TAG_LEN} bytes without NUL"
            )));
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(VirtioFs {
            tag: t,
            handler,
            acked: 0,
            workers: Vec::new(),
        })
    }

    fn stop_workers(&mut self) {
        for w in &self.workers {
            w.wake.stop();
        }
        for w in self.workers.drain(..) {
            for t in w.threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Takes the next available chain of `queue` (locked only for that) and, when another one
/// is waiting behind it, wakes a sibling thread for it; `None` when the queue is empty.
fn pop_next<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &Mutex<Queue>,
    wake: &Wake,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    let mut q = queue.lock().ok()?;
    let chain = q.pop_descriptor_chain(mem)?;
    let more = q
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|a| a.0 != q.next_avail());
    drop(q);
    if more {
        wake.set(|s| s.pending = true);
    }
    Some(chain)
}

/// Answers one chain; returns the number of bytes written into its writable part.
fn serve(
    handler: &dyn FuseHandler,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
) -> u32 {
    let started = std::time::Instant::now();
    let mut written = 0u32;
    let data_chain = chain.clone();
    match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
        (Ok(mut r), Ok(mut w)) => {
            let n = r.available_bytes().min(MAX_REQUEST);
            buf.clear();
            buf.resize(n, 0);
            let room = w.available_bytes();
            // READ: the file's data goes straight into the guest's buffers.
            let mut sink = |fd: &std::os::fd::OwnedFd, off: u64, len: usize| {
                let t0 = std::time::Instant::now();
                let bufs = writable_slices(mem, data_chain.clone(), OUT_HEADER, len)
                    .ok_or(libc::EFAULT)?;
                let t1 = std::time::Instant::now();
                let r = super::fs::pread_guest(fd, &bufs, off);
                tracing::trace!(
                    slices_us = (t1 - t0).as_micros() as u64,
                    pread_us = t1.elapsed().as_micros() as u64,
                    since_pop_us = (t0 - started).as_micros() as u64,
                    "fuse read"
                );
                r
            };
            match std::io::Read::read_exact(&mut r, buf) {
                Ok(()) => {
                    if let Some((header, data)) = handler.handle_read_direct(buf, room, &mut sink) {
                        if std::io::Write::write_all(&mut w, &header).is_ok() {
                            written = u32::try_from(header.len() + data).unwrap_or(0);
                        }
                    } else if let Some(reply) = handler.handle(buf, w.available_bytes()) {
                        if reply.len() <= w.available_bytes()
                            && std::io::Write::write_all(&mut w, &reply).is_ok()
                        {
                            written = u32::try_from(reply.len()).unwrap_or(0);
                        } else {
                            tracing::debug!("virtio-fs: reply does not fit the chain");
                        }
                    }
                }
                Err(e) => tracing::debug!("virtio-fs: unreadable request: {e}"),
            }
        }
        _ => tracing::debug!("virtio-fs: bad descriptor chain"),
    }
    tracing::trace!(
        written,
        us = started.elapsed().as_micros() as u64,
        "fuse reply"
    );
    written
}

/// One thread of a queue: serves chains until the queue is empty, puts each reply in the used
/// ring and signals it, then waits for the next notification.
fn worker_loop(
    handler: &dyn FuseHandler,
    mem: &GuestMemoryMmap,
    queue: &Mutex<Queue>,
    wake: &Wake,
    interrupt: &VirtioInterrupt,
) {
    let mut buf = Vec::new();
    while wake.wait() {
        while let Some(chain) = pop_next(mem, queue, wake) {
            let head = chain.head_index();
            let written = serve(handler, mem, chain, &mut buf);
            let Ok(mut q) = queue.lock() else { return };
            if q.add_used(mem, head, written).is_err() {
                return;
            }
            let notify = q.needs_notification(mem).unwrap_or(true);
            drop(q);
            if notify {
                interrupt.signal_used_queue();
            }
        }
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; le32 notify_buf_size; }
        let mut cfg = [0u8; TAG_LEN + 8];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..TAG_LEN + 4].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), Error> {
        if queues.len() != 2 {
            return Err(Error::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        self.stop_workers();
        for (i, queue) in queues.into_iter().enumerate() {
            let wake = Arc::new(Wake::default());
            let queue = Arc::new(Mutex::new(queue));
            let count = if i == 0 { 1 } else { REQUEST_THREADS };
            let mut threads = Vec::with_capacity(count);
            for t in 0..count {
                let wk = wake.clone();
                let queue = queue.clone();
                let handler = self.handler.clone();
                let mem = mem.clone();
                let interrupt = interrupt.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("virtio-fs-q{i}.{t}"))
                    .spawn(move || {
                        handler.thread_start();
                        worker_loop(&*handler, &mem, &queue, &wk, &interrupt)
                    });
                match spawned {
                    Ok(th) => threads.push(th),
                    Err(e) => {
                        self.workers.push(Worker { wake, threads });
                        self.stop_workers();
                        return Err(Error::Activate(format!("virtio-fs worker: {e}")));
                    }
                }
            }
            self.workers.push(Worker { wake, threads });
        }
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if let Some(w) = usize::try_from(index)
            .ok()
            .and_then(|i| self.workers.get(i))
        {
            w.wake.set(|s| s.pending = true);
        }
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::mock::{MockDriver, Seg};
    use crate::{BusDevice, IrqTrigger};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// Echoes the request reversed, or no reply for a request starting with 0xff.
    struct Echo;
    impl FuseHandler for Echo {
        fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>> {
            if req.first() == Some(&0xff) {
                return None;
            }
            let mut v: Vec<u8> = req.iter().rev().copied().collect();
            v.truncate(max_out);
            Some(v)
        }
    }

    /// Serves `R` + offset (u64 LE) + size (u32 LE) requests through the direct READ path
    /// from a file (reply header: 16 bytes of 0xee); anything else through the copying path.
    struct FileReader(std::os::fd::OwnedFd);
    impl FuseHandler for FileReader {
        fn handle(&self, _req: &[u8], _max_out: usize) -> Option<Vec<u8>> {
            Some(b"copied".to_vec())
        }
        fn handle_read_direct(
            &self,
            req: &[u8],
            max_out: usize,
            sink: &mut ReadSink<'_>,
        ) -> Option<(Vec<u8>, usize)> {
            if req.first() != Some(&b'R') {
                return None;
            }
            let off = u64::from_le_bytes(req[1..9].try_into().unwrap());
            let size = u32::from_le_bytes(req[9..13].try_into().unwrap()) as usize;
            let got = sink(&self.0, off, size.min(max_out - 16)).unwrap();
            Some((vec![0xee; 16], got))
        }
    }

    fn setup() -> (MmioTransport, MockDriver) {
        setup_with(Arc::new(Echo))
    }

    fn setup_with(handler: Arc<dyn FuseHandler>) -> (MmioTransport, MockDriver) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let dev = VirtioFs::new("rootfs", handler).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), IrqTrigger::none()).unwrap();
        let d = MockDriver::probe(&mut t, mem, 2, 64).unwrap();
        (t, d)
    }

    fn request(d: &mut MockDriver, q: usize, req: &[u8], out: u32) -> u16 {
        let a = d.alloc(req.len() as u32);
        d.mem.write_slice(req, GuestAddress(a)).unwrap();
        let b = d.alloc(out);
        d.add_chain(
            q,
            &[
                Seg {
                    addr: a,
                    len: req.len() as u32,
                    write: false,
                },
                Seg {
                    addr: b,
                    len: out,
                    write: true,
                },
            ],
        )
        .unwrap()
    }

    fn used(t: &mut MmioTransport, d: &mut MockDriver, q: usize) -> Vec<(u16, u32, Vec<u8>)> {
        t.write(0x50, &(q as u32).to_le_bytes());
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let u = d.take_used(q).unwrap();
            if !u.is_empty() || Instant::now() > end {
                return u;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Each request waits (up to 5 s) until `want` requests are inside the handler at once,
    /// then answers "together", or "alone" when they never were.
    struct Rendezvous {
        inside: Mutex<usize>,
        cv: Condvar,
        want: usize,
    }
    impl FuseHandler for Rendezvous {
        fn handle(&self, _req: &[u8], _max_out: usize) -> Option<Vec<u8>> {
            let mut n = self.inside.lock().unwrap();
            *n += 1;
            self.cv.notify_all();
            let (n, t) = self
                .cv
                .wait_timeout_while(n, Duration::from_secs(5), |n| *n < self.want)
                .unwrap();
            drop(n);
            Some(if t.timed_out() {
                b"alone".to_vec()
            } else {
                b"together".to_vec()
            })
        }
    }

    #[test]
    fn requests_waiting_together_are_served_side_by_side() {
        let h = Arc::new(Rendezvous {
            inside: Mutex::new(0),
            cv: Condvar::new(),
            want: REQUEST_THREADS,
        });
        let (mut t, mut d) = setup_with(h);
        let heads: Vec<u16> = (0..REQUEST_THREADS)
            .map(|_| request(&mut d, 1, b"r", 16))
            .collect();
        // One notification for all of them, as the guest's read-ahead sends them.
        t.write(0x50, &1u32.to_le_bytes());
        let end = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < heads.len() && Instant::now() < end {
            got.extend(d.take_used(1).unwrap());
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut seen: Vec<u16> = got.iter().map(|u| u.0).collect();
        seen.sort_unstable();
        assert_eq!(seen, heads);
        assert!(got.iter().all(|u| u.2 == b"together"), "{got:?}");
    }

    /// Counts `thread_start` calls.
    struct Starts(std::sync::atomic::AtomicUsize);
    impl FuseHandler for Starts {
        fn handle(&self, _req: &[u8], _max_out: usize) -> Option<Vec<u8>> {
            Some(b"ok".to_vec())
        }
        fn thread_start(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn every_worker_thread_starts_through_the_handler() {
        let h = Arc::new(Starts(std::sync::atomic::AtomicUsize::new(0)));
        let (mut t, mut d) = setup_with(h.clone());
        // A request answered proves the workers run; each called thread_start first.
        let head = request(&mut d, 1, b"r", 16);
        assert_eq!(used(&mut t, &mut d, 1), vec![(head, 2, b"ok".to_vec())]);
        let end = Instant::now() + Duration::from_secs(5);
        while h.0.load(std::sync::atomic::Ordering::SeqCst) < 1 + REQUEST_THREADS
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            h.0.load(std::sync::atomic::Ordering::SeqCst),
            1 + REQUEST_THREADS
        );
    }

    #[test]
    fn config_space_has_the_tag_and_one_request_queue() {
        let (mut t, _d) = setup();
        let mut b = [0u8; 44];
        t.read(0x100, &mut b);
        assert_eq!(&b[..6], b"rootfs");
        assert!(b[6..36].iter().all(|&x| x == 0));
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 1);
        assert!(VirtioFs::new("", Arc::new(Echo)).is_err());
        assert!(VirtioFs::new(&"x".repeat(37), Arc::new(Echo)).is_err());
    }

    #[test]
    fn requests_get_replies_on_both_queues() {
        let (mut t, mut d) = setup();
        let h = request(&mut d, 1, b"abc", 16);
        assert_eq!(used(&mut t, &mut d, 1), vec![(h, 3, b"cba".to_vec())]);
        // No reply (FORGET): used with length 0.
        let h = request(&mut d, 0, &[0xff, 1, 2], 16);
        assert_eq!(used(&mut t, &mut d, 0), vec![(h, 0, Vec::new())]);
        // A reply larger than the writable part is truncated by the handler's bound.
        let h = request(&mut d, 1, b"0123456789", 4);
        assert_eq!(used(&mut t, &mut d, 1), vec![(h, 4, b"9876".to_vec())]);
    }

    #[test]
    fn a_chain_without_writable_part_is_returned_empty() {
        let (mut t, mut d) = setup();
        let h = d.add_readable(1, b"hello", &[2]).unwrap();
        assert_eq!(used(&mut t, &mut d, 1), vec![(h, 0, Vec::new())]);
        // The queue still works afterwards.
        let h = request(&mut d, 1, b"xy", 8);
        assert_eq!(used(&mut t, &mut d, 1), vec![(h, 2, b"yx".to_vec())]);
    }

    #[test]
    fn reads_go_straight_into_scattered_guest_buffers() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let f = std::fs::File::open(dir.path().join("f")).unwrap();
        let (mut t, mut d) = setup_with(Arc::new(FileReader(f.into())));
        // The header straddles two buffers, the data spans four of odd sizes.
        let lens = [5u32, 11, 3, 4093, 100_000];
        let read = |d: &mut MockDriver, off: u64, size: u32| {
            let mut req = vec![b'R'];
            req.extend_from_slice(&off.to_le_bytes());
            req.extend_from_slice(&size.to_le_bytes());
            let a = d.alloc(req.len() as u32);
            d.mem.write_slice(&req, GuestAddress(a)).unwrap();
            let mut segs = vec![Seg {
                addr: a,
                len: req.len() as u32,
                write: false,
            }];
            for len in lens {
                segs.push(Seg {
                    addr: d.alloc(len),
                    len,
                    write: true,
                });
            }
            d.add_chain(1, &segs).unwrap()
        };
        let h = read(&mut d, 1234, 100_000);
        let u = used(&mut t, &mut d, 1);
        assert_eq!(u.len(), 1);
        let (head, n, bytes) = &u[0];
        assert_eq!((*head, *n), (h, 16 + 100_000));
        assert_eq!(&bytes[..16], &[0xee; 16]);
        assert!(bytes[16..] == data[1234..101_234], "data differs");
        // Short at end of file.
        let h = read(&mut d, 199_990, 100);
        let u = used(&mut t, &mut d, 1);
        assert_eq!((u[0].0, u[0].1), (h, 16 + 10));
        assert_eq!(&u[0].2[16..], &data[199_990..]);
        // Other requests still take the copying path.
        let h = request(&mut d, 1, b"xy", 8);
        assert_eq!(used(&mut t, &mut d, 1), vec![(h, 6, b"copied".to_vec())]);
    }
}
