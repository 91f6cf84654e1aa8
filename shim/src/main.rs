//! `containerd-shim-skiff-v2`: the containerd runtime v2 shim (`io.containerd.skiff.v2`) that
//! runs each container in its own Skiff microVM.
//!
//! containerd starts one shim per container. `start` spawns the shim server (a daemon with the
//! same binary) and prints its `unix://` address; the server serves the Task API (v2, ttrpc)
//! and runs the VM **inside its own process** (the VMM is a library here), so a crashed or
//! killed shim cannot leak a VM. `delete` cleans up after a server that died.
//!
//! Kernel, initramfs and VM size: see [`config`] (defaults, `/etc/skiff/skiff.toml`,
//! `SKIFF_*` environment, containerd runtime options, `io.skiff.vm.*` annotations).

mod config;
mod io;
mod netns;
mod shim;
mod spec;
mod task;

/// The runtime name containerd uses for this shim.
pub const RUNTIME_ID: &str = "io.containerd.skiff.v2";

fn main() {
    // The network namespace holder (see `netns`): no shim machinery at all.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(netns::HOLDER_ARG)) {
        netns::holder_main();
    }
    containerd_shim::run::<shim::Service>(RUNTIME_ID, None);
}
