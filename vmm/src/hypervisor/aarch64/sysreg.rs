//! What to do with a trapped system register access (ESR EC 0x18).
//!
//! The hypervisor handles the registers a Linux guest normally touches (the GIC CPU interface,
//! the virtual timer, ID registers). What still traps is debug, OS lock and PMU state: Skiff
//! implements none of it, so the table gives fixed answers, and any register not in it is
//! read-as-zero / write-ignored (logged by the backend) instead of failing the VM.

/// A system register's encoding (Op0, Op1, CRn, CRm, Op2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SysRegId {
    /// Op0.
    pub op0: u8,
    /// Op1.
    pub op1: u8,
    /// CRn.
    pub crn: u8,
    /// CRm.
    pub crm: u8,
    /// Op2.
    pub op2: u8,
}

impl SysRegId {
    /// Builds an id.
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        SysRegId {
            op0,
            op1,
            crn,
            crm,
            op2,
        }
    }
}

impl std::fmt::Display for SysRegId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S{}_{}_C{}_C{}_{}",
            self.op0, self.op1, self.crn, self.crm, self.op2
        )
    }
}

/// `OSLAR_EL1`: OS lock access (write-only).
pub const OSLAR_EL1: SysRegId = SysRegId::new(2, 0, 1, 0, 4);
/// `OSLSR_EL1`: OS lock status.
pub const OSLSR_EL1: SysRegId = SysRegId::new(2, 0, 1, 1, 4);
/// `OSDLR_EL1`: OS double lock.
pub const OSDLR_EL1: SysRegId = SysRegId::new(2, 0, 1, 3, 4);
/// `MDSCR_EL1`: monitor debug system control.
pub const MDSCR_EL1: SysRegId = SysRegId::new(2, 0, 0, 2, 2);
/// `PMCR_EL0`: performance monitors control.
pub const PMCR_EL0: SysRegId = SysRegId::new(3, 3, 9, 12, 0);
/// `PMUSERENR_EL0`.
pub const PMUSERENR_EL0: SysRegId = SysRegId::new(3, 3, 9, 14, 0);

/// What the backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysRegAction {
    /// A read returns this value; a write is ignored.
    Fixed(u64),
    /// Read as zero, write ignored, and worth a debug log: Skiff does not know the register.
    UnknownRazWi,
}

impl SysRegAction {
    /// The value a read returns.
    pub fn read_value(self) -> u64 {
        match self {
            SysRegAction::Fixed(v) => v,
            SysRegAction::UnknownRazWi => 0,
        }
    }
}

/// The action for a trapped access to `id`.
pub fn action(id: SysRegId) -> SysRegAction {
    match id {
        // OS lock implemented (OSLM = 0b10), unlocked.
        OSLSR_EL1 => SysRegAction::Fixed(1 << 3),
        OSLAR_EL1 | OSDLR_EL1 | MDSCR_EL1 => SysRegAction::Fixed(0),
        // PMCR_EL0: no counters (N = 0).
        PMCR_EL0 | PMUSERENR_EL0 => SysRegAction::Fixed(0),
        // Other debug registers (breakpoints, watchpoints, DBGCLAIM, ...): RAZ/WI.
        SysRegId { op0: 2, .. } => SysRegAction::Fixed(0),
        // Remaining PMU registers (CRn 9, CRm 12..14 and PMEVCNTR/PMEVTYPER in CRn 14).
        SysRegId {
            op0: 3,
            op1: 3,
            crn: 9,
            crm: 12..=14,
            ..
        }
        | SysRegId {
            op0: 3,
            op1: 3,
            crn: 14,
            crm: 8..=15,
            ..
        }
        | SysRegId {
            op0: 3,
            op1: 0,
            crn: 9,
            crm: 14,
            ..
        } => SysRegAction::Fixed(0),
        _ => SysRegAction::UnknownRazWi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::aarch64::esr::SysRegAccess;

    #[test]
    fn known_registers() {
        assert_eq!(action(OSLSR_EL1), SysRegAction::Fixed(8));
        assert_eq!(action(OSLAR_EL1).read_value(), 0);
        assert_eq!(action(OSDLR_EL1), SysRegAction::Fixed(0));
        assert_eq!(action(PMCR_EL0), SysRegAction::Fixed(0));
        // DBGBVR3_EL1 = S2_0_C0_C3_4.
        assert_eq!(action(SysRegId::new(2, 0, 0, 3, 4)), SysRegAction::Fixed(0));
        // PMEVCNTR5_EL0 = S3_3_C14_C8_5.
        assert_eq!(
            action(SysRegId::new(3, 3, 14, 8, 5)),
            SysRegAction::Fixed(0)
        );
        // PMINTENSET_EL1 = S3_0_C9_C14_1.
        assert_eq!(
            action(SysRegId::new(3, 0, 9, 14, 1)),
            SysRegAction::Fixed(0)
        );
    }

    #[test]
    fn unknown_registers_are_raz_wi() {
        // CNTP_CTL_EL0 = S3_3_C14_C2_1: not in the table.
        let a = action(SysRegId::new(3, 3, 14, 2, 1));
        assert_eq!(a, SysRegAction::UnknownRazWi);
        assert_eq!(a.read_value(), 0);
        // An IMPLEMENTATION DEFINED register.
        assert_eq!(
            action(SysRegId::new(3, 7, 15, 15, 7)),
            SysRegAction::UnknownRazWi
        );
    }

    #[test]
    fn from_a_trap() {
        // mrs x2, oslsr_el1
        let iss = (2 << 20) | (4 << 17) | (1 << 10) | (2 << 5) | (1 << 1) | 1;
        let s = SysRegAccess::from_iss(iss);
        assert_eq!(s.id(), OSLSR_EL1);
        assert_eq!(s.id().to_string(), "S2_0_C1_C1_4");
        assert_eq!(action(s.id()).read_value(), 8);
    }
}
