//! Wires the userspace virtio-vsock device (devices crate) into a VM slot: its own event-loop
//! thread for queue and socket work, and a virtio-mmio transport on the MMIO bus.

use std::path::Path;

use skiff_devices::event_loop::{EventLoop, RunningLoop};
use skiff_devices::virtio::vsock::{Vsock, DEFAULT_GUEST_CID};

use crate::vm::MmioDeviceFactory;

/// Creates the vsock device for hybrid-vsock sockets at `uds` (host clients connect to `uds`;
/// guest connections to host port P reach listeners at `<uds>_P`) and starts its event loop.
/// Stop the returned loop after the VM ends (it removes `uds`).
pub fn create(uds: &Path) -> Result<(MmioDeviceFactory, RunningLoop), String> {
    let mut el = EventLoop::new().map_err(|e| format!("vsock event loop: {e}"))?;
    let vsock = Vsock::new(DEFAULT_GUEST_CID, uds, &mut el)
        .map_err(|e| format!("vsock device at {}: {e}", uds.display()))?;
    let factory: MmioDeviceFactory = Box::new(move |mem, irq, saved| {
        // Restored from a snapshot: the guest's connections have no host side any more. The
        // reset is in the guest's event queue before its vCPUs run, so it ends only the
        // connections of the template, never one the restored guest makes.
        let reset = saved.map(|_| vsock.send_transport_reset());
        let t = crate::vm::transport(Box::new(vsock), mem, irq, saved)?;
        if let Some(r) = reset {
            if !r.wait(std::time::Duration::from_secs(2)) {
                return Err("the restored guest has no vsock event buffer for the reset".into());
            }
        }
        Ok(t)
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
