//! ESR_EL2 decoding: why a vCPU trapped, and for a data abort, the MMIO access it made.
//!
//! Layout (Arm ARM D17.2.37): EC = bits 31:26, IL = bit 25, ISS = bits 24:0. Everything here
//! takes the raw syndrome the hypervisor reports; guest-controlled values never panic.

/// Exception classes Skiff acts on.
pub mod ec {
    /// Unknown reason.
    pub const UNKNOWN: u8 = 0x00;
    /// WFI or WFE.
    pub const WFX: u8 = 0x01;
    /// HVC from AArch32.
    pub const HVC32: u8 = 0x12;
    /// SMC from AArch32.
    pub const SMC32: u8 = 0x13;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR, MRS or system instruction from AArch64.
    pub const SYS64: u8 = 0x18;
    /// Instruction abort from a lower exception level.
    pub const IABT_LOWER: u8 = 0x20;
    /// Data abort from a lower exception level.
    pub const DABT_LOWER: u8 = 0x24;
    /// BRK instruction from AArch64.
    pub const BRK64: u8 = 0x3c;
}

/// Errors decoding a syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EsrError {
    /// A data abort without a valid instruction syndrome (ISV = 0): the access cannot be
    /// emulated from the syndrome alone (e.g. a load/store pair or a post-indexed access to
    /// MMIO).
    #[error("data abort at {addr:#x} without instruction syndrome (ESR {esr:#x}): the guest used an MMIO access the VMM cannot emulate")]
    NoSyndrome {
        /// The raw syndrome.
        esr: u64,
        /// The faulting guest physical address.
        addr: u64,
    },
}

/// The exception class of a syndrome.
pub fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// The instruction-specific syndrome.
pub fn iss(esr: u64) -> u32 {
    (esr & 0x1ff_ffff) as u32
}

/// Whether the trapped instruction was 32 bits wide (IL).
pub fn is_32bit_instruction(esr: u64) -> bool {
    esr & (1 << 25) != 0
}

/// A decoded data abort ISS (ISV = 1 fields are meaningful only when `isv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAbort {
    /// Instruction syndrome valid.
    pub isv: bool,
    /// Access size in bytes (from SAS: 1, 2, 4 or 8).
    pub size: u8,
    /// Sign-extend a load (SSE).
    pub sign_extend: bool,
    /// Register transferred (SRT); 31 is XZR.
    pub srt: u8,
    /// The register is 64-bit (SF); otherwise a W register.
    pub sf: bool,
    /// Acquire/release semantics (AR).
    pub acquire_release: bool,
    /// Write (WnR).
    pub is_write: bool,
    /// Fault status code (DFSC).
    pub dfsc: u8,
}

impl DataAbort {
    /// Decodes a data abort ISS.
    pub fn from_iss(iss: u32) -> Self {
        DataAbort {
            isv: iss & (1 << 24) != 0,
            size: 1 << ((iss >> 22) & 3),
            sign_extend: iss & (1 << 21) != 0,
            srt: ((iss >> 16) & 0x1f) as u8,
            sf: iss & (1 << 15) != 0,
            acquire_release: iss & (1 << 14) != 0,
            is_write: iss & (1 << 6) != 0,
            dfsc: (iss & 0x3f) as u8,
        }
    }
}

/// One emulatable MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// Write (store) or read (load).
    pub is_write: bool,
    /// Register transferred; 31 is XZR (reads as 0, writes discarded).
    pub srt: u8,
    /// Sign-extend a load to the register width.
    pub sign_extend: bool,
    /// 64-bit destination register (X), else W (upper 32 bits cleared).
    pub sf: bool,
}

impl MmioAccess {
    /// The access of a data abort at guest physical `addr` with syndrome `esr`.
    pub fn from_data_abort(esr: u64, addr: u64) -> Result<Self, EsrError> {
        let d = DataAbort::from_iss(iss(esr));
        if !d.isv {
            return Err(EsrError::NoSyndrome { esr, addr });
        }
        Ok(MmioAccess {
            addr,
            size: d.size,
            is_write: d.is_write,
            srt: d.srt,
            sign_extend: d.sign_extend,
            sf: d.sf,
        })
    }

    /// The register value a load of `data` (little-endian, `size` bytes) leaves in the
    /// destination register: sign-extended if SSE, truncated to 32 bits for a W register.
    pub fn load_value(&self, data: &[u8]) -> u64 {
        let n = usize::from(self.size).min(8).min(data.len());
        let mut buf = [0u8; 8];
        buf[..n].copy_from_slice(&data[..n]);
        let mut v = u64::from_le_bytes(buf);
        let bits = (n * 8) as u32;
        if self.sign_extend && bits > 0 && bits < 64 {
            let shift = 64 - bits;
            v = (((v << shift) as i64) >> shift) as u64;
        }
        if !self.sf {
            v &= 0xffff_ffff;
        }
        v
    }

    /// The bytes a store of register value `value` writes (the low `size` bytes).
    pub fn store_bytes(&self, value: u64) -> ([u8; 8], usize) {
        (value.to_le_bytes(), usize::from(self.size).min(8))
    }
}

/// A trapped system register access (EC 0x18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
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
    /// Register transferred; 31 is XZR.
    pub rt: u8,
    /// MRS (read into Rt) rather than MSR.
    pub is_read: bool,
}

impl SysRegAccess {
    /// Decodes an EC 0x18 ISS.
    pub fn from_iss(iss: u32) -> Self {
        SysRegAccess {
            op0: ((iss >> 20) & 3) as u8,
            op2: ((iss >> 17) & 7) as u8,
            op1: ((iss >> 14) & 7) as u8,
            crn: ((iss >> 10) & 0xf) as u8,
            rt: ((iss >> 5) & 0x1f) as u8,
            crm: ((iss >> 1) & 0xf) as u8,
            is_read: iss & 1 != 0,
        }
    }

    /// The register's identity without the transfer register and direction.
    pub fn id(&self) -> super::sysreg::SysRegId {
        super::sysreg::SysRegId {
            op0: self.op0,
            op1: self.op1,
            crn: self.crn,
            crm: self.crm,
            op2: self.op2,
        }
    }
}

/// A decoded exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// WFI (`wfe == false`) or WFE.
    Wfx {
        /// WFE (or WFET) rather than WFI.
        wfe: bool,
    },
    /// HVC with its immediate; PC already points past the instruction.
    Hvc(u16),
    /// SMC with its immediate; PC still points at the instruction.
    Smc(u16),
    /// A trapped MSR/MRS.
    SysReg(SysRegAccess),
    /// A data abort from the guest (stage-2 fault: MMIO or unmapped memory).
    DataAbort(DataAbort),
    /// An instruction abort from the guest (executing from unmapped memory).
    InstructionAbort,
    /// A BRK instruction.
    Breakpoint(u16),
    /// Anything else: exception class and ISS.
    Other {
        /// Exception class.
        ec: u8,
        /// ISS.
        iss: u32,
    },
}

/// Decodes a syndrome.
pub fn decode(esr: u64) -> Exception {
    let iss = iss(esr);
    match exception_class(esr) {
        ec::WFX => Exception::Wfx { wfe: iss & 1 != 0 },
        ec::HVC64 | ec::HVC32 => Exception::Hvc((iss & 0xffff) as u16),
        ec::SMC64 | ec::SMC32 => Exception::Smc((iss & 0xffff) as u16),
        ec::SYS64 => Exception::SysReg(SysRegAccess::from_iss(iss)),
        ec::DABT_LOWER => Exception::DataAbort(DataAbort::from_iss(iss)),
        ec::IABT_LOWER => Exception::InstructionAbort,
        ec::BRK64 => Exception::Breakpoint((iss & 0xffff) as u16),
        ec => Exception::Other { ec, iss },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn classes() {
        // WFI as HVF reports it: EC 0x01, IL set.
        assert_eq!(decode(0x0600_0000), Exception::Wfx { wfe: false });
        assert_eq!(decode(0x0600_0001), Exception::Wfx { wfe: true });
        // hvc #0
        assert_eq!(decode(0x5a00_0000), Exception::Hvc(0));
        // smc #0x12
        assert_eq!(decode(0x5e00_0012), Exception::Smc(0x12));
        assert_eq!(decode(esr(ec::HVC32, 5)), Exception::Hvc(5));
        assert_eq!(decode(0xf200_0000), Exception::Breakpoint(0));
        assert_eq!(
            decode(esr(ec::IABT_LOWER, 0x7)),
            Exception::InstructionAbort
        );
        assert_eq!(
            decode(esr(0x07, 0x01e0_0000)),
            Exception::Other {
                ec: 0x07,
                iss: 0x01e0_0000
            }
        );
        assert!(is_32bit_instruction(0x5a00_0000));
        assert_eq!(exception_class(u64::MAX), 0x3f);
    }

    #[test]
    fn data_abort_str_w1() {
        // str w1, [x0]: ISV=1, SAS=2 (word), SRT=1, WnR=1, DFSC=translation fault L3 (0x07).
        let e = 0x9300_0000u64 | (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6) | 0x07;
        let a = MmioAccess::from_data_abort(e, 0x0900_0000).unwrap();
        assert_eq!(
            a,
            MmioAccess {
                addr: 0x0900_0000,
                size: 4,
                is_write: true,
                srt: 1,
                sign_extend: false,
                sf: false
            }
        );
        assert_eq!(a.store_bytes(0x1122_3344_5566_7788).1, 4);
        assert_eq!(
            &a.store_bytes(0x1122_3344_5566_7788).0[..4],
            &[0x88, 0x77, 0x66, 0x55]
        );
    }

    #[test]
    fn data_abort_ldrsb_x3() {
        // ldrsb x3, [x2]: SAS=0 (byte), SSE=1, SRT=3, SF=1, read.
        let iss = (1 << 24) | (1 << 21) | (3 << 16) | (1 << 15) | 0x07;
        let a = MmioAccess::from_data_abort(esr(ec::DABT_LOWER, iss), 0x1000).unwrap();
        assert_eq!(a.size, 1);
        assert!(a.sign_extend && a.sf && !a.is_write);
        assert_eq!(a.srt, 3);
        assert_eq!(a.load_value(&[0x80]), 0xffff_ffff_ffff_ff80);
        assert_eq!(a.load_value(&[0x7f]), 0x7f);
    }

    #[test]
    fn loads_into_w_registers_clear_the_top() {
        // ldrsh w5, [x0]: SAS=1, SSE=1, SF=0.
        let iss = (1 << 24) | (1 << 22) | (1 << 21) | (5 << 16);
        let a = MmioAccess::from_data_abort(esr(ec::DABT_LOWER, iss), 0).unwrap();
        assert_eq!(a.size, 2);
        assert_eq!(a.load_value(&[0x00, 0x80]), 0xffff_8000);
        // ldr x7, [x0]: SAS=3, SF=1.
        let iss = (1 << 24) | (3 << 22) | (7 << 16) | (1 << 15);
        let a = MmioAccess::from_data_abort(esr(ec::DABT_LOWER, iss), 0).unwrap();
        assert_eq!(a.size, 8);
        assert_eq!(
            a.load_value(&[1, 2, 3, 4, 5, 6, 7, 0x88]),
            0x8807_0605_0403_0201
        );
        // A short buffer does not panic.
        assert_eq!(a.load_value(&[1]), 1);
    }

    #[test]
    fn xzr_store() {
        // str wzr, [x1]
        let iss = (1 << 24) | (2 << 22) | (31 << 16) | (1 << 6);
        let a = MmioAccess::from_data_abort(esr(ec::DABT_LOWER, iss), 0).unwrap();
        assert_eq!(a.srt, 31);
        assert_eq!(super::super::Reg::from_rt(a.srt), None);
    }

    #[test]
    fn data_abort_without_isv_is_an_error() {
        // ldp x0, x1, [x2] to MMIO: ISV=0.
        let e = esr(ec::DABT_LOWER, 0x07);
        assert_eq!(
            MmioAccess::from_data_abort(e, 0xdead_0000),
            Err(EsrError::NoSyndrome {
                esr: e,
                addr: 0xdead_0000
            })
        );
        // Every ISS value decodes without panicking.
        for iss in (0..(1u32 << 25)).step_by(4099) {
            let _ = MmioAccess::from_data_abort(esr(ec::DABT_LOWER, iss), 0)
                .map(|a| a.load_value(&[0xff; 8]));
        }
    }

    #[test]
    fn sysreg_trap_iss() {
        // msr oslar_el1, x0: Op0=2 Op1=0 CRn=1 CRm=0 Op2=4 Rt=0 write.
        let iss = (2 << 20) | (4 << 17) | (1 << 10);
        let Exception::SysReg(s) = decode(esr(ec::SYS64, iss)) else {
            panic!("not a sysreg trap")
        };
        assert_eq!((s.op0, s.op1, s.crn, s.crm, s.op2), (2, 0, 1, 0, 4));
        assert_eq!(s.rt, 0);
        assert!(!s.is_read);
        // mrs x3, cntpct_el0: Op0=3 Op1=3 CRn=14 CRm=0 Op2=1 Rt=3 read.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (3 << 5) | 1;
        let Exception::SysReg(s) = decode(esr(ec::SYS64, iss)) else {
            panic!("not a sysreg trap")
        };
        assert_eq!((s.op0, s.op1, s.crn, s.crm, s.op2), (3, 3, 14, 0, 1));
        assert_eq!(s.rt, 3);
        assert!(s.is_read);
        // mrs x9, pmcr_el0 (3,3,9,12,0) with CRm in bits 4:1.
        let iss = (3 << 20) | (3 << 14) | (9 << 10) | (9 << 5) | (12 << 1) | 1;
        let s = SysRegAccess::from_iss(iss);
        assert_eq!(
            (s.op0, s.op1, s.crn, s.crm, s.op2, s.rt),
            (3, 3, 9, 12, 0, 9)
        );
    }
}
