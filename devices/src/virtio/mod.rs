//! Virtio devices and their transport.
//!
//! A [`VirtioDevice`] never sees transport registers: it is given guest memory, the guest's
//! [`Queue`]s and a [`VirtioInterrupt`] when the driver finishes setting it up
//! ([`VirtioDevice::activate`]), and is told when the guest kicks a queue
//! ([`VirtioDevice::queue_notify`], called on the vCPU thread). The transport
//! ([`mmio::MmioTransport`]) owns the register file, feature negotiation and queue setup.

pub mod fs;
pub mod mmio;
pub mod mock;
pub mod net;
pub mod virtio_fs;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::IrqTrigger;

/// Feature bit: the device conforms to virtio 1.0 or later (mandatory for virtio-mmio v2).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver gave fewer or more queues than the device has.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// The device could not start its backend.
    #[error("device activation failed: {0}")]
    Activate(String),
}

/// The interrupt a device raises towards its driver. It records the reason in the transport's
/// InterruptStatus register and fires the (edge) [`IrqTrigger`]. Cheap to clone, shared between
/// the transport (vCPU threads) and the device's worker thread.
#[derive(Clone, Debug)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    irq: IrqTrigger,
}

impl VirtioInterrupt {
    /// An interrupt raising `irq`, with InterruptStatus clear.
    pub fn new(irq: IrqTrigger) -> Self {
        VirtioInterrupt {
            status: Arc::new(AtomicU32::new(0)),
            irq,
        }
    }

    /// Signals "used buffer added" (InterruptStatus bit 0).
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Signals "configuration changed" (InterruptStatus bit 1).
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.trigger();
    }

    /// The current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A virtio device, independent of its transport.
///
/// Threading: the transport calls every method on a vCPU thread while holding the transport's
/// lock. Implementations must return quickly: [`VirtioDevice::queue_notify`] in particular should
/// only wake the device's worker (e.g. through an [`crate::event_loop::WakeHandle`]).
pub trait VirtioDevice: Send {
    /// Virtio device type (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers; must include [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`), set before activation.
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space at `offset` into `data` (out of range reads as zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (out of range or read-only writes are ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Starts the device: the driver set DRIVER_OK with valid, ready `queues` (one per entry of
    /// `queue_max_sizes`).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), Error>;
    /// The guest notified queue `index` (vCPU thread: wake a worker, do no I/O here).
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: stop using guest memory and the queues, drop all state
    /// tied to this activation.
    fn reset(&mut self);
}
