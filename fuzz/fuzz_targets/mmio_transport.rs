//! Guest-reachable: the virtio-mmio register state machine (`MmioTransport`) driven by any
//! sequence of reads and writes (any offset in the window, any size, any value) and by guest
//! memory pokes (rings and descriptors the guest writes), over a small device that serves its
//! queues synchronously and checks what the transport asks of it.
//!
//! Checked, besides "no panic": MagicValue and Version always read right; register reads of a
//! size other than 4 or at an unaligned offset read zeros; the device is activated at most
//! once per reset, only after FEATURES_OK, with one valid ready queue per declared queue and
//! features it offered (VERSION_1 included); it gets notifications only while activated and
//! for existing queues, and `reset` only when activated; `is_activated` agrees with the device;
//! an activated transport shows DRIVER_OK and FEATURES_OK;
//! InterruptStatus only holds the two defined bits.
//!
//! Input: a sequence of operations; the first byte of each selects it:
//!   00xxxxxx v:4   write v to register (x * 4)
//!   01xxxxxx       read register (x * 4)
//!   10ddsssw o:2 v:8  any access: offset o % 0x200, size [1,2,3,4,8,0,16,4][sss], w = write
//!   11nnnnnn a:2 b:n+1  write n+1 bytes b to guest memory at a (64 KiB of guest memory)
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use skiff_devices::virtio::mmio::{MmioTransport, MMIO_MAGIC, MMIO_VERSION};
use skiff_devices::virtio::{
    status, Error, VirtioDevice, VirtioInterrupt, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1,
};
use skiff_devices::{BusDevice, IrqTrigger};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MAX_SIZES: [u16; 2] = [16, 4];
const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | 1 | (1 << 35);

#[derive(Default)]
struct State {
    active: bool,
    acked: u64,
}

/// Echoes each chain's readable bytes, reversed, into its writable part.
struct Echo {
    state: Arc<Mutex<State>>,
    live: Option<(GuestMemoryMmap, Vec<Queue>, VirtioInterrupt)>,
    config: [u8; 8],
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn ack_features(&mut self, f: u64) {
        let mut s = self.state.lock().unwrap();
        assert!(!s.active, "features acked while active");
        assert_eq!(f & !OFFERED, 0, "acked features not offered: {f:#x}");
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0, "acked without VERSION_1");
        s.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get(o as usize).copied())
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get_mut(o as usize))
            {
                *c = *b;
            }
        }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &MAX_SIZES
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap();
        assert!(!s.active && self.live.is_none(), "activated twice");
        assert_eq!(queues.len(), MAX_SIZES.len());
        for (q, max) in queues.iter().zip(MAX_SIZES) {
            assert!(
                q.ready() && q.is_valid(&mem),
                "activated with an invalid queue"
            );
            assert!(q.size() <= max && q.size().is_power_of_two());
        }
        // A device may refuse some feature sets: the transport must then set NEEDS_RESET.
        if s.acked & (1 << 35) != 0 && s.acked & 1 == 0 {
            return Err(Error::Activate(
                "test device refuses this feature set".into(),
            ));
        }
        s.active = true;
        self.live = Some((mem, queues, interrupt));
        Ok(())
    }
    fn queue_notify(&mut self, index: u32) {
        assert!(
            self.state.lock().unwrap().active,
            "notified while not active"
        );
        let (mem, queues, interrupt) = self.live.as_mut().expect("live");
        let q = queues
            .get_mut(index as usize)
            .expect("notified for a queue that does not exist");
        for _ in 0..32 {
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0;
            if let (Ok(mut r), Ok(mut w)) =
                (Reader::new(&*mem, chain.clone()), Writer::new(&*mem, chain))
            {
                let mut buf = vec![0u8; r.available_bytes().min(4096)];
                if std::io::Read::read_exact(&mut r, &mut buf).is_ok() {
                    buf.reverse();
                    buf.truncate(w.available_bytes());
                    if std::io::Write::write_all(&mut w, &buf).is_ok() {
                        written = buf.len() as u32;
                    }
                }
            }
            if q.add_used(&*mem, head, written).is_err() {
                break;
            }
        }
        interrupt.signal_used_queue();
    }
    fn reset(&mut self) {
        let mut s = self.state.lock().unwrap();
        assert!(s.active, "reset while not active");
        s.active = false;
        self.live = None;
    }
}

fn rd32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn take<'a>(u: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if u.len() < n {
        return None;
    }
    let (a, b) = u.split_at(n);
    *u = b;
    Some(a)
}

fn check(t: &mut MmioTransport, state: &Mutex<State>) {
    assert_eq!(rd32(t, 0), MMIO_MAGIC);
    assert_eq!(rd32(t, 4), MMIO_VERSION);
    let active = state.lock().unwrap().active;
    assert_eq!(t.is_activated(), active);
    let st = t.status();
    assert_eq!(rd32(t, 0x70), st);
    if active {
        let ok = status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(st & ok, ok);
    }
    assert_eq!(t.interrupt().status() & !(INT_USED_RING | INT_CONFIG), 0);
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).expect("mem");
    let state = Arc::new(Mutex::new(State::default()));
    let dev = Echo {
        state: state.clone(),
        live: None,
        config: *b"skiffcfg",
    };
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), IrqTrigger::none()).expect("t");
    let mut u = data;
    for _ in 0..512 {
        let Some(&[k]) = take(&mut u, 1) else { break };
        match k >> 6 {
            0 => {
                let Some(v) = take(&mut u, 4) else { break };
                t.write(u64::from(k & 0x3f) * 4, v);
            }
            1 => {
                let _ = rd32(&mut t, u64::from(k & 0x3f) * 4);
            }
            2 => {
                let (Some(o), Some(v)) = (take(&mut u, 2), take(&mut u, 8)) else {
                    break;
                };
                let off = u64::from(u16::from_le_bytes([o[0], o[1]])) % 0x200;
                let size = [1usize, 2, 3, 4, 8, 0, 16, 4][usize::from((k >> 1) & 7)];
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(v);
                if k & 1 != 0 {
                    t.write(off, &buf[..size]);
                } else {
                    t.read(off, &mut buf[..size]);
                    if off < 0x100 && (size != 4 || off & 3 != 0) {
                        assert!(
                            buf[..size].iter().all(|&b| b == 0),
                            "odd register read not zero"
                        );
                    }
                }
            }
            _ => {
                let n = usize::from(k & 0x3f) + 1;
                let (Some(a), Some(b)) = (take(&mut u, 2), take(&mut u, n)) else {
                    break;
                };
                let a = u64::from(u16::from_le_bytes([a[0], a[1]]));
                let _ = mem.write_slice(b, GuestAddress(a));
            }
        }
        check(&mut t, &state);
    }
});
