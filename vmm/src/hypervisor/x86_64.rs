//! x86_64 extension trait and register types (no backend types here).

use super::{Result, Vcpu};

/// General-purpose registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register, in the unpacked form KVM uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl Segment {
    /// Unpacks a GDT entry into a segment register for `selector`.
    pub fn from_gdt_entry(entry: u64, selector: u16) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
        let g = ((entry >> 55) & 1) as u8;
        let present = ((entry >> 47) & 1) as u8;
        Segment {
            base,
            // With 4 KiB granularity the limit counts pages.
            limit: if g == 1 {
                ((limit as u32) << 12) | 0xfff
            } else {
                limit as u32
            },
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            present,
            dpl: ((entry >> 45) & 3) as u8,
            db: ((entry >> 54) & 1) as u8,
            s: ((entry >> 44) & 1) as u8,
            l: ((entry >> 53) & 1) as u8,
            g,
            avl: ((entry >> 52) & 1) as u8,
            unusable: u8::from(present == 0),
        }
    }
}

/// A descriptor table register (GDTR/IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Special registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// One CPUID leaf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// x86_64-only vCPU operations.
pub trait VcpuX86_64: Vcpu {
    /// Reads the general-purpose registers.
    fn regs(&self) -> Result<Regs>;
    /// Writes the general-purpose registers.
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    /// Reads the special registers.
    fn sregs(&self) -> Result<Sregs>;
    /// Writes the special registers (other fields keep their current values).
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()>;
    /// Sets the FPU to its reset state (FCW 0x37f, MXCSR 0x1f80).
    fn reset_fpu(&mut self) -> Result<()>;
    /// Writes MSRs; returns how many the hypervisor accepted (it may refuse some).
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<usize>;
    /// The CPUID leaves the hypervisor supports, to be filtered by the caller.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// Sets the CPUID this vCPU reports.
    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()>;
    /// Configures the local APIC's LINT0 as ExtINT and LINT1 as NMI (what a BIOS would do).
    fn setup_lapic_lints(&mut self) -> Result<()>;
}

/// x86_64-only VM operations.
pub trait VmX86_64: super::Vm {
    /// Creates the legacy i8254 PIT (a Linux guest calibrates against it). Tiny guests skip it:
    /// it is the costliest setup call.
    fn create_pit(&self) -> Result<()>;
}
