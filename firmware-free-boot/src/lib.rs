//! Firmware-free boot: pure functions that lay a Linux guest out in guest memory.
//!
//! Nothing here talks to a hypervisor: every function takes guest memory (`vm-memory`) and
//! returns addresses and register values for the VMM to apply. `aarch64` builds on every host;
//! `x86_64` builds where `linux-loader` offers its x86 loaders (x86_64 hosts).
//!
//! - [`x86_64`]: `vmlinux` through its PVH note (32-bit entry, `hvm_start_info`), or through the
//!   64-bit Linux boot protocol (zero page) for a `bzImage` or an ELF without a PVH note; e820,
//!   GDT, identity-mapped page tables, MP table.
//! - [`aarch64`]: `Image` loading and a flattened device tree built in code.

pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// Errors from laying out a guest. Every message names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be parsed or loaded.
    #[error("kernel image {0}")]
    Kernel(String),
    /// The kernel is for another architecture.
    #[error("kernel image is for the wrong architecture: {0}")]
    WrongArch(String),
    /// The initrd does not fit in guest memory.
    #[error("initrd of {size} bytes does not fit in guest memory (room for {room} bytes; raise --memory)")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Room available.
        room: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Maximum.
        max: usize,
    },
    /// Guest memory is too small for the layout.
    #[error("guest memory too small: {0}")]
    MemoryTooSmall(String),
    /// Too many vCPUs for the boot tables.
    #[error("too many vCPUs for the boot tables: {0}")]
    TooManyCpus(u32),
    /// A write into guest memory failed.
    #[error("writing {what} into guest memory at {addr:#x} failed")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// Building the device tree failed.
    #[error("building the device tree failed: {0}")]
    Fdt(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
