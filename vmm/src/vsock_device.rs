//! Wires the userspace virtio-vsock device (devices crate) into a VM slot: its own event-loop
//! thread for queue and socket work, and a virtio-mmio transport on the MMIO bus.

use std::path::Path;
use std::sync::{Arc, Mutex};

use skiff_devices::event_loop::{EventLoop, RunningLoop};
use skiff_devices::virtio::mmio::MmioTransport;
use skiff_devices::virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
use skiff_devices::BusDevice;

use crate::vm::MmioDeviceFactory;

/// Creates the vsock device for hybrid-vsock sockets at `uds` (host clients connect to `uds`;
/// guest connections to host port P reach listeners at `<uds>_P`) and starts its event loop.
/// Stop the returned loop after the VM ends (it removes `uds`).
pub fn create(uds: &Path) -> Result<(MmioDeviceFactory, RunningLoop), String> {
    let mut el = EventLoop::new().map_err(|e| format!("vsock event loop: {e}"))?;
    let vsock = Vsock::new(DEFAULT_GUEST_CID, uds, &mut el)
        .map_err(|e| format!("vsock device at {}: {e}", uds.display()))?;
    let factory: MmioDeviceFactory = Box::new(move |mem, irq| {
        let t = MmioTransport::new(Box::new(vsock), mem.clone(), irq).map_err(|e| e.to_string())?;
        Ok(Arc::new(Mutex::new(t)) as Arc<Mutex<dyn BusDevice>>)
    });
    // The loop thread is spawned from the caller's (unfiltered) thread: it installs its own
    // seccomp allowlist before serving the guest.
    let running = el
        .spawn_with(|| {
            crate::seccomp::install(crate::seccomp::Kind::Events).map_err(std::io::Error::other)
        })
        .map_err(|e| format!("vsock event loop: {e}"))?;
    Ok((factory, running))
}
