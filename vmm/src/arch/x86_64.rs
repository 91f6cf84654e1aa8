//! x86_64 boot glue: memory layout, kernel/initrd/cmdline/tables through `firmware-free-boot`,
//! and boot registers through [`VcpuX86_64`].

use firmware_free_boot::x86_64::{self as fw, layout, Entry};
use vm_memory::GuestMemoryMmap;

use super::{BootConfig, Error};
use crate::hypervisor::x86_64::{CpuidEntry, DescriptorTable, Regs, Segment, Sregs};
use crate::hypervisor::VcpuX86_64;

/// Most vCPUs the boot tables describe.
/// The boot timer's I/O port (the guest writes a phase number there).
pub const BOOT_TIMER_ADDR: u64 = skiff_devices::legacy::BOOT_TIMER_PORT;

pub const MAX_CPUS: u32 = fw::MAX_CPUS;

/// RAM layout `(guest address, size)`.
pub fn memory_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    fw::memory_regions(mem_bytes)
}

/// Base of the virtio-mmio windows (in the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (Linux maps 4 KiB per `virtio_mmio.device=` entry).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// ISA IRQs free for virtio-mmio devices (COM1 uses 4; 0, 1, 2, 8 are legacy).
const VIRTIO_IRQS: [u32; 10] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15];

/// The virtio-mmio slot `slot`, or `None` past the last one.
pub fn virtio_slot(slot: u32) -> Option<super::VirtioSlot> {
    VIRTIO_IRQS
        .get(slot as usize)
        .map(|&irq| super::VirtioSlot {
            addr: VIRTIO_MMIO_BASE + u64::from(slot) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq,
        })
}

/// The command line with one `virtio_mmio.device=<size>@<addr>:<irq>` entry per slot.
pub fn cmdline_with_virtio(cmdline: &str, slots: &[super::VirtioSlot]) -> String {
    let mut s = cmdline.to_string();
    for v in slots {
        s.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            v.size / 1024,
            v.addr,
            v.irq
        ));
    }
    s
}

/// What the vCPUs need to start.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Entry point and mode.
    pub entry: Entry,
    /// Whether the kernel is Linux (it then gets a PIT to calibrate against).
    pub is_linux: bool,
    /// CR3 for 64-bit entry.
    pub cr3: u64,
}

/// Lays the guest out: kernel, command line, initrd, GDT, page tables, MP table, PVH start info
/// or zero page.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<BootInfo, Error> {
    let kernel = fw::load_kernel(mem, &cfg.kernel).map_err(|e| match e {
        firmware_free_boot::Error::Kernel(m) => {
            firmware_free_boot::Error::Kernel(format!("{}: {m}", cfg.kernel_path.display()))
        }
        other => other,
    })?;
    let cmdline = cmdline_with_virtio(&cfg.cmdline, &cfg.virtio);
    fw::load_cmdline(mem, &cmdline)?;
    let regions = memory_regions(cfg.mem_bytes);
    let initrd = match &cfg.initrd {
        Some(bytes) => {
            let max = fw::initrd_max_addr(&kernel);
            let addr = fw::load_initrd(mem, bytes, kernel.kernel_end, max)?;
            Some((addr, bytes.len() as u64))
        }
        None => None,
    };
    fw::write_gdt(mem)?;
    let cr3 = fw::write_page_tables(mem)?;
    fw::write_mptable(mem, cfg.cpus)?;
    match kernel.entry {
        Entry::Pvh(_) => {
            fw::configure_pvh(mem, &regions, initrd)?;
        }
        Entry::Linux64(_) => {
            fw::configure_zero_page(mem, &kernel, cmdline.len(), &regions, initrd)?;
        }
    }
    Ok(BootInfo {
        entry: kernel.entry,
        is_linux: kernel.is_linux,
        cr3,
    })
}

fn cpuid_for(supported: &[CpuidEntry], id: u32, cpus: u32) -> Vec<CpuidEntry> {
    let mut v = supported.to_vec();
    for e in v.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC id and logical processor count; hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((cpus.min(255)) << 16);
                e.ecx |= 1 << 31;
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX is valid
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    v
}

/// MSRs a BIOS would leave in a known state. The hypervisor may refuse some (PVM refuses a few);
/// that is not an error.
const BOOT_MSRS: [(u32, u64); 10] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
];

/// Sets CPUID, MSRs, LAPIC LINTs, and for the boot CPU the entry registers.
pub fn configure_vcpu<V: VcpuX86_64>(
    vcpu: &mut V,
    id: u32,
    boot: &BootInfo,
    cpus: u32,
) -> crate::hypervisor::Result<()> {
    let supported = vcpu.supported_cpuid()?;
    vcpu.set_cpuid(&cpuid_for(&supported, id, cpus))?;
    let accepted = vcpu.set_msrs(&BOOT_MSRS)?;
    if accepted < BOOT_MSRS.len() {
        tracing::debug!(accepted, "hypervisor accepted only some boot MSRs");
    }
    vcpu.setup_lapic_lints()?;
    if id != 0 {
        // Application processors wait for INIT/SIPI from the boot CPU (in-kernel LAPIC).
        return Ok(());
    }
    vcpu.reset_fpu()?;
    let gdt = |i: usize, sel: u16| Segment::from_gdt_entry(fw::GDT[i], sel);
    let data = gdt(2, fw::SEL_DATA);
    let mut sregs = Sregs {
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: gdt(3, fw::SEL_TSS),
        gdt: DescriptorTable {
            base: layout::GDT_ADDR,
            limit: (fw::GDT.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: layout::IDT_ADDR,
            limit: 7,
        },
        ..vcpu.sregs()?
    };
    let mut regs = Regs {
        rflags: 2,
        ..Default::default()
    };
    match boot.entry {
        Entry::Pvh(entry) => {
            sregs.cs = gdt(4, fw::SEL_CODE32);
            sregs.cr0 = fw::CR0_PE | fw::CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = layout::PVH_INFO_ADDR;
        }
        Entry::Linux64(entry) => {
            sregs.cs = gdt(1, fw::SEL_CODE64);
            sregs.cr0 = fw::CR0_PE | fw::CR0_ET | fw::CR0_PG;
            sregs.cr3 = boot.cr3;
            sregs.cr4 = fw::CR4_PAE;
            sregs.efer = fw::EFER_LME | fw::EFER_LMA;
            regs.rip = entry;
            regs.rsi = layout::ZERO_PAGE_ADDR;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_on_the_command_line() {
        let slots: Vec<_> = (0..2).filter_map(virtio_slot).collect();
        assert_eq!(
            cmdline_with_virtio("console=ttyS0", &slots),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert!(virtio_slot(10).is_none());
    }

    #[test]
    fn cpuid_carries_apic_id_and_hypervisor_bit() {
        let sup = vec![
            CpuidEntry {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let v = cpuid_for(&sup, 3, 4);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!((v[0].ebx >> 16) & 0xff, 4);
        assert_ne!(v[0].ecx & (1 << 31), 0);
        assert_eq!(v[1].edx, 3);
    }
}
