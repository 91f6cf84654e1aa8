//! Guest-written virtio-net tx chains (any length, any descriptor split, device-writable or
//! out-of-memory segments, descriptor loops), rx buffers of any shape, with and without
//! MRG_RXBUF, and arbitrary bytes from the stream backend's peer (length prefixes included),
//! fed to the net device behind its virtio-mmio transport. Must never panic or hang.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use skiff_devices::event_loop::EventLoop;
use skiff_devices::virtio::mmio::MmioTransport;
use skiff_devices::virtio::mock::{MockDriver, Seg, DESC_F_NEXT};
use skiff_devices::virtio::net::{features, Net, NetConfig, StreamBackend};
use skiff_devices::{BusDevice, IrqTrigger};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn take<'a>(u: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = u.split_at(n.min(u.len()));
    *u = b;
    a
}

fuzz_target!(|data: &[u8]| {
    let mut u = data;
    let mode = take(&mut u, 1).first().copied().unwrap_or(0);
    let (a, mut peer) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("nonblocking");
    let backend = StreamBackend::new(OwnedFd::from(a)).expect("backend");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
    let mut el = EventLoop::new().expect("event loop");
    let net = Net::new(
        NetConfig::new([0x52, 0x54, 0, 1, 2, 3]),
        Box::new(backend),
        &mut el,
    )
    .expect("net");
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), IrqTrigger::none()).expect("t");
    let extra = if mode & 1 != 0 {
        1 << features::MRG_RXBUF
    } else {
        0
    };
    let mut drv = MockDriver::probe_with_features(&mut t, mem, 2, 16, extra).expect("probe");
    let mut sink = [0u8; 4096];

    for _ in 0..64 {
        let ctrl = match take(&mut u, 1) {
            [c] => *c,
            _ => break,
        };
        let len = usize::from(take(&mut u, 1).first().copied().unwrap_or(0)) * 64
            + usize::from(ctrl & 0x0f);
        let nseg = usize::from((ctrl >> 4) & 3);
        let cuts: Vec<usize> = take(&mut u, nseg).iter().map(|&c| usize::from(c)).collect();
        match ctrl >> 6 {
            0 => {
                // A tx chain of `len` bytes (header + frame) split at `cuts`.
                let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let _ = drv.add_readable(1, &bytes, &cuts);
                t.write(0x50, &1u32.to_le_bytes());
            }
            1 => {
                // A tx chain with a device-writable, huge or out-of-memory segment, maybe a loop.
                let segs = [
                    Seg {
                        addr: 0x10_0000,
                        len: len as u32,
                        write: false,
                    },
                    Seg {
                        addr: if ctrl & 1 != 0 { 1 << 40 } else { 0x10_0000 },
                        len: if ctrl & 2 != 0 { 70_000 } else { 64 },
                        write: ctrl & 4 != 0,
                    },
                ];
                if let Ok(head) = drv.add_chain(1, &segs) {
                    if ctrl & 8 != 0 {
                        // Make the last descriptor point back at the head.
                        let q = &drv.queues[1];
                        let d = q.desc + 16 * u64::from((head + 1) % q.size);
                        let _ = drv.mem.write_obj(DESC_F_NEXT.to_le(), GuestAddress(d + 12));
                        let _ = drv.mem.write_obj(head.to_le(), GuestAddress(d + 14));
                    }
                }
                t.write(0x50, &1u32.to_le_bytes());
            }
            2 => {
                // Rx buffers of arbitrary shape, or device-readable ones.
                let lens: Vec<u32> = cuts.iter().map(|&c| c as u32 * 16).collect();
                if ctrl & 8 != 0 {
                    let _ = drv.add_readable(0, &vec![0u8; len], &cuts);
                } else if !lens.is_empty() {
                    let _ = drv.add_writable(0, &lens);
                }
                t.write(0x50, &0u32.to_le_bytes());
            }
            _ => {
                // Raw bytes from the backend's peer (length prefixes and frames).
                let bytes = take(&mut u, len);
                let _ = peer.write(bytes);
            }
        }
        let _ = el.run_once(Some(Duration::ZERO));
        while let Ok(n) = peer.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        let _ = drv.take_used(0);
        let _ = drv.take_used(1);
        if ctrl == 0xff {
            t.write(0x70, &0u32.to_le_bytes());
        }
    }
    let _ = el.run_once(Some(Duration::ZERO));
});
