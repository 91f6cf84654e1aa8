//! aarch64 extension trait and register names (no backend types here).
//!
//! The submodules are plain logic shared by the aarch64 backends and unit-tested on any host:
//! [`esr`] (exception syndromes, MMIO accesses), [`psci`] (PSCI/SMCCC calls), [`sysreg`]
//! (trapped system register accesses), and for backends that see raw exits
//! (Hypervisor.framework) [`exit`] (what each exception exit does to the registers),
//! [`power`] (PSCI CPU power states) and [`vtimer`] (the virtual timer's deadline and mask).

pub mod esr;
pub mod exit;
pub mod power;
pub mod psci;
pub mod sysreg;
pub mod vtimer;

use super::{Result, Vcpu};

/// The aarch64 registers Skiff sets at boot and reads on exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// General-purpose register X0..=X30.
    X(u8),
    /// Program counter.
    Pc,
    /// Saved processor state at boot (CPSR/PSTATE).
    Pstate,
}

impl Reg {
    /// The general-purpose register an instruction's 5-bit register field names, or `None` for
    /// 31 (XZR/WZR in loads, stores and system register moves: reads as 0, writes ignored).
    pub fn from_rt(rt: u8) -> Option<Reg> {
        (rt < 31).then_some(Reg::X(rt))
    }

    /// Whether this names a register that exists (X0..=X30, PC, PSTATE).
    pub fn is_valid(self) -> bool {
        match self {
            Reg::X(n) => n <= 30,
            Reg::Pc | Reg::Pstate => true,
        }
    }
}

/// System registers Skiff sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysReg {
    /// Multiprocessor affinity register.
    MpidrEl1,
}

/// KVM's ONE_REG id of a core register (`KVM_REG_ARM64 | KVM_REG_SIZE_U64 |
/// KVM_REG_ARM_CORE | offset in struct kvm_regs / 4`): X0..X30, then SP, PC, PSTATE in
/// `user_pt_regs`. Plain numbers (the KVM backend uses them; tested on any host).
pub fn kvm_core_reg_id(reg: Reg) -> u64 {
    const CORE: u64 = 0x6030_0000_0010_0000;
    let index = match reg {
        Reg::X(n) => u64::from(n),
        Reg::Pc => 32,
        Reg::Pstate => 33,
    };
    // 8 bytes per register, counted in 32-bit words.
    CORE | (index * 2)
}

/// KVM's ONE_REG id of a system register (`KVM_REG_ARM64 | KVM_REG_SIZE_U64 |
/// KVM_REG_ARM64_SYSREG | op0:op1:CRn:CRm:op2`).
pub fn kvm_sys_reg_id(reg: SysReg) -> u64 {
    const SYSREG: u64 = 0x6030_0000_0013_0000;
    let (op0, op1, crn, crm, op2): (u64, u64, u64, u64, u64) = match reg {
        SysReg::MpidrEl1 => (3, 0, 0, 0, 5),
    };
    SYSREG | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

/// KVM_IRQ_LINE's `irq` for shared peripheral interrupt `spi` (the FDT's `GIC_SPI n`):
/// type SPI (1) in bits 24..28, the GIC interrupt id (32 + n) below.
pub fn kvm_spi_irq_line(spi: u32) -> u32 {
    (1 << 24) | (32 + spi)
}

/// PSTATE.M = EL1h (EL1, SP_EL1).
pub const PSTATE_MODE_EL1H: u64 = 0b0101;
/// PSTATE D, A, I, F mask bits.
pub const PSTATE_DAIF: u64 = 0b1111 << 6;
/// PSTATE at kernel entry: EL1h with all of DAIF masked (`0x3c5`).
pub const BOOT_PSTATE: u64 = PSTATE_MODE_EL1H | PSTATE_DAIF;

/// aarch64-only vCPU operations.
pub trait VcpuAarch64: Vcpu {
    /// Reads a register.
    fn reg(&self, reg: Reg) -> Result<u64>;
    /// Writes a register.
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()>;
    /// Writes a system register.
    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rt_31_is_the_zero_register() {
        assert_eq!(Reg::from_rt(0), Some(Reg::X(0)));
        assert_eq!(Reg::from_rt(30), Some(Reg::X(30)));
        assert_eq!(Reg::from_rt(31), None);
        assert!(Reg::X(30).is_valid());
        assert!(!Reg::X(31).is_valid());
    }

    #[test]
    fn kvm_register_ids_match_the_kernel_abi() {
        // Values as Firecracker and QEMU use them (arm64 KVM ABI).
        assert_eq!(kvm_core_reg_id(Reg::X(0)), 0x6030_0000_0010_0000);
        assert_eq!(kvm_core_reg_id(Reg::X(1)), 0x6030_0000_0010_0002);
        assert_eq!(kvm_core_reg_id(Reg::Pc), 0x6030_0000_0010_0040);
        assert_eq!(kvm_core_reg_id(Reg::Pstate), 0x6030_0000_0010_0042);
        assert_eq!(kvm_sys_reg_id(SysReg::MpidrEl1), 0x6030_0000_0013_c005);
        assert_eq!(kvm_spi_irq_line(1), 0x0100_0021);
    }

    #[test]
    fn boot_pstate() {
        assert_eq!(BOOT_PSTATE, 0x3c5);
    }
}
