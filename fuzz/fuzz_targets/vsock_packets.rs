//! Guest-written virtio-vsock tx queue contents (headers, payloads, descriptor layouts,
//! device-writable buffers where readable ones belong) and rx buffers of any shape, fed to the
//! vsock device behind its virtio-mmio transport. Guest connects go to `<uds>_1` (a listener
//! that accepts and hangs up) or to ports with no listener. Must never panic.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use skiff_devices::event_loop::EventLoop;
use skiff_devices::virtio::mmio::MmioTransport;
use skiff_devices::virtio::mock::{MockDriver, Seg};
use skiff_devices::virtio::vsock::packet::{Header, HDR_SIZE};
use skiff_devices::virtio::vsock::Vsock;
use skiff_devices::{BusDevice, IrqTrigger};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("skiff-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        let l = UnixListener::bind(d.join("v.sock_1")).expect("bind");
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
        d
    })
}

fn take<'a>(u: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = u.split_at(n.min(u.len()));
    *u = b;
    a
}

fuzz_target!(|data: &[u8]| {
    // The parser alone.
    let _ = Header::from_slice(data);

    let uds = dir().join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
    let mut el = EventLoop::new().expect("event loop");
    let vsock = Vsock::new(3, &uds, &mut el).expect("vsock");
    let mut t = MmioTransport::new(Box::new(vsock), mem.clone(), IrqTrigger::none()).expect("t");
    let mut drv = MockDriver::probe(&mut t, mem, 3, 16).expect("probe");
    for _ in 0..4 {
        let _ = drv.add_writable(0, &[HDR_SIZE as u32, 256]);
    }

    let mut u = data;
    for _ in 0..64 {
        let ctrl = match take(&mut u, 1) {
            [c] => *c,
            _ => break,
        };
        let len = take(&mut u, 1).first().copied().unwrap_or(0) as usize
            + HDR_SIZE * usize::from(ctrl & 1);
        let mut bytes = take(&mut u, len).to_vec();
        if ctrl & 2 != 0 && bytes.len() >= 32 {
            // Make the header plausible so the connection paths are reached.
            bytes[0..8].copy_from_slice(&3u64.to_le_bytes());
            bytes[8..16].copy_from_slice(&2u64.to_le_bytes());
            bytes[20..24].copy_from_slice(&(u32::from(ctrl >> 7)).to_le_bytes());
            bytes[28..30].copy_from_slice(&1u16.to_le_bytes());
            bytes[30] %= 8;
            bytes[31] = 0;
        }
        let nseg = usize::from((ctrl >> 2) & 7);
        let cuts: Vec<usize> = take(&mut u, nseg).iter().map(|&c| usize::from(c)).collect();
        match ctrl & 0x60 {
            0x60 => {
                // Rx buffers of arbitrary shape (or readable where writable is expected).
                let lens: Vec<u32> = cuts.iter().map(|&c| c as u32 * 4).collect();
                if ctrl & 0x10 != 0 {
                    let _ = drv.add_readable(0, &bytes, &cuts);
                } else if !lens.is_empty() {
                    let _ = drv.add_writable(0, &lens);
                }
                t.write(0x50, &0u32.to_le_bytes());
            }
            0x40 => {
                // A tx chain with a device-writable or out-of-memory segment in it.
                let segs = [
                    Seg {
                        addr: 0x10_0000,
                        len: bytes.len() as u32,
                        write: false,
                    },
                    Seg {
                        addr: (1 << 40) * u64::from(ctrl & 0x10),
                        len: 64,
                        write: ctrl & 0x80 != 0,
                    },
                ];
                let _ = drv.add_chain(1, &segs);
                t.write(0x50, &1u32.to_le_bytes());
            }
            _ => {
                let _ = drv.add_readable(1, &bytes, &cuts);
                t.write(0x50, &1u32.to_le_bytes());
            }
        }
        let _ = el.run_once(Some(Duration::ZERO));
        let _ = drv.take_used(0);
        let _ = drv.take_used(1);
        // Garbage to a register now and then.
        if ctrl == 0xff {
            t.write(0x70, &0u32.to_le_bytes());
        }
    }
    let _ = el.run_once(Some(Duration::ZERO));
});
