//! aarch64 extension trait and register names (no backend types here).
//!
//! The submodules are pure decoders shared by every aarch64 backend and unit-tested on any
//! host: [`esr`] (exception syndromes, MMIO accesses), [`psci`] (PSCI/SMCCC calls) and
//! [`sysreg`] (trapped system register accesses).

pub mod esr;
pub mod psci;
pub mod sysreg;

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
    fn boot_pstate() {
        assert_eq!(BOOT_PSTATE, 0x3c5);
    }
}
