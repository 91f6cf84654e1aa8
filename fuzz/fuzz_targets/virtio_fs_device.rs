//! Guest-reachable: the virtio-fs device layer (`VirtioFs`: queue workers, chain reading,
//! reply copying, the zero-copy READ path) behind its virtio-mmio transport, with descriptor
//! chains of any shape built in guest memory from the input (any number of segments, any
//! lengths, device-writable and -readable in any order, addresses outside guest memory or on
//! the rings), notifications of either queue, raw pokes into the rings, and resets (and
//! re-probes) while requests are in flight.
//!
//! The FUSE handler is a checking stand-in (the FUSE server has its own targets): it answers
//! with a reply whose length the request chooses (also longer than `max_out`: the device must
//! then not write it), and `R` requests go through `handle_read_direct` from a real file.
//!
//! Checked, besides "no panic, no hang": a request never exceeds `MAX_REQUEST`; a used entry
//! never claims more bytes than its chain's writable part; once a reset (status 0) returns,
//! the device writes nothing more to the used rings.
//!
//! The device's worker threads make a run depend on scheduling: a crash found here may need a
//! few runs to reproduce.
//!
//! Input: byte 0 = queue size (power of two, 1..=256); then operations, first byte `k`:
//!   k % 8 == 0,1  chain on queue k>>3&1: n = (k>>4)+1 segments, each `f len:2 [data]`
//!                 (f bit 0 writable, bits 1-2 address: buffer area / outside memory /
//!                 the ring area; readable segments carry their data from the input)
//!   2  notify queue k>>3 (any index)    3  reset (status 0)     4  re-probe (after reset)
//!   5  poke `a:2 n:1 bytes` into the ring area (the driver's rings: chains become untrusted)
//!   6  collect used entries             7  yield (let workers run)
#![no_main]

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use skiff_devices::virtio::fs::ReadSink;
use skiff_devices::virtio::mmio::MmioTransport;
use skiff_devices::virtio::mock::{MockDriver, Seg, DATA_AREA, QUEUE_AREA};
use skiff_devices::virtio::virtio_fs::{FuseHandler, VirtioFs, MAX_REQUEST};
use skiff_devices::{BusDevice, IrqTrigger};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 2 << 20;

struct Checker {
    file: OwnedFd,
}

impl FuseHandler for Checker {
    fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>> {
        assert!(req.len() <= MAX_REQUEST);
        match req {
            [] | [0xff, ..] => None,
            [a, b, ..] => Some(vec![
                0xab;
                usize::from(u16::from_le_bytes([*a, *b]))
                    % (max_out + 64)
            ]),
            [a] => Some(vec![0xab; usize::from(*a)]),
        }
    }

    fn handle_read_direct(
        &self,
        req: &[u8],
        max_out: usize,
        sink: &mut ReadSink<'_>,
    ) -> Option<(Vec<u8>, usize)> {
        assert!(req.len() <= MAX_REQUEST);
        if req.first() != Some(&b'R') || req.len() < 5 || max_out < 16 {
            return None;
        }
        let want = u32::from_le_bytes(req[1..5].try_into().unwrap()) as usize % (max_out - 15);
        let off = u64::from(req.get(5).copied().unwrap_or(0)) * 512;
        match sink(&self.file, off, want) {
            Ok(n) => {
                assert!(n <= want);
                Some((vec![0xee; 16], n))
            }
            Err(_) => Some((vec![0xef; 16], 0)),
        }
    }
}

fn handler() -> Arc<Checker> {
    static H: OnceLock<Arc<Checker>> = OnceLock::new();
    H.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("skiff-fuzz-virtiofs-{}", std::process::id()));
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).expect("write");
        let f = std::fs::File::open(&p).expect("open");
        let _ = std::fs::remove_file(&p);
        Arc::new(Checker { file: f.into() })
    })
    .clone()
}

fn take<'a>(u: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if u.len() < n {
        return None;
    }
    let (a, b) = u.split_at(n);
    *u = b;
    Some(a)
}

/// Up to `n` bytes (fewer at the end of the input).
fn take_upto<'a>(u: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = u.split_at(n.min(u.len()));
    *u = b;
    a
}

fn used_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
    mem.read_obj(GuestAddress(QUEUE_AREA * (q as u64 + 1) + 0x8000 + 2))
        .unwrap_or(0)
}

/// The driver side: the mock driver plus what it knows about chains in flight.
struct Driver {
    d: MockDriver,
    /// (queue, head) -> (writable bytes, descriptors) of each chain in flight.
    chains: HashMap<(usize, u16), (u64, u16)>,
    /// The mock driver's next free descriptor per queue (it lays chains out in ring order).
    next: [u16; 2],
    size: u16,
    /// The rings were written by something else than the driver (pokes, buffers placed on
    /// them): chains are no longer what the driver laid out.
    tainted: bool,
}

impl Driver {
    /// Whether `n` descriptors from the next free one overlap a chain in flight.
    fn fits(&self, q: usize, n: u16) -> bool {
        let size = self.size;
        let dist = |a: u16, b: u16| (b + size - a) % size;
        n <= size
            && self
                .chains
                .iter()
                .filter(|((qq, _), _)| *qq == q)
                .all(|((_, head), (_, len))| {
                    // Disjoint ranges [next, next+n) and [head, head+len) on a ring of `size`.
                    dist(self.next[q], *head) >= n && dist(*head, self.next[q]) >= *len
                })
    }

    fn collect(&mut self) {
        for q in 0..2 {
            let Ok(used) = self.d.take_used(q) else {
                self.tainted = true;
                continue;
            };
            for (head, len, _) in used {
                match self.chains.remove(&(q, head)) {
                    Some((w, _)) if !self.tainted => {
                        assert!(u64::from(len) <= w, "used len {len} > writable {w}");
                    }
                    _ => {}
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = data;
    let Some(&[qs]) = take(&mut u, 1) else { return };
    let qsize = 1u16 << (qs % 9);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem");
    let dev = VirtioFs::new("fuzz", handler()).expect("dev");
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), IrqTrigger::none()).expect("t");
    let new_driver = |t: &mut MmioTransport| {
        MockDriver::probe(t, mem.clone(), 2, qsize)
            .ok()
            .map(|d| Driver {
                d,
                chains: HashMap::new(),
                next: [0; 2],
                size: qsize,
                tainted: false,
            })
    };
    let mut drv = new_driver(&mut t);
    // Used indexes frozen by the last reset (checked until the next probe).
    let mut frozen: Option<[u16; 2]> = None;
    let mut probes = 0;
    for _ in 0..256 {
        let Some(&[k]) = take(&mut u, 1) else { break };
        if let Some(f) = frozen {
            assert_eq!(
                [used_idx(&mem, 0), used_idx(&mem, 1)],
                f,
                "used ring written after reset"
            );
        }
        match k % 8 {
            0 | 1 => {
                let q = usize::from(k >> 3 & 1);
                let n = usize::from(k >> 4) + 1;
                let mut segs = Vec::new();
                let mut wr = 0u64;
                let mut on_rings = false;
                for _ in 0..n {
                    let (Some(&[f]), Some(l)) = (take(&mut u, 1), take(&mut u, 2)) else {
                        break;
                    };
                    let len = u32::from(u16::from_le_bytes([l[0], l[1]]));
                    let write = f & 1 != 0;
                    let addr = match (f >> 1) & 3 {
                        1 => MEM - 8 + u64::from(f >> 3),
                        2 => {
                            on_rings = true;
                            QUEUE_AREA + u64::from(f) * 64
                        }
                        _ => drv.as_mut().map_or(DATA_AREA, |d| d.d.alloc(len)),
                    };
                    let bytes = if write {
                        wr += u64::from(len);
                        &[][..]
                    } else {
                        take_upto(&mut u, len as usize)
                    };
                    segs.push((Seg { addr, len, write }, bytes));
                }
                // Only a driver lays chains (after a reset, the rings must stay untouched).
                let Some(d) = drv.as_mut() else { continue };
                if segs.is_empty() || !d.fits(q, segs.len() as u16) {
                    continue;
                }
                for (s, bytes) in &segs {
                    let _ = mem.write_slice(bytes, GuestAddress(s.addr));
                }
                let segs: Vec<Seg> = segs.into_iter().map(|(s, _)| s).collect();
                d.tainted |= on_rings;
                if let Ok(head) = d.d.add_chain(q, &segs) {
                    d.chains.insert((q, head), (wr, segs.len() as u16));
                    d.next[q] = (head + segs.len() as u16) % qsize;
                }
            }
            2 => t.write(0x50, &u32::from(k >> 3).to_le_bytes()),
            3 => {
                t.write(0x70, &0u32.to_le_bytes());
                frozen = Some([used_idx(&mem, 0), used_idx(&mem, 1)]);
                drv = None;
            }
            4 if drv.is_none() && probes < 4 => {
                probes += 1;
                // A new driver starts from clean rings.
                for q in 0..2u64 {
                    let _ = mem.write_slice(&[0u8; 0xc000], GuestAddress(QUEUE_AREA * (q + 1)));
                }
                frozen = None;
                drv = new_driver(&mut t);
            }
            5 => {
                let (Some(a), Some(&[n])) = (take(&mut u, 2), take(&mut u, 1)) else {
                    break;
                };
                let b = take_upto(&mut u, usize::from(n % 32));
                let a = QUEUE_AREA + u64::from(u16::from_le_bytes([a[0], a[1]])) % (2 * QUEUE_AREA);
                if let Some(d) = drv.as_mut() {
                    let _ = mem.write_slice(b, GuestAddress(a));
                    d.tainted = true;
                }
            }
            6 => {
                if let Some(d) = drv.as_mut() {
                    d.collect();
                }
            }
            7 => std::thread::yield_now(),
            _ => {}
        }
    }
    // Reset with whatever is still in flight; nothing may touch the rings afterwards.
    t.write(0x70, &0u32.to_le_bytes());
    let f = [used_idx(&mem, 0), used_idx(&mem, 1)];
    std::thread::yield_now();
    assert_eq!(
        [used_idx(&mem, 0), used_idx(&mem, 1)],
        f,
        "used ring written after reset"
    );
    if let Some(d) = drv.as_mut() {
        if !d.tainted {
            d.collect();
        }
    }
});
