//! Skiff devices. No hypervisor types: devices see bus offsets and bytes, and raise interrupts
//! through [`IrqTrigger`], a closure the VMM builds over its hypervisor layer.
//!
//! Lock order: the VMM takes at most one device lock at a time (the bus hands out one device
//! per access); devices never call back into the bus.

pub mod bus;
pub mod event_loop;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::Arc;

/// Raises one interrupt (an edge on x86 GSIs / an SPI pulse on aarch64).
#[derive(Clone)]
pub struct IrqTrigger(Arc<dyn Fn() + Send + Sync>);

impl IrqTrigger {
    /// Wraps a closure that raises the interrupt.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        IrqTrigger(Arc::new(f))
    }
    /// A trigger that does nothing (for devices polled by the guest).
    pub fn none() -> Self {
        IrqTrigger(Arc::new(|| {}))
    }
    /// Raises the interrupt.
    pub fn trigger(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqTrigger")
    }
}

impl vm_superio::Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        IrqTrigger::trigger(self);
        Ok(())
    }
}

/// A request from a device to end the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExitRequest {
    /// The guest reset the machine (i8042 pulse reset line).
    Reset,
    /// The guest powered the machine off.
    PowerOff,
}

/// Where devices send exit requests and boot-time stamps.
pub trait EventSink: Send + Sync {
    /// The guest asked to end the VM.
    fn exit_request(&self, req: VmExitRequest);
    /// The guest wrote `value` to the boot timer.
    fn boot_stamp(&self, value: u8);
    /// The guest wrote its first byte to the serial console.
    fn first_serial_byte(&self);
}
