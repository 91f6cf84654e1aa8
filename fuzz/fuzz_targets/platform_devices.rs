//! Guest-reachable: arbitrary port accesses (address, size, value, direction) against the
//! platform bus (16550 serial, i8042, boot timer). Nothing may panic or grow without bound.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use skiff_devices::legacy::{BootTimer, SerialConsole, I8042};
use skiff_devices::{Bus, EventSink, IrqTrigger, VmExitRequest};

struct Null;
impl EventSink for Null {
    fn exit_request(&self, _: VmExitRequest) {}
    fn boot_stamp(&self, _: u8) {}
    fn first_serial_byte(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let sink: Arc<dyn EventSink> = Arc::new(Null);
    let mut bus = Bus::new();
    let serial = SerialConsole::new(Box::new(std::io::sink()), IrqTrigger::none(), sink.clone());
    let _ = bus.insert(0x3f8, 8, Arc::new(Mutex::new(serial)));
    let _ = bus.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(sink.clone()))));
    let _ = bus.insert(0x3f0, 1, Arc::new(Mutex::new(BootTimer::new(sink))));
    // Each access: 2 bytes port (folded near the devices), 1 byte size+direction, 4 bytes value.
    for chunk in data.chunks(7) {
        if chunk.len() < 7 {
            break;
        }
        let port = 0x3e0 + u64::from(u16::from_le_bytes([chunk[0], chunk[1]]) % 0x40);
        let port = if chunk[2] & 0x80 != 0 { port - 0x3e0 + 0x50 } else { port };
        let size = [1usize, 2, 4, 8][usize::from(chunk[2] & 3)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&chunk[3..7]);
        if chunk[2] & 4 != 0 {
            bus.write(port, &buf[..size]);
        } else {
            bus.read(port, &mut buf[..size]);
        }
    }
});
