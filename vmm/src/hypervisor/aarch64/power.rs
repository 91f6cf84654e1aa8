//! PSCI for backends that answer it themselves (Hypervisor.framework; KVM answers PSCI in the
//! host kernel): the vCPUs' power states and the outcome of every call a guest makes over
//! HVC/SMC. Plain data, no locking: the backend keeps one [`PowerStates`] per VM under its lock.

use std::collections::HashMap;

use super::psci::{self, PsciAction, PsciCall};
use crate::hypervisor::SystemEvent;

/// A guest `CPU_ON` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOnRequest {
    /// Target MPIDR affinity.
    pub target_mpidr: u64,
    /// Entry point (guest physical).
    pub entry: u64,
    /// X0 for the target.
    pub context_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    Off,
    OnPending(CpuOnRequest),
    On,
}

/// What the calling vCPU does after a PSCI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciOutcome {
    /// Write this to X0 and go on.
    Return(u64),
    /// The calling vCPU is now off: park it until a `CPU_ON` names it.
    CpuOff,
    /// The VM ends (`SYSTEM_OFF`, `SYSTEM_RESET`, or `SYSTEM_RESET2`'s warm reset, which is
    /// how Linux reboots after a panic with `reboot=panic_warm`: a crash, as on KVM).
    Exit(SystemEvent),
}

/// The power state of every vCPU of one VM, keyed by MPIDR affinity.
#[derive(Debug, Default)]
pub struct PowerStates {
    cpus: HashMap<u64, Power>,
}

impl PowerStates {
    /// Registers (or re-keys, when the VMM sets its MPIDR) a vCPU.
    pub fn register(&mut self, old: Option<u64>, mpidr: u64, powered: bool) {
        if let Some(old) = old {
            self.cpus.remove(&old);
        }
        let power = if powered { Power::On } else { Power::Off };
        self.cpus.insert(psci::mpidr_affinity(mpidr), power);
    }

    /// Takes the pending `CPU_ON` aimed at `mpidr`, marking that vCPU on.
    pub fn take_cpu_on(&mut self, mpidr: u64) -> Option<CpuOnRequest> {
        let mpidr = psci::mpidr_affinity(mpidr);
        match self.cpus.get(&mpidr).copied() {
            Some(Power::OnPending(req)) => {
                self.cpus.insert(mpidr, Power::On);
                Some(req)
            }
            _ => None,
        }
    }

    fn cpu_on(&mut self, req: CpuOnRequest) -> i32 {
        match self.cpus.get(&req.target_mpidr).copied() {
            None => psci::ret::INVALID_PARAMETERS,
            Some(Power::On) => psci::ret::ALREADY_ON,
            Some(Power::OnPending(_)) => psci::ret::ON_PENDING,
            Some(Power::Off) => {
                self.cpus.insert(req.target_mpidr, Power::OnPending(req));
                psci::ret::SUCCESS
            }
        }
    }

    fn affinity_info(&self, mpidr: u64) -> i32 {
        match self.cpus.get(&mpidr) {
            None => psci::ret::INVALID_PARAMETERS,
            Some(Power::On) => psci::affinity::ON,
            Some(Power::OnPending(_)) => psci::affinity::ON_PENDING,
            Some(Power::Off) => psci::affinity::OFF,
        }
    }

    /// Answers `call` from the vCPU whose MPIDR affinity is `caller` (`None` before the VMM
    /// set it). Nothing the guest passes can make this fail: bad arguments are PSCI errors.
    pub fn handle(&mut self, call: PsciCall, caller: Option<u64>) -> PsciOutcome {
        match call.action() {
            PsciAction::Return(v) => PsciOutcome::Return(v),
            PsciAction::SystemOff => PsciOutcome::Exit(SystemEvent::PowerOff),
            PsciAction::SystemReset => PsciOutcome::Exit(SystemEvent::Reset),
            PsciAction::WarmReset => PsciOutcome::Exit(SystemEvent::Crash),
            PsciAction::Platform => match call {
                PsciCall::CpuOn {
                    target_mpidr,
                    entry,
                    context_id,
                } => PsciOutcome::Return(psci::ret_x0(self.cpu_on(CpuOnRequest {
                    target_mpidr: psci::mpidr_affinity(target_mpidr),
                    entry,
                    context_id,
                }))),
                PsciCall::AffinityInfo {
                    target_affinity,
                    lowest_level,
                } => PsciOutcome::Return(psci::ret_x0(if lowest_level != 0 {
                    psci::ret::INVALID_PARAMETERS
                } else {
                    self.affinity_info(psci::mpidr_affinity(target_affinity))
                })),
                PsciCall::CpuOff => {
                    if let Some(me) = caller {
                        self.cpus.insert(psci::mpidr_affinity(me), Power::Off);
                    }
                    PsciOutcome::CpuOff
                }
                _ => PsciOutcome::Return(psci::ret_x0(psci::ret::NOT_SUPPORTED)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::aarch64::psci::{decode, ret, SMC64};

    fn call(x0: u32, x1: u64, x2: u64, x3: u64) -> PsciCall {
        decode([u64::from(x0), x1, x2, x3])
    }

    /// Two vCPUs as Linux brings them up: the boot CPU asks for CPU 1, polls AFFINITY_INFO,
    /// CPU 1 takes the request and later turns itself off.
    #[test]
    fn secondary_bring_up_and_off() {
        let mut p = PowerStates::default();
        p.register(None, 0x8000_0000, true); // MPIDR with the RES1 bit: affinity 0
        p.register(None, 0x8000_0001, false);
        let on = call(psci::CPU_ON | SMC64, 1, 0x4020_0000, 0x77);
        assert_eq!(p.handle(on, Some(0)), PsciOutcome::Return(0));
        let info = call(psci::AFFINITY_INFO | SMC64, 1, 0, 0);
        assert_eq!(
            p.handle(info, Some(0)),
            PsciOutcome::Return(psci::affinity::ON_PENDING as u64)
        );
        assert_eq!(
            p.handle(on, Some(0)),
            PsciOutcome::Return(ret_x0(ret::ON_PENDING))
        );
        assert_eq!(
            p.take_cpu_on(0x8000_0001),
            Some(CpuOnRequest {
                target_mpidr: 1,
                entry: 0x4020_0000,
                context_id: 0x77
            })
        );
        assert_eq!(p.take_cpu_on(1), None, "taken once");
        assert_eq!(
            p.handle(info, Some(0)),
            PsciOutcome::Return(psci::affinity::ON as u64)
        );
        assert_eq!(
            p.handle(on, Some(0)),
            PsciOutcome::Return(ret_x0(ret::ALREADY_ON))
        );
        assert_eq!(
            p.handle(call(psci::CPU_OFF, 0, 0, 0), Some(1)),
            PsciOutcome::CpuOff
        );
        assert_eq!(
            p.handle(info, Some(0)),
            PsciOutcome::Return(psci::affinity::OFF as u64)
        );
        // And on again.
        assert_eq!(p.handle(on, Some(0)), PsciOutcome::Return(0));
    }

    fn ret_x0(code: i32) -> u64 {
        psci::ret_x0(code)
    }

    #[test]
    fn hostile_arguments_are_psci_errors() {
        let mut p = PowerStates::default();
        p.register(None, 0, true);
        // An MPIDR no vCPU has, an SMC32 call whose upper halves are junk, a level above 0.
        let inval = PsciOutcome::Return(ret_x0(ret::INVALID_PARAMETERS));
        assert_eq!(
            p.handle(call(psci::CPU_ON | SMC64, 7, 0, 0), Some(0)),
            inval
        );
        assert_eq!(
            p.handle(call(psci::CPU_ON, 0xdead_0000_0000_0009, 0, 0), Some(0)),
            inval
        );
        assert_eq!(p.handle(call(psci::AFFINITY_INFO, 0, 1, 0), Some(0)), inval);
        assert_eq!(
            p.handle(call(psci::AFFINITY_INFO | SMC64, u64::MAX, 0, 0), Some(0)),
            inval
        );
        assert_eq!(
            p.handle(call(0x8400_00ff, 0, 0, 0), Some(0)),
            PsciOutcome::Return(ret_x0(ret::NOT_SUPPORTED))
        );
        assert_eq!(
            p.handle(call(psci::CPU_SUSPEND, 0, 0, 0), None),
            PsciOutcome::Return(ret_x0(ret::NOT_SUPPORTED))
        );
        // CPU_OFF before the VMM named the vCPU changes nothing it could not undo.
        assert_eq!(
            p.handle(call(psci::CPU_OFF, 0, 0, 0), None),
            PsciOutcome::CpuOff
        );
        assert_eq!(
            p.handle(call(psci::AFFINITY_INFO, 0, 0, 0), None),
            PsciOutcome::Return(psci::affinity::ON as u64)
        );
    }

    #[test]
    fn system_calls_end_the_vm() {
        let mut p = PowerStates::default();
        assert_eq!(
            p.handle(call(psci::SYSTEM_OFF, 0, 0, 0), None),
            PsciOutcome::Exit(SystemEvent::PowerOff)
        );
        assert_eq!(
            p.handle(call(psci::SYSTEM_RESET, 0, 0, 0), None),
            PsciOutcome::Exit(SystemEvent::Reset)
        );
        // Linux's panic with reboot=panic_warm: SYSTEM_RESET2, SYSTEM_WARM_RESET (0).
        assert_eq!(
            p.handle(call(psci::SYSTEM_RESET2 | SMC64, 0, 0, 0), None),
            PsciOutcome::Exit(SystemEvent::Crash)
        );
        assert_eq!(
            p.handle(call(psci::SYSTEM_RESET2, 0, 0, 0), None),
            PsciOutcome::Exit(SystemEvent::Crash)
        );
        // Other architectural types, and vendor types, are not valid here.
        for t in [1, 0x7fff_ffff, 0x8000_0000, 0x8000_0001] {
            assert_eq!(
                p.handle(call(psci::SYSTEM_RESET2 | SMC64, t, 0, 0), None),
                PsciOutcome::Return(ret_x0(ret::INVALID_PARAMETERS)),
                "reset type {t:#x}"
            );
        }
    }
}
