//! Per-architecture boot glue: lays the guest out in memory (through `firmware-free-boot`) and
//! sets each vCPU's boot registers (through the hypervisor layer's extension traits).
//!
//! Each arch module exposes the same items:
//! - `const MAX_RAM_BELOW_GAP`, `fn memory_regions(mem_bytes) -> Vec<(u64, u64)>`: RAM layout;
//! - `fn load(mem, &BootConfig) -> Result<BootInfo, Error>`: kernel, initrd, cmdline, tables;
//! - `fn configure_vcpu(vcpu, id, &BootInfo, cpus)`: registers for the boot CPU / secondaries;
//! - `fn devices(...)`: where the platform devices (serial, boot timer, reset) live.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64 as current;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as current;

/// What the user asked to boot.
#[derive(Debug)]
pub struct BootConfig {
    /// Kernel image bytes (vmlinux ELF or bzImage on x86_64; Image on aarch64).
    pub kernel: crate::sys::FileBytes,
    /// Path of the kernel, for error messages.
    pub kernel_path: std::path::PathBuf,
    /// Optional initrd bytes.
    pub initrd: Option<crate::sys::FileBytes>,
    /// Kernel command line (without the virtio-mmio device entries, which are appended).
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// virtio-mmio devices to describe to the guest (x86_64: `virtio_mmio.device=` on the
    /// command line; aarch64: FDT nodes).
    pub virtio: Vec<VirtioSlot>,
}

/// Where one virtio-mmio device lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest physical base of the register window.
    pub addr: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt line (x86_64: GSI; aarch64: SPI number).
    pub irq: u32,
}

/// Errors while laying out the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or configuring failed in firmware-free-boot.
    #[error(transparent)]
    Boot(#[from] firmware_free_boot::Error),
    /// A hypervisor call failed while setting registers.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
}
