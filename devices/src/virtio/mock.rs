//! A minimal virtio driver for tests and fuzzing: it lays descriptor tables, available and used
//! rings out in guest memory the way a Linux driver does, and performs the Linux virtio-mmio
//! probe sequence through a [`BusDevice`]. Not used by the VMM itself.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MMIO_MAGIC;
use super::{status, VIRTIO_F_VERSION_1};
use crate::BusDevice;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;

/// Errors of the mock driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The device misbehaved during probing.
    #[error("probe failed: {0}")]
    Probe(&'static str),
    /// A chain is empty or longer than the queue.
    #[error("bad chain")]
    BadChain,
}

/// One segment of a descriptor chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub struct MockQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    chains: HashMap<u16, Vec<Seg>>,
}

/// The mock driver: guest memory plus the queues it set up.
#[derive(Debug)]
pub struct MockDriver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Queues, by index.
    pub queues: Vec<MockQueue>,
    data_start: u64,
    data_end: u64,
    data_next: u64,
}

fn rd32(dev: &mut dyn BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr32(dev: &mut dyn BusDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Memory layout used by [`MockDriver::probe`]: queue `i` lives at `0x10000 * (i + 1)`
/// (descriptors, then avail at +0x4000, used at +0x8000); buffers come from `0x100000` up.
pub const QUEUE_AREA: u64 = 0x10000;
/// Start of the buffer area.
pub const DATA_AREA: u64 = 0x10_0000;

impl MockDriver {
    /// Runs Linux's virtio-mmio v2 probe on `dev`: reset, ACKNOWLEDGE, DRIVER, features
    /// (accepting only VIRTIO_F_VERSION_1), FEATURES_OK (checked), then for each queue select,
    /// read QueueNumMax, write QueueNum (min(max, `queue_size`)) and the ring addresses,
    /// QueueReady, and finally DRIVER_OK. `mem` must span at least `DATA_AREA` plus buffers.
    pub fn probe(
        dev: &mut dyn BusDevice,
        mem: GuestMemoryMmap,
        nqueues: usize,
        queue_size: u16,
    ) -> Result<MockDriver, Error> {
        Self::probe_with_features(dev, mem, nqueues, queue_size, 0)
    }

    /// Like [`MockDriver::probe`], also accepting the device-offered bits of `extra` (for
    /// example VIRTIO_NET_F_MRG_RXBUF) besides VIRTIO_F_VERSION_1.
    pub fn probe_with_features(
        dev: &mut dyn BusDevice,
        mem: GuestMemoryMmap,
        nqueues: usize,
        queue_size: u16,
        extra: u64,
    ) -> Result<MockDriver, Error> {
        if rd32(dev, 0) != MMIO_MAGIC || rd32(dev, 4) != 2 {
            return Err(Error::Probe("bad magic or version"));
        }
        wr32(dev, 0x70, 0);
        wr32(dev, 0x70, status::ACKNOWLEDGE);
        wr32(dev, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr32(dev, 0x14, 1);
        let high = rd32(dev, 0x10);
        wr32(dev, 0x14, 0);
        let low = rd32(dev, 0x10);
        let v1 = 1u32 << (VIRTIO_F_VERSION_1 - 32);
        if high & v1 == 0 {
            return Err(Error::Probe("no VIRTIO_F_VERSION_1"));
        }
        let offered = (u64::from(high) << 32) | u64::from(low);
        let accepted = (offered & extra) | (1u64 << VIRTIO_F_VERSION_1);
        wr32(dev, 0x24, 1);
        wr32(dev, 0x20, (accepted >> 32) as u32);
        wr32(dev, 0x24, 0);
        wr32(dev, 0x20, accepted as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr32(dev, 0x70, s);
        if rd32(dev, 0x70) & status::FEATURES_OK == 0 {
            return Err(Error::Probe("FEATURES_OK not accepted"));
        }
        let mut queues = Vec::new();
        for i in 0..nqueues {
            wr32(dev, 0x30, i as u32);
            if rd32(dev, 0x44) != 0 {
                return Err(Error::Probe("queue already ready"));
            }
            let max = rd32(dev, 0x34);
            if max == 0 {
                return Err(Error::Probe("queue absent"));
            }
            let size = u16::try_from(max).unwrap_or(u16::MAX).min(queue_size);
            let base = QUEUE_AREA * (i as u64 + 1);
            let q = MockQueue {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
                chains: HashMap::new(),
            };
            wr32(dev, 0x38, u32::from(size));
            for (off, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                wr32(dev, off, addr as u32);
                wr32(dev, off + 4, (addr >> 32) as u32);
            }
            wr32(dev, 0x44, 1);
            if rd32(dev, 0x44) != 1 {
                return Err(Error::Probe("queue not ready"));
            }
            queues.push(q);
        }
        wr32(dev, 0x70, s | status::DRIVER_OK);
        let data_end = vm_memory::GuestMemoryBackend::last_addr(&mem).0;
        Ok(MockDriver {
            mem,
            queues,
            data_start: DATA_AREA,
            data_end,
            data_next: DATA_AREA,
        })
    }

    /// Allocates `len` bytes of buffer space (a ring over the data area).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).max(1);
        if self.data_next + len > self.data_end {
            self.data_next = self.data_start;
        }
        let a = self.data_next;
        self.data_next = (a + len + 15) & !15;
        a
    }

    /// Makes `segs` one chain on queue `q` and publishes it in the available ring (the caller
    /// then notifies). Returns the head index.
    pub fn add_chain(&mut self, q: usize, segs: &[Seg]) -> Result<u16, Error> {
        let mem = &self.mem;
        let queue = self.queues.get_mut(q).ok_or(Error::BadChain)?;
        if segs.is_empty() || segs.len() > usize::from(queue.size) {
            return Err(Error::BadChain);
        }
        let head = queue.next_desc;
        let mut idx = head;
        for (i, s) in segs.iter().enumerate() {
            let next = (idx + 1) % queue.size;
            let mut flags = if s.write { DESC_F_WRITE } else { 0 };
            if i + 1 < segs.len() {
                flags |= DESC_F_NEXT;
            }
            let d = queue.desc + 16 * u64::from(idx);
            mem.write_obj(s.addr.to_le(), GuestAddress(d))?;
            mem.write_obj(s.len.to_le(), GuestAddress(d + 8))?;
            mem.write_obj(flags.to_le(), GuestAddress(d + 12))?;
            mem.write_obj(next.to_le(), GuestAddress(d + 14))?;
            idx = next;
        }
        queue.next_desc = idx;
        let slot = queue.avail + 4 + 2 * u64::from(queue.avail_idx % queue.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))?;
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        mem.write_obj(queue.avail_idx.to_le(), GuestAddress(queue.avail + 2))?;
        queue.chains.insert(head, segs.to_vec());
        Ok(head)
    }

    /// Writes `bytes` into freshly allocated device-readable buffers split at `cuts` (segment
    /// lengths; the last segment takes the rest) and adds the chain to queue `q`.
    pub fn add_readable(&mut self, q: usize, bytes: &[u8], cuts: &[usize]) -> Result<u16, Error> {
        let mut segs = Vec::new();
        let mut rest = bytes;
        for &c in cuts {
            let c = c.min(rest.len());
            let (a, b) = rest.split_at(c);
            segs.push(a);
            rest = b;
        }
        segs.push(rest);
        let mut out = Vec::new();
        for s in segs {
            let addr = self.alloc(s.len() as u32);
            self.mem.write_slice(s, GuestAddress(addr))?;
            out.push(Seg {
                addr,
                len: s.len() as u32,
                write: false,
            });
        }
        self.add_chain(q, &out)
    }

    /// Adds a device-writable chain of buffers with the given lengths to queue `q`.
    pub fn add_writable(&mut self, q: usize, lens: &[u32]) -> Result<u16, Error> {
        let segs: Vec<Seg> = lens
            .iter()
            .map(|&len| Seg {
                addr: self.alloc(len),
                len,
                write: true,
            })
            .collect();
        self.add_chain(q, &segs)
    }

    /// New used-ring entries of queue `q`: (head, bytes written, contents of the chain's
    /// writable buffers up to that length).
    pub fn take_used(&mut self, q: usize) -> Result<Vec<(u16, u32, Vec<u8>)>, Error> {
        let mem = &self.mem;
        let queue = self.queues.get_mut(q).ok_or(Error::BadChain)?;
        let idx: u16 = u16::from_le(mem.read_obj(GuestAddress(queue.used + 2))?);
        let mut out = Vec::new();
        while queue.last_used != idx {
            let e = queue.used + 4 + 8 * u64::from(queue.last_used % queue.size);
            let id = u32::from_le(mem.read_obj(GuestAddress(e))?);
            let len = u32::from_le(mem.read_obj(GuestAddress(e + 4))?);
            queue.last_used = queue.last_used.wrapping_add(1);
            let head = u16::try_from(id).map_err(|_| Error::BadChain)?;
            let segs = queue.chains.remove(&head).unwrap_or_default();
            let mut data = Vec::new();
            let mut left = len as usize;
            for s in segs.iter().filter(|s| s.write) {
                let n = left.min(s.len as usize);
                let mut buf = vec![0u8; n];
                mem.read_slice(&mut buf, GuestAddress(s.addr))?;
                data.extend_from_slice(&buf);
                left -= n;
            }
            out.push((head, len, data));
        }
        Ok(out)
    }
}
