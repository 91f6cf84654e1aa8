//! Skiff's VMM library: the hypervisor layer, per-arch boot glue, the VM runner and timings.
//! The `vmm` binary (`src/main.rs`) is a thin CLI over [`vm::run`].

pub mod arch;
pub mod artifacts;
pub mod boot_slots;
pub mod console;
pub mod console_log;
pub mod fs_device;
pub mod gdb;
pub mod hypervisor;
pub mod net_device;
pub mod passt;
pub mod run;
pub mod run_dir;
pub mod sandbox;
pub mod seccomp;
pub mod settings_file;
pub mod snapshot;
pub mod sys;
pub mod template;
pub mod timings;
pub mod vm;
pub mod vm_control;
pub mod vsock_device;
