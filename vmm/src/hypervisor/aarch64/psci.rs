//! PSCI (Arm DEN 0022) and SMCCC calls a guest makes through HVC/SMC, decoded from X0..X3.
//!
//! Function IDs: bit 31 = fast call, bit 30 = SMC64 calling convention (64-bit arguments),
//! bits 29:24 = owning entity (4 = standard secure service: PSCI; 0 = arm architecture: SMCCC),
//! bits 15:0 = function number. SMC32 calls take 32-bit arguments: the upper halves of X1..X3
//! are ignored.

/// `PSCI_VERSION`.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// `CPU_SUSPEND` (SMC32; SMC64 is `0xc400_0001`).
pub const CPU_SUSPEND: u32 = 0x8400_0001;
/// `CPU_OFF`.
pub const CPU_OFF: u32 = 0x8400_0002;
/// `CPU_ON` (SMC32; SMC64 is `0xc400_0003`).
pub const CPU_ON: u32 = 0x8400_0003;
/// `AFFINITY_INFO` (SMC32; SMC64 is `0xc400_0004`).
pub const AFFINITY_INFO: u32 = 0x8400_0004;
/// `MIGRATE_INFO_TYPE`.
pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
/// `SYSTEM_OFF`.
pub const SYSTEM_OFF: u32 = 0x8400_0008;
/// `SYSTEM_RESET`.
pub const SYSTEM_RESET: u32 = 0x8400_0009;
/// `PSCI_FEATURES`.
pub const PSCI_FEATURES: u32 = 0x8400_000a;
/// `SYSTEM_RESET2` (SMC32; SMC64 is `0xc400_0012`).
pub const SYSTEM_RESET2: u32 = 0x8400_0012;
/// `SMCCC_VERSION`.
pub const SMCCC_VERSION: u32 = 0x8000_0000;
/// `SMCCC_ARCH_FEATURES`.
pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;

/// The SMC64 flag in a function ID.
pub const SMC64: u32 = 1 << 30;

/// The PSCI version Skiff implements: 1.1 (`SYSTEM_RESET2`), as KVM reports it.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// The SMCCC version reported: 1.1.
pub const SMCCC_VERSION_1_1: u32 = 0x0001_0001;

/// PSCI return codes.
pub mod ret {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Not supported.
    pub const NOT_SUPPORTED: i32 = -1;
    /// Invalid parameters.
    pub const INVALID_PARAMETERS: i32 = -2;
    /// Denied.
    pub const DENIED: i32 = -3;
    /// The target CPU is already on.
    pub const ALREADY_ON: i32 = -4;
    /// The target CPU is already being turned on.
    pub const ON_PENDING: i32 = -5;
    /// Internal failure.
    pub const INTERNAL_FAILURE: i32 = -6;
}

/// `AFFINITY_INFO` answers.
pub mod affinity {
    /// The CPU is on.
    pub const ON: i32 = 0;
    /// The CPU is off.
    pub const OFF: i32 = 1;
    /// The CPU is being turned on.
    pub const ON_PENDING: i32 = 2;
}

/// A decoded PSCI/SMCCC call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciCall {
    /// `PSCI_VERSION`.
    Version,
    /// `CPU_SUSPEND` (power state, entry, context).
    CpuSuspend {
        /// Requested power state.
        power_state: u64,
        /// Resume entry point.
        entry: u64,
        /// Context ID.
        context_id: u64,
    },
    /// `CPU_OFF`.
    CpuOff,
    /// `CPU_ON`.
    CpuOn {
        /// Target MPIDR (affinity fields).
        target_mpidr: u64,
        /// Entry point, physical address.
        entry: u64,
        /// Value for the target's X0.
        context_id: u64,
    },
    /// `AFFINITY_INFO`.
    AffinityInfo {
        /// Target affinity.
        target_affinity: u64,
        /// Lowest affinity level (only 0 is supported).
        lowest_level: u64,
    },
    /// `MIGRATE_INFO_TYPE`.
    MigrateInfoType,
    /// `SYSTEM_OFF`.
    SystemOff,
    /// `SYSTEM_RESET`.
    SystemReset,
    /// `SYSTEM_RESET2` (reset type, cookie).
    SystemReset2 {
        /// Reset type.
        reset_type: u64,
        /// Cookie.
        cookie: u64,
    },
    /// `PSCI_FEATURES` for a function ID.
    Features(u32),
    /// `SMCCC_VERSION`.
    SmcccVersion,
    /// `SMCCC_ARCH_FEATURES` for a function ID.
    SmcccArchFeatures(u32),
    /// Anything else (answered `NOT_SUPPORTED`).
    Unknown(u32),
}

/// What the caller does with a call it does not need per-VM state for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciAction {
    /// Write this to X0 and resume.
    Return(u64),
    /// Power the VM off.
    SystemOff,
    /// Reset the VM.
    SystemReset,
    /// `SYSTEM_RESET2` with `SYSTEM_WARM_RESET`: Linux's reboot after a panic
    /// (`reboot=panic_warm`, its arm64 default). Backends report it as a crash, as KVM does.
    WarmReset,
    /// Needs the backend's CPU state (`CPU_ON`, `CPU_OFF`, `AFFINITY_INFO`).
    Platform,
}

/// Sign-extends a PSCI return code into X0.
pub fn ret_x0(code: i32) -> u64 {
    i64::from(code) as u64
}

/// Decodes a call from the guest's X0..X3.
pub fn decode(x: [u64; 4]) -> PsciCall {
    let fid = x[0] as u32;
    // SMC32: 32-bit arguments.
    let arg = |i: usize| {
        if fid & SMC64 != 0 {
            x[i]
        } else {
            x[i] & 0xffff_ffff
        }
    };
    match fid & !SMC64 {
        PSCI_VERSION => PsciCall::Version,
        CPU_SUSPEND => PsciCall::CpuSuspend {
            power_state: arg(1),
            entry: arg(2),
            context_id: arg(3),
        },
        CPU_OFF => PsciCall::CpuOff,
        CPU_ON => PsciCall::CpuOn {
            target_mpidr: arg(1),
            entry: arg(2),
            context_id: arg(3),
        },
        AFFINITY_INFO => PsciCall::AffinityInfo {
            target_affinity: arg(1),
            lowest_level: arg(2),
        },
        MIGRATE_INFO_TYPE => PsciCall::MigrateInfoType,
        SYSTEM_OFF => PsciCall::SystemOff,
        SYSTEM_RESET => PsciCall::SystemReset,
        SYSTEM_RESET2 => PsciCall::SystemReset2 {
            reset_type: arg(1),
            cookie: arg(2),
        },
        PSCI_FEATURES => PsciCall::Features(x[1] as u32),
        SMCCC_VERSION => PsciCall::SmcccVersion,
        SMCCC_ARCH_FEATURES => PsciCall::SmcccArchFeatures(x[1] as u32),
        _ => PsciCall::Unknown(fid),
    }
}

/// Whether `PSCI_FEATURES` reports `fid` as implemented.
pub fn is_implemented(fid: u32) -> bool {
    const IMPLEMENTED: [u32; 13] = [
        PSCI_VERSION,
        CPU_OFF,
        CPU_ON,
        CPU_ON | SMC64,
        AFFINITY_INFO,
        AFFINITY_INFO | SMC64,
        MIGRATE_INFO_TYPE,
        SYSTEM_OFF,
        SYSTEM_RESET,
        SYSTEM_RESET2,
        SYSTEM_RESET2 | SMC64,
        PSCI_FEATURES,
        SMCCC_VERSION,
    ];
    IMPLEMENTED.contains(&fid)
}

impl PsciCall {
    /// The answer for calls that need no per-VM state.
    pub fn action(&self) -> PsciAction {
        match *self {
            PsciCall::Version => PsciAction::Return(u64::from(VERSION_1_1)),
            PsciCall::MigrateInfoType => {
                // 2: no Trusted OS, migration not needed.
                PsciAction::Return(2)
            }
            PsciCall::SystemOff => PsciAction::SystemOff,
            PsciCall::SystemReset => PsciAction::SystemReset,
            // Type 0 is SYSTEM_WARM_RESET; other architectural types are reserved and
            // vendor types (bit 31) are not Skiff's.
            PsciCall::SystemReset2 { reset_type: 0, .. } => PsciAction::WarmReset,
            PsciCall::SystemReset2 { .. } => PsciAction::Return(ret_x0(ret::INVALID_PARAMETERS)),
            PsciCall::Features(fid) => PsciAction::Return(if is_implemented(fid) {
                ret_x0(ret::SUCCESS)
            } else {
                ret_x0(ret::NOT_SUPPORTED)
            }),
            PsciCall::SmcccVersion => PsciAction::Return(u64::from(SMCCC_VERSION_1_1)),
            PsciCall::CpuOn { .. } | PsciCall::CpuOff | PsciCall::AffinityInfo { .. } => {
                PsciAction::Platform
            }
            PsciCall::CpuSuspend { .. } | PsciCall::SmcccArchFeatures(_) | PsciCall::Unknown(_) => {
                PsciAction::Return(ret_x0(ret::NOT_SUPPORTED))
            }
        }
    }
}

/// The affinity bits of an MPIDR (Aff3..Aff0), as PSCI compares them.
pub fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_calls() {
        assert_eq!(decode([0x8400_0000, 0, 0, 0]), PsciCall::Version);
        assert_eq!(decode([0x8400_0008, 0, 0, 0]), PsciCall::SystemOff);
        assert_eq!(decode([0x8400_0009, 0, 0, 0]), PsciCall::SystemReset);
        assert_eq!(decode([0x8400_0002, 0, 0, 0]), PsciCall::CpuOff);
        assert_eq!(
            decode([0xc400_0003, 0x101, 0x8020_0000, 0xdead_beef_0000]),
            PsciCall::CpuOn {
                target_mpidr: 0x101,
                entry: 0x8020_0000,
                context_id: 0xdead_beef_0000
            }
        );
        // SMC32 CPU_ON: arguments truncated to 32 bits.
        assert_eq!(
            decode([0x8400_0003, 0xffff_ffff_0000_0001, 0x1_8000_0000, 7]),
            PsciCall::CpuOn {
                target_mpidr: 1,
                entry: 0x8000_0000,
                context_id: 7
            }
        );
        assert_eq!(
            decode([0xc400_0004, 3, 0, 0]),
            PsciCall::AffinityInfo {
                target_affinity: 3,
                lowest_level: 0
            }
        );
        assert_eq!(
            decode([0x8400_000a, 0x8400_0008, 0, 0]),
            PsciCall::Features(SYSTEM_OFF)
        );
        // Upper 32 bits of X0 are ignored (W0 holds the function ID).
        assert_eq!(decode([0xffff_ffff_8400_0000, 0, 0, 0]), PsciCall::Version);
        assert_eq!(decode([0x8000_0000, 0, 0, 0]), PsciCall::SmcccVersion);
        assert_eq!(decode([0x1234, 0, 0, 0]), PsciCall::Unknown(0x1234));
    }

    #[test]
    fn actions() {
        assert_eq!(PsciCall::Version.action(), PsciAction::Return(0x1_0001));
        // Linux looks for SYSTEM_RESET2 through PSCI_FEATURES (SMC64 ID on arm64).
        assert_eq!(
            PsciCall::Features(SYSTEM_RESET2 | SMC64).action(),
            PsciAction::Return(0)
        );
        assert_eq!(
            PsciCall::SystemReset2 {
                reset_type: 0,
                cookie: 0
            }
            .action(),
            PsciAction::WarmReset
        );
        assert_eq!(PsciCall::SystemOff.action(), PsciAction::SystemOff);
        assert_eq!(PsciCall::SystemReset.action(), PsciAction::SystemReset);
        assert_eq!(PsciCall::Features(CPU_ON).action(), PsciAction::Return(0));
        assert_eq!(
            PsciCall::Features(CPU_ON | SMC64).action(),
            PsciAction::Return(0)
        );
        assert_eq!(
            PsciCall::Features(CPU_SUSPEND).action(),
            PsciAction::Return(u64::MAX)
        );
        assert_eq!(
            PsciCall::Unknown(0xc600_0000).action(),
            PsciAction::Return(ret_x0(ret::NOT_SUPPORTED))
        );
        assert_eq!(
            PsciCall::CpuOn {
                target_mpidr: 1,
                entry: 0,
                context_id: 0
            }
            .action(),
            PsciAction::Platform
        );
        assert_eq!(ret_x0(ret::ALREADY_ON), 0xffff_ffff_ffff_fffc);
    }

    #[test]
    fn affinity_mask() {
        assert_eq!(mpidr_affinity(0x8000_0101), 0x101);
        assert_eq!(mpidr_affinity(0xff_c1ff_ffff), 0xff_00ff_ffff);
    }
}
