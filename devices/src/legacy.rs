//! Legacy platform devices: 16550 serial console, i8042 reset, boot timer.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;

use crate::{BusDevice, EventSink, IrqTrigger, VmExitRequest};

/// x86 COM1 port base.
pub const COM1_PORT: u64 = 0x3f8;
/// x86 COM1 IRQ.
pub const COM1_IRQ: u32 = 4;
/// x86 i8042 ports (data 0x60 .. command/status 0x64).
pub const I8042_PORT: u64 = 0x60;
/// x86 boot-timer port (Firecracker's convention).
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// Value the guest init writes to the boot timer when userspace starts.
pub const BOOT_STAMP_USERSPACE: u8 = 123;

/// Serial events: reports the first byte the guest sends.
pub struct ConsoleEvents {
    sink: Arc<dyn EventSink>,
    seen: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ConsoleEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleEvents")
    }
}

impl SerialEvents for ConsoleEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        if !self.seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.sink.first_serial_byte();
        }
    }
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

/// The guest's serial console: a 16550 UART whose output goes to a host writer.
pub struct SerialConsole {
    inner: Serial<IrqTrigger, ConsoleEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

impl SerialConsole {
    /// A UART writing to `out`, raising `irq`, reporting to `sink`.
    pub fn new(out: Box<dyn Write + Send>, irq: IrqTrigger, sink: Arc<dyn EventSink>) -> Self {
        let events = ConsoleEvents {
            sink,
            seen: false.into(),
        };
        SerialConsole {
            inner: Serial::with_events(irq, events, out),
        }
    }

    /// Queues console input for the guest (as much as the receive FIFO takes; the rest is the
    /// caller's to offer again once the guest has read); returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes buffered output to the host.
    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }

    /// The UART's registers and receive FIFO, for a snapshot: nine register bytes, then the
    /// FIFO's bytes.
    pub fn save_state(&self) -> Vec<u8> {
        let st = self.inner.state();
        let mut out = vec![
            st.baud_divisor_low,
            st.baud_divisor_high,
            st.interrupt_enable,
            st.interrupt_identification,
            st.line_control,
            st.line_status,
            st.modem_control,
            st.modem_status,
            st.scratch,
        ];
        out.extend_from_slice(&st.in_buffer);
        out
    }

    /// A UART in the state [`SerialConsole::save_state`] saved; `None` when `state` is not one
    /// (too short, or a FIFO longer than the UART's).
    pub fn restore(
        state: &[u8],
        out: Box<dyn Write + Send>,
        irq: IrqTrigger,
        sink: Arc<dyn EventSink>,
    ) -> Option<Self> {
        let (regs, fifo) = (state.get(..9)?, state.get(9..)?);
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: fifo.to_vec(),
        };
        let events = ConsoleEvents {
            sink,
            seen: false.into(),
        };
        let pulse = irq.clone();
        let mut dev = Serial::from_state(&st, irq, events, out)
            .ok()
            .map(|inner| SerialConsole { inner })?;
        // The interrupt edge of a pending condition may have been in flight when the VM was
        // saved: raise it again, or a driver waiting for "transmitter empty" waits forever
        // (a spurious interrupt is harmless: the driver reads IIR and finds nothing).
        const IER: u8 = 1;
        const IER_THR_EMPTY: u8 = 0x02;
        const IIR_THR_EMPTY: u8 = 0x02;
        const IIR_NONE: u8 = 0x01;
        const LCR_DLAB: u8 = 0x80;
        let thr_armed = st.interrupt_enable & IER_THR_EMPTY != 0
            && st.interrupt_identification & IIR_THR_EMPTY == 0
            && st.line_control & LCR_DLAB == 0;
        if thr_armed {
            // Rewriting IER raises "transmitter empty" as a real 16550 does.
            let _ = dev.inner.write(IER, st.interrupt_enable);
        } else if st.interrupt_identification & IIR_NONE == 0 {
            pulse.trigger();
        }
        Some(dev)
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A write error (host stdout closed) must not stop the guest.
            let _ = self.inner.write(off, v);
        }
    }
}

/// Minimal i8042 controller: the only thing guests use it for here is the reset line
/// (command 0xfe on port 0x64), which is how Linux reboots with `reboot=k`. The reset is
/// reported once: a guest pulsing it in a loop until the VMM stops it sends one request.
pub struct I8042 {
    sink: Arc<dyn EventSink>,
    reset_sent: bool,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    /// A controller reporting to `sink`.
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        I8042 {
            sink,
            reset_sent: false,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) && !self.reset_sent {
            self.reset_sent = true;
            self.sink.exit_request(VmExitRequest::Reset);
        }
    }
}

/// Most boot-timer stamps one VM reports (each becomes a timing mark and a log line).
pub const MAX_BOOT_STAMPS: u32 = 16;

/// Boot timer: the guest writes a byte when it reaches a phase (123 = userspace).
///
/// The guest can write it in a loop, so only the first write of each value is reported, and at
/// most [`MAX_BOOT_STAMPS`] of them; the rest are counted ([`BootTimer::dropped`]) and noted in
/// a rate-limited warning. Memory is fixed: a 256-bit set of values seen and two counters.
pub struct BootTimer {
    sink: Arc<dyn EventSink>,
    seen: [u64; 4],
    reported: u32,
    dropped: u64,
}

impl std::fmt::Debug for BootTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootTimer")
    }
}

impl BootTimer {
    /// A boot timer reporting to `sink`.
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        BootTimer {
            sink,
            seen: [0; 4],
            reported: 0,
            dropped: 0,
        }
    }

    /// Writes that were not reported (repeated values, or beyond [`MAX_BOOT_STAMPS`]).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            let (word, bit) = (usize::from(v / 64), 1u64 << (v % 64));
            if self.seen[word] & bit == 0 && self.reported < MAX_BOOT_STAMPS {
                self.seen[word] |= bit;
                self.reported += 1;
                self.sink.boot_stamp(v);
            } else {
                self.dropped = self.dropped.saturating_add(1);
                crate::warn_limited!(
                    value = v,
                    "boot timer: stamp not reported (a repeated value, or more than \
                     {MAX_BOOT_STAMPS} stamps)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<String>>);
    impl EventSink for Rec {
        fn exit_request(&self, r: VmExitRequest) {
            self.0.lock().unwrap().push(format!("{r:?}"));
        }
        fn boot_stamp(&self, v: u8) {
            self.0.lock().unwrap().push(format!("stamp {v}"));
        }
        fn first_serial_byte(&self) {
            self.0.lock().unwrap().push("first".into());
        }
    }

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_bytes_reach_the_host_and_first_byte_is_reported_once() {
        let rec = Arc::new(Rec::default());
        let out = Out::default();
        let mut s = SerialConsole::new(Box::new(out.clone()), IrqTrigger::none(), rec.clone());
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        // Garbage to every register must not panic.
        for off in 0..16u64 {
            s.write(off, &[0xff, 0xff]);
            let mut d = [0u8; 4];
            s.read(off, &mut d);
        }
        s.write(u64::MAX, &[]);
        assert!(out.0.lock().unwrap().starts_with(b"hi\n"));
        assert_eq!(*rec.0.lock().unwrap(), vec!["first".to_string()]);
    }

    #[test]
    fn i8042_reset_and_boot_timer() {
        let rec = Arc::new(Rec::default());
        let mut k = I8042::new(rec.clone());
        k.write(4, &[0xaa]);
        k.write(0, &[0xfe]);
        k.write(4, &[0xfe]);
        let mut t = BootTimer::new(rec.clone());
        t.write(0, &[123]);
        t.write(1, &[5]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec!["Reset".to_string(), "stamp 123".into()]
        );
    }

    #[test]
    fn a_guest_hammering_the_boot_timer_and_reset_gets_bounded_reports() {
        let rec = Arc::new(Rec::default());
        let mut t = BootTimer::new(rec.clone());
        for i in 0..10_000u32 {
            t.write(0, &[(i % 256) as u8]);
        }
        let reports = rec.0.lock().unwrap().clone();
        assert_eq!(reports.len(), MAX_BOOT_STAMPS as usize);
        assert_eq!(reports[0], "stamp 0");
        assert_eq!(t.dropped(), 10_000 - u64::from(MAX_BOOT_STAMPS));
        // A repeated value is reported once, even below the limit.
        let rec = Arc::new(Rec::default());
        let mut t = BootTimer::new(rec.clone());
        for _ in 0..1000 {
            t.write(0, &[123]);
        }
        assert_eq!(*rec.0.lock().unwrap(), vec!["stamp 123".to_string()]);
        // The reset line is reported once however often the guest pulses it.
        let rec = Arc::new(Rec::default());
        let mut k = I8042::new(rec.clone());
        for _ in 0..1000 {
            k.write(4, &[0xfe]);
        }
        assert_eq!(*rec.0.lock().unwrap(), vec!["Reset".to_string()]);
    }
}
