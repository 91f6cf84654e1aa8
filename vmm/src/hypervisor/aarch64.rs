//! aarch64 extension trait and register names (no backend types here).

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

/// System registers Skiff sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysReg {
    /// Multiprocessor affinity register.
    MpidrEl1,
}

/// aarch64-only vCPU operations.
pub trait VcpuAarch64: Vcpu {
    /// Reads a register.
    fn reg(&self, reg: Reg) -> Result<u64>;
    /// Writes a register.
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()>;
    /// Writes a system register.
    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<()>;
}
