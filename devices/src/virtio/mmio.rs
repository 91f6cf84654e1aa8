//! virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2 §4.2.2).
//!
//! One [`MmioTransport`] serves one device in a [`MMIO_WINDOW_SIZE`]-byte window on the MMIO
//! [`crate::Bus`]; it sees offsets relative to its base. Everything the guest writes is
//! untrusted: bad queue sizes or addresses leave the queue not ready, an incomplete setup at
//! DRIVER_OK sets DEVICE_NEEDS_RESET, and unknown offsets or access sizes are ignored.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{status, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::{BusDevice, IrqTrigger};

/// Size of one virtio-mmio window (registers at 0x000..0x100, config space from 0x100).
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout version served (2 = modern).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("SKIF").
pub const MMIO_VENDOR_ID: u32 = 0x4649_4b53;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device declared a queue maximum that is 0, above 32768 or not a power of two.
    #[error("device queue {index} has invalid maximum size {max}")]
    InvalidQueueMax {
        /// Queue index.
        index: usize,
        /// Declared maximum.
        max: u16,
    },
    /// The device offers no queue or does not offer VIRTIO_F_VERSION_1.
    #[error("device is not a modern virtio device (no queues or no VIRTIO_F_VERSION_1)")]
    NotModern,
    /// A saved transport state does not fit this device or is damaged.
    #[error("cannot restore the virtio-mmio transport: {0}")]
    BadState(String),
}

/// Version of [`MmioTransport::save_state`]'s layout.
const SAVE_VERSION: u8 = 1;

/// Per-queue driver-written configuration.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max: u16) -> Self {
        QueueConfig {
            max,
            size: max,
            ..Default::default()
        }
    }

    /// Builds a ready `virtio_queue::Queue` if the configuration is valid for `mem`.
    fn build(&self, mem: &GuestMemoryMmap) -> Option<Queue> {
        let mut q = Queue::new(self.max).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

/// A virtio device behind a virtio-mmio (version 2) register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

impl MmioTransport {
    /// Wraps `device`; `mem` is the guest's memory, `irq` the (edge) interrupt of this window.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqTrigger,
    ) -> Result<Self, Error> {
        let maxes = device.queue_max_sizes();
        if maxes.is_empty() || device.avail_features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::NotModern);
        }
        let mut queues = Vec::with_capacity(maxes.len());
        for (index, &max) in maxes.iter().enumerate() {
            if Queue::new(max).is_err() {
                return Err(Error::InvalidQueueMax { index, max });
            }
            queues.push(QueueConfig::new(max));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: VirtioInterrupt::new(irq),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        })
    }

    /// The device status register's value.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The driver-visible state of the transport, for a snapshot taken while no vCPU runs and
    /// the device is idle (every chain it took from a queue was returned).
    ///
    /// Layout (little endian): version 1 (u8), status, driver features (u64), device and
    /// driver feature selectors, queue selector, config generation, activated (u8),
    /// InterruptStatus, queue count, then per queue size (u16), ready (u8) and the three ring
    /// addresses (u64). Queue positions are not stored: they are the used rings' indices in
    /// guest memory (see [`MmioTransport::restore`]).
    pub fn save_state(&self) -> Vec<u8> {
        let mut o = vec![SAVE_VERSION];
        o.extend_from_slice(&self.status.to_le_bytes());
        o.extend_from_slice(&self.driver_features.to_le_bytes());
        o.extend_from_slice(&self.device_features_sel.to_le_bytes());
        o.extend_from_slice(&self.driver_features_sel.to_le_bytes());
        o.extend_from_slice(&self.queue_sel.to_le_bytes());
        o.extend_from_slice(&self.config_generation.to_le_bytes());
        o.push(u8::from(self.activated));
        o.extend_from_slice(&self.interrupt.status().to_le_bytes());
        o.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for q in &self.queues {
            o.extend_from_slice(&q.size.to_le_bytes());
            o.push(u8::from(q.ready));
            o.extend_from_slice(&q.desc.to_le_bytes());
            o.extend_from_slice(&q.driver.to_le_bytes());
            o.extend_from_slice(&q.device.to_le_bytes());
        }
        o
    }

    /// A transport for `device` in the state [`MmioTransport::save_state`] saved, in a VM
    /// restored with its memory `mem`. An activated one activates `device` again with its
    /// queues where the driver left them: the device had returned every chain it took, so
    /// both the next available and the next used position are the used ring's index. A
    /// pending InterruptStatus is raised again.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqTrigger,
        state: &[u8],
    ) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadState(why.to_string());
        let mut t = MmioTransport::new(device, mem, irq)?;
        let mut r = state;
        let mut take = |n: usize| -> Result<&[u8], Error> {
            if r.len() < n {
                return Err(bad("the saved transport state is truncated"));
            }
            let (h, rest) = r.split_at(n);
            r = rest;
            Ok(h)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let u64_at = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            u64::from_le_bytes(a)
        };
        if take(1)?[0] != SAVE_VERSION {
            return Err(bad("the saved transport state has another version"));
        }
        t.status = u32_at(take(4)?);
        t.driver_features = u64_at(take(8)?);
        t.device_features_sel = u32_at(take(4)?);
        t.driver_features_sel = u32_at(take(4)?);
        t.queue_sel = u32_at(take(4)?);
        t.config_generation = u32_at(take(4)?);
        let activated = take(1)?[0] != 0;
        let interrupt_status = u32_at(take(4)?);
        if u32_at(take(4)?) as usize != t.queues.len() {
            return Err(bad("the saved transport has another number of queues"));
        }
        for i in 0..t.queues.len() {
            let b = take(2 + 1 + 24)?;
            let q = &mut t.queues[i];
            q.size = u16::from_le_bytes([b[0], b[1]]);
            q.ready = b[2] != 0;
            q.desc = u64_at(&b[3..]);
            q.driver = u64_at(&b[11..]);
            q.device = u64_at(&b[19..]);
        }
        if !r.is_empty() {
            return Err(bad("the saved transport state has trailing bytes"));
        }
        if activated {
            if t.status & status::DRIVER_OK == 0 {
                return Err(bad("an activated transport without DRIVER_OK"));
            }
            let mut queues = Vec::with_capacity(t.queues.len());
            for qc in &t.queues {
                let mut q = qc
                    .ready
                    .then(|| qc.build(&t.mem))
                    .flatten()
                    .ok_or_else(|| bad("an activated transport with an invalid queue"))?;
                // The used ring: flags (u16), then idx (u16).
                let idx: u16 = t
                    .mem
                    .read_obj(GuestAddress(qc.device.wrapping_add(2)))
                    .map_err(|_| bad("a used ring outside guest memory"))?;
                q.set_next_avail(idx);
                q.set_next_used(idx);
                queues.push(q);
            }
            t.device.ack_features(t.driver_features);
            t.device
                .activate(t.mem.clone(), queues, t.interrupt.clone())
                .map_err(|e| Error::BadState(format!("the device did not restart: {e}")))?;
            t.activated = true;
        }
        if interrupt_status != 0 {
            // The guest had not acknowledged it yet: raise it again (a second edge is harmless).
            if interrupt_status & super::INT_USED_RING != 0 {
                t.interrupt.signal_used_queue();
            }
            if interrupt_status & super::INT_CONFIG != 0 {
                t.interrupt.signal_config_change();
            }
        }
        Ok(t)
    }

    /// Whether the device was activated (DRIVER_OK with a valid setup).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The interrupt shared with the device (InterruptStatus lives here).
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max);
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is ignored.
        if v & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = v,
                "virtio-mmio: status bits cleared"
            );
            return;
        }
        let added = v & !self.status;
        let mut new = v;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let ok = self.status & status::DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if ok {
                self.device.ack_features(self.driver_features);
            } else {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 || self.activated {
                new &= !status::DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for qc in &self.queues {
            match qc.ready.then(|| qc.build(&self.mem)).flatten() {
                Some(q) => queues.push(q),
                None => {
                    crate::warn_limited!(
                        "virtio-mmio: DRIVER_OK with a queue not ready or invalid"
                    );
                    self.needs_reset();
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::warn_limited!("virtio-mmio: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_setup_allowed() {
                    return;
                }
                let Some(q) = self.selected() else { return };
                if q.ready {
                    return;
                }
                match offset {
                    // Validated at QueueReady time (an invalid size leaves the queue not ready).
                    reg::QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
                    reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                    reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                    reg::QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
                    reg::QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
                    reg::QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
                    _ => set_high(&mut q.device, v),
                }
            }
            reg::QUEUE_READY => {
                if !self.queue_setup_allowed() {
                    return;
                }
                let mem = self.mem.clone();
                let Some(q) = self.selected() else { return };
                q.ready = v == 1 && q.build(&mem).is_some();
                if v == 1 && !q.ready {
                    tracing::debug!("virtio-mmio: invalid queue setup left not ready");
                }
            }
            reg::QUEUE_NOTIFY => {
                if self.activated && self.status & status::DEVICE_NEEDS_RESET == 0 {
                    // Only the queue index (no VIRTIO_F_NOTIFICATION_DATA).
                    let index = v & 0xffff;
                    if (index as usize) < self.queues.len() {
                        self.device.queue_notify(index);
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => tracing::trace!(offset, "virtio-mmio: write to unknown register"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(MmioTransport::save_state(self))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(d) if offset & 3 == 0 => *d = self.read_reg(offset).to_le_bytes(),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if let (Ok(d), 0) = (<[u8; 4]>::try_from(data), offset & 3) {
            self.write_reg(offset, u32::from_le_bytes(d));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::virtio::mock::MockDriver;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Log {
        events: Vec<String>,
        interrupt: Option<VirtioInterrupt>,
        /// (next avail, next used) of each queue at the last activation.
        positions: Vec<(u16, u16)>,
    }

    struct Fake(Arc<Mutex<Log>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn ack_features(&mut self, f: u64) {
            self.0.lock().unwrap().events.push(format!("ack {f:#x}"));
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            interrupt: VirtioInterrupt,
        ) -> Result<(), super::super::Error> {
            let mut l = self.0.lock().unwrap();
            let sizes: Vec<u16> = queues.iter().map(|q| q.size()).collect();
            l.events.push(format!("activate {sizes:?}"));
            l.positions = queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect();
            l.interrupt = Some(interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, index: u32) {
            self.0
                .lock()
                .unwrap()
                .events
                .push(format!("notify {index}"));
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().events.push("reset".into());
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Log>>, Arc<Mutex<u32>>) {
        setup_on(mem())
    }

    fn setup_on(m: GuestMemoryMmap) -> (MmioTransport, Arc<Mutex<Log>>, Arc<Mutex<u32>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irqs = Arc::new(Mutex::new(0));
        let i2 = irqs.clone();
        let t = MmioTransport::new(
            Box::new(Fake(log.clone())),
            m,
            IrqTrigger::new(move || *i2.lock().unwrap() += 1),
        )
        .unwrap();
        (t, log, irqs)
    }

    #[test]
    fn linux_probe_sequence_notify_interrupt_and_reset() {
        let (mut t, log, irqs) = setup();
        assert_eq!(rd(&mut t, 0x0), MMIO_MAGIC);
        assert_eq!(rd(&mut t, 0x4), 2);
        assert_eq!(rd(&mut t, 0x8), 42);
        assert_eq!(rd(&mut t, 0xb0), u32::MAX, "no shared memory region");
        let drv = MockDriver::probe(&mut t, mem(), 2, 256).unwrap();
        assert_eq!(drv.queues[0].size, 16);
        assert_eq!(drv.queues[1].size, 8);
        assert!(t.is_activated());
        assert_eq!(rd(&mut t, 0x70), 0xf);
        // Config space at 0x100, any access size.
        let mut c = [0u8; 2];
        t.read(0x104, &mut c);
        assert_eq!(c, [4, 5]);
        wr(&mut t, 0x50, 1);
        wr(&mut t, 0x50, 7); // no such queue: ignored
        let int = log.lock().unwrap().interrupt.clone().unwrap();
        int.signal_used_queue();
        assert_eq!(*irqs.lock().unwrap(), 1);
        assert_eq!(rd(&mut t, 0x60), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
        // Queue setup is frozen after DRIVER_OK.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, 0x44), 0);
        assert_eq!(
            log.lock().unwrap().events,
            vec!["ack 0x100000000", "activate [16, 8]", "notify 1", "reset"]
        );
        // The device can be probed again after a reset.
        MockDriver::probe(&mut t, mem(), 2, 4).unwrap();
        assert!(t.is_activated());
    }

    #[test]
    fn save_and_restore_reactivate_the_device_where_the_driver_left_it() {
        let m = mem();
        let (mut t, _, _) = setup_on(m.clone());
        let drv = MockDriver::probe(&mut t, m.clone(), 2, 256).unwrap();
        // The device had used 5 chains of queue 0 and 3 of queue 1 (the rings' idx fields).
        m.write_obj(5u16, GuestAddress(drv.queues[0].used + 2))
            .unwrap();
        m.write_obj(3u16, GuestAddress(drv.queues[1].used + 2))
            .unwrap();
        t.interrupt().signal_used_queue();
        let saved = t.save_state();
        let (log2, irqs2) = (
            Arc::new(Mutex::new(Log::default())),
            Arc::new(Mutex::new(0)),
        );
        let i2 = irqs2.clone();
        let mut r = MmioTransport::restore(
            Box::new(Fake(log2.clone())),
            m.clone(),
            IrqTrigger::new(move || *i2.lock().unwrap() += 1),
            &saved,
        )
        .unwrap();
        assert!(r.is_activated());
        assert_eq!(rd(&mut r, 0x70), 0xf);
        assert_eq!(
            rd(&mut r, 0x60),
            1,
            "the unacknowledged interrupt is pending again"
        );
        assert_eq!(*irqs2.lock().unwrap(), 1, "and raised again");
        let l = log2.lock().unwrap();
        assert_eq!(l.events, vec!["ack 0x100000000", "activate [16, 8]"]);
        assert_eq!(l.positions, vec![(5, 5), (3, 3)]);
        drop(l);
        assert_eq!(
            r.save_state(),
            saved,
            "a restored transport saves the same state"
        );
        // Damaged states: every truncation, trailing bytes, another queue count.
        for cut in 0..saved.len() {
            let (dev, _) = (Box::new(Fake(Arc::new(Mutex::new(Log::default())))), ());
            assert!(
                MmioTransport::restore(dev, m.clone(), IrqTrigger::new(|| {}), &saved[..cut])
                    .is_err()
            );
        }
        let mut long = saved.clone();
        long.push(0);
        let dev = Box::new(Fake(Arc::new(Mutex::new(Log::default()))));
        assert!(MmioTransport::restore(dev, m.clone(), IrqTrigger::new(|| {}), &long).is_err());
        // A used ring outside guest memory (a hostile or damaged snapshot).
        let (mut t2, _, _) = setup_on(m.clone());
        MockDriver::probe(&mut t2, m.clone(), 2, 256).unwrap();
        let mut st = t2.save_state();
        let q0_device = 1 + 4 + 8 + 4 * 4 + 1 + 4 + 4 + 2 + 1 + 16;
        st[q0_device..q0_device + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        let dev = Box::new(Fake(Arc::new(Mutex::new(Log::default()))));
        assert!(MmioTransport::restore(dev, m, IrqTrigger::new(|| {}), &st).is_err());
    }

    #[test]
    fn invalid_setups_never_activate_or_panic() {
        let (mut t, log, _) = setup();
        // Features without VERSION_1: FEATURES_OK refused.
        wr(&mut t, 0x70, 1);
        wr(&mut t, 0x70, 3);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        // Unknown feature bit: refused too.
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 3);
        wr(&mut t, 0x70, 0xb);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        assert_eq!(rd(&mut t, 0x70), 0xb);
        // Queue 0: size not a power of two; queue 1: rings outside memory.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 3);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        wr(&mut t, 0x38, 32); // above the maximum
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x30, 1);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x84, 0x10);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        // Misaligned descriptor table.
        wr(&mut t, 0x84, 0);
        wr(&mut t, 0x80, 0x1001);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        // DRIVER_OK with queue 1 not ready: DEVICE_NEEDS_RESET, config interrupt, no activation.
        wr(&mut t, 0x70, 0xf);
        assert!(!t.is_activated());
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);
        wr(&mut t, 0x50, 0);
        assert!(log
            .lock()
            .unwrap()
            .events
            .iter()
            .all(|e| !e.starts_with("activate")));
        assert!(log
            .lock()
            .unwrap()
            .events
            .iter()
            .all(|e| !e.starts_with("notify")));
        // Garbage at every offset and size.
        for off in (0..MMIO_WINDOW_SIZE + 8).step_by(1) {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut b = vec![0xa5u8; len];
                t.read(off, &mut b);
                if off != 0x70 {
                    t.write(off, &b);
                }
            }
        }
        t.read(u64::MAX, &mut [0u8; 4]);
        t.write(u64::MAX - 1, &[0xff; 4]);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
    }
}
