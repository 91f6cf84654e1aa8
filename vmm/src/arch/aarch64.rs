//! aarch64 boot glue: memory layout, kernel/initrd/FDT through `firmware-free-boot`, and boot
//! registers through [`VcpuAarch64`].
//!
//! The boot CPU enters the `Image` with X0 = FDT address and PSTATE = EL1h with DAIF masked;
//! secondaries only get their MPIDR and wait, powered off, for the guest's PSCI `CPU_ON`.

pub use firmware_free_boot::aarch64::VirtioMmioDevice;
use firmware_free_boot::aarch64::{self as fw, layout, BootParams};
use vm_memory::GuestMemoryMmap;

use super::{BootConfig, Error};
use crate::hypervisor::aarch64::{Reg, SysReg, BOOT_PSTATE};
use crate::hypervisor::VcpuAarch64;

/// Most vCPUs the layout describes (GICv3 redistributor room).
pub const MAX_CPUS: u32 = fw::MAX_CPUS;

/// Guest physical address of the first byte of RAM.
pub const RAM_START: u64 = layout::RAM_START;
/// 16550 UART MMIO base (reg-shift 0).
pub const SERIAL_ADDR: u64 = layout::SERIAL_ADDR;
/// UART MMIO window size.
pub const SERIAL_SIZE: u64 = layout::SERIAL_SIZE;
/// UART interrupt (SPI number, for [`crate::hypervisor::Vm::set_irq_line`]).
pub const SERIAL_SPI: u32 = layout::SERIAL_SPI;
/// Boot timer MMIO register base.
pub const BOOT_TIMER_ADDR: u64 = layout::BOOT_TIMER_ADDR;
/// Boot timer MMIO window size.
pub const BOOT_TIMER_SIZE: u64 = layout::BOOT_TIMER_SIZE;
/// First virtio-mmio slot base.
pub const VIRTIO_MMIO_BASE: u64 = layout::VIRTIO_MMIO_BASE;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = layout::VIRTIO_MMIO_SIZE;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOTS: u32 = layout::VIRTIO_MMIO_SLOTS;
/// SPI of virtio-mmio slot 0 (slot `n` uses this + `n`).
pub const VIRTIO_MMIO_SPI_BASE: u32 = layout::VIRTIO_MMIO_SPI_BASE;

/// The virtio-mmio device in slot `slot` (address, size, SPI), or `None` past the last slot.
pub fn virtio_mmio_slot(slot: u32) -> Option<VirtioMmioDevice> {
    layout::virtio_mmio_slot(slot)
}

/// RAM layout `(guest address, size)`.
pub fn memory_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    fw::memory_regions(mem_bytes)
}

/// What the vCPUs need to start.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Kernel entry (boot CPU PC).
    pub entry: u64,
    /// FDT address (boot CPU X0).
    pub fdt_addr: u64,
}

/// Lays the guest out (kernel, initrd, FDT with `cfg.virtio` described).
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<BootInfo, Error> {
    let virtio: Vec<VirtioMmioDevice> = cfg
        .virtio
        .iter()
        .map(|s| VirtioMmioDevice {
            addr: s.addr,
            size: s.size,
            spi: s.irq,
        })
        .collect();
    load_with_devices(mem, cfg, &virtio)
}

/// The virtio-mmio slot `slot` in the VMM's neutral form.
pub fn virtio_slot(slot: u32) -> Option<super::VirtioSlot> {
    virtio_mmio_slot(slot).map(|d| super::VirtioSlot {
        addr: d.addr,
        size: d.size,
        irq: d.spi,
    })
}

/// Lays the guest out and describes `virtio` (see [`virtio_mmio_slot`]) in the FDT.
pub fn load_with_devices(
    mem: &GuestMemoryMmap,
    cfg: &BootConfig,
    virtio: &[VirtioMmioDevice],
) -> Result<BootInfo, Error> {
    let b = fw::load(
        mem,
        &BootParams {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            cpus: cfg.cpus,
            mem_bytes: cfg.mem_bytes,
            virtio,
        },
    )
    .map_err(|e| match e {
        firmware_free_boot::Error::Kernel(m) => {
            firmware_free_boot::Error::Kernel(format!("{}: {m}", cfg.kernel_path.display()))
        }
        other => other,
    })?;
    Ok(BootInfo {
        entry: b.entry,
        fdt_addr: b.fdt_addr,
    })
}

/// Sets vCPU `id`'s MPIDR, and for the boot CPU (0) the entry registers.
pub fn configure_vcpu<V: VcpuAarch64>(
    vcpu: &mut V,
    id: u32,
    boot: &BootInfo,
) -> crate::hypervisor::Result<()> {
    vcpu.set_sys_reg(SysReg::MpidrEl1, fw::mpidr(id))?;
    if id != 0 {
        // Secondaries start through PSCI CPU_ON.
        return Ok(());
    }
    vcpu.set_reg(Reg::Pstate, BOOT_PSTATE)?;
    vcpu.set_reg(Reg::X(0), boot.fdt_addr)?;
    for x in 1..=3 {
        vcpu.set_reg(Reg::X(x), 0)?;
    }
    vcpu.set_reg(Reg::Pc, boot.entry)
}
