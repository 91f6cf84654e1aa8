//! What a backend that sees raw exception exits (Hypervisor.framework: ESR_EL2 and the fault
//! address) does with each one, over a register file it only reaches through [`Regs`]: decode
//! the syndrome, answer PSCI, emulate trapped system registers, advance PC, and complete MMIO.
//! KVM does all of this in the host kernel and reports only MMIO and system events; here it is
//! plain logic, unit-tested on any host with synthetic exits and a fake register file.

use super::esr::{self, Exception, MmioAccess};
use super::power::PsciOutcome;
use super::psci::{self, PsciCall};
use super::sysreg::{self, SysRegAction};
use super::Reg;
use crate::hypervisor::{Access, SystemEvent};

/// A vCPU's general-purpose registers and PC, as the backend reads and writes them.
pub trait Regs {
    /// The backend's error.
    type Error;
    /// Reads `reg`.
    fn get(&self, reg: Reg) -> Result<u64, Self::Error>;
    /// Writes `reg`.
    fn set(&mut self, reg: Reg, value: u64) -> Result<(), Self::Error>;
}

/// What the vCPU loop does after an exception exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Enter the guest again.
    Resume,
    /// WFE: let other threads run, then enter the guest again.
    Yield,
    /// WFI: park until an interrupt is due (PC is already past the instruction).
    Wfi,
    /// An MMIO access for the device bus: finish it with [`complete_mmio`].
    Mmio(MmioAccess),
    /// PSCI `CPU_OFF`: this vCPU is off until a `CPU_ON` names it.
    CpuOff,
    /// The VM ends (PSCI `SYSTEM_OFF` / `SYSTEM_RESET` / warm `SYSTEM_RESET2`).
    SystemEvent(SystemEvent),
    /// The guest did something Skiff cannot emulate: the VM ends with an internal error.
    Fatal(Fatal),
}

/// Why an exit ends the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fatal {
    /// An instruction fetch from an address with no memory (the fault address).
    InstructionAbort(u64),
    /// A data abort without a valid instruction syndrome (e.g. a load pair or a
    /// post-indexed access to MMIO): the access cannot be emulated.
    DataAbortWithoutSyndrome(u64),
    /// An exception class Skiff does not handle (breakpoints included).
    Unhandled,
}

const PC_STEP: u64 = 4;

fn advance_pc<R: Regs>(regs: &mut R) -> Result<(), R::Error> {
    let pc = regs.get(Reg::Pc)?;
    regs.set(Reg::Pc, pc.wrapping_add(PC_STEP))
}

/// Handles an exception exit with syndrome `esr` and fault address `ipa`. `psci` answers a
/// PSCI call (the backend's [`super::power::PowerStates`], under its lock). Registers are only
/// touched as the architecture says the emulated instruction would have: X0 for PSCI, Rt for a
/// system register read, PC past the instruction (HVC returns past it already).
pub fn handle_exception<R: Regs>(
    regs: &mut R,
    esr: u64,
    ipa: u64,
    psci: impl FnOnce(PsciCall) -> PsciOutcome,
) -> Result<Step, R::Error> {
    Ok(match esr::decode(esr) {
        Exception::DataAbort(_) => match MmioAccess::from_data_abort(esr, ipa) {
            Ok(a) => Step::Mmio(a),
            Err(_) => Step::Fatal(Fatal::DataAbortWithoutSyndrome(ipa)),
        },
        e @ (Exception::Hvc(_) | Exception::Smc(_)) => {
            if matches!(e, Exception::Smc(_)) {
                // SMC leaves PC on the instruction.
                advance_pc(regs)?;
            }
            let x = [
                regs.get(Reg::X(0))?,
                regs.get(Reg::X(1))?,
                regs.get(Reg::X(2))?,
                regs.get(Reg::X(3))?,
            ];
            match psci(psci::decode(x)) {
                PsciOutcome::Return(v) => {
                    regs.set(Reg::X(0), v)?;
                    Step::Resume
                }
                PsciOutcome::CpuOff => Step::CpuOff,
                PsciOutcome::Exit(ev) => Step::SystemEvent(ev),
            }
        }
        Exception::Wfx { wfe } => {
            advance_pc(regs)?;
            if wfe {
                Step::Yield
            } else {
                Step::Wfi
            }
        }
        Exception::SysReg(access) => {
            let action = sysreg::action(access.id());
            if action == SysRegAction::UnknownRazWi {
                tracing::debug!(
                    reg = %access.id(),
                    read = access.is_read,
                    "unhandled system register access: read as zero, write ignored"
                );
            }
            if access.is_read {
                if let Some(rt) = Reg::from_rt(access.rt) {
                    regs.set(rt, action.read_value())?;
                }
            }
            advance_pc(regs)?;
            Step::Resume
        }
        Exception::InstructionAbort => Step::Fatal(Fatal::InstructionAbort(ipa)),
        Exception::Breakpoint(_) | Exception::Other { .. } => Step::Fatal(Fatal::Unhandled),
    })
}

/// Completes MMIO access `a` through `bus`: a store hands the bus the low `size` bytes of Rt
/// (XZR: zeros), a load puts the bus's bytes into Rt (sign-extended, W-truncated as the
/// instruction says), then PC moves past the instruction.
pub fn complete_mmio<R: Regs>(
    regs: &mut R,
    a: &MmioAccess,
    bus: &mut dyn FnMut(Access<'_>),
) -> Result<(), R::Error> {
    let n = usize::from(a.size).min(8);
    let mut buf = [0u8; 8];
    if a.is_write {
        let value = match Reg::from_rt(a.srt) {
            Some(r) => regs.get(r)?,
            None => 0,
        };
        let (bytes, len) = a.store_bytes(value);
        buf[..len].copy_from_slice(&bytes[..len]);
    }
    bus(Access {
        addr: a.addr,
        data: &mut buf[..n],
        is_write: a.is_write,
    });
    if !a.is_write {
        if let Some(r) = Reg::from_rt(a.srt) {
            regs.set(r, a.load_value(&buf[..n]))?;
        }
    }
    advance_pc(regs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::aarch64::power::{CpuOnRequest, PowerStates};
    use crate::hypervisor::aarch64::psci::SMC64;

    /// A fake vCPU register file: X0..X30 and PC.
    #[derive(Default)]
    struct Fake {
        x: [u64; 31],
        pc: u64,
    }

    impl Regs for Fake {
        type Error = std::convert::Infallible;
        fn get(&self, reg: Reg) -> Result<u64, Self::Error> {
            Ok(match reg {
                Reg::X(n) => self.x[usize::from(n)],
                Reg::Pc => self.pc,
                Reg::Pstate => 0,
            })
        }
        fn set(&mut self, reg: Reg, value: u64) -> Result<(), Self::Error> {
            match reg {
                Reg::X(n) => self.x[usize::from(n)] = value,
                Reg::Pc => self.pc = value,
                Reg::Pstate => {}
            }
            Ok(())
        }
    }

    /// ESR with EC `ec`, IL set, ISS `iss`.
    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }
    const HVC64: u8 = 0x16;
    const SMC64_EC: u8 = 0x17;
    const WFX: u8 = 0x01;
    const SYSREG: u8 = 0x18;
    const DABT: u8 = 0x24;
    const IABT: u8 = 0x20;
    const BRK: u8 = 0x3c;

    fn no_psci(_: PsciCall) -> PsciOutcome {
        panic!("no PSCI call expected")
    }

    #[test]
    fn mmio_store_and_load_through_the_bus() {
        let mut r = Fake {
            pc: 0x4000_0000,
            ..Fake::default()
        };
        r.x[1] = 0x1122_3344_5566_7788;
        // str w1, [x0] to the UART: ISV, SAS=word, SRT=1, WnR.
        let store = esr(DABT, (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6) | 0x07);
        let Step::Mmio(a) = handle_exception(&mut r, store, 0x0900_0000, no_psci).unwrap() else {
            panic!("not MMIO")
        };
        let mut seen = Vec::new();
        complete_mmio(&mut r, &a, &mut |acc: Access<'_>| {
            seen.push((acc.addr, acc.data.to_vec(), acc.is_write))
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(0x0900_0000, vec![0x88, 0x77, 0x66, 0x55], true)]
        );
        assert_eq!(r.pc, 0x4000_0004);
        // ldrsb x3, [x0]: ISV, SAS=byte, SSE, SRT=3, SF; the device answers 0x80.
        let load = esr(DABT, (1 << 24) | (1 << 21) | (3 << 16) | (1 << 15) | 0x07);
        let Step::Mmio(a) = handle_exception(&mut r, load, 0x0a00_0000, no_psci).unwrap() else {
            panic!("not MMIO")
        };
        complete_mmio(&mut r, &a, &mut |acc: Access<'_>| acc.data[0] = 0x80).unwrap();
        assert_eq!(r.x[3], 0xffff_ffff_ffff_ff80);
        assert_eq!(r.pc, 0x4000_0008);
        // A store of XZR writes zeros; a load into XZR changes no register.
        let xzr = esr(DABT, (1 << 24) | (3 << 22) | (31 << 16) | (1 << 6));
        let Step::Mmio(a) = handle_exception(&mut r, xzr, 0x10, no_psci).unwrap() else {
            panic!("not MMIO")
        };
        complete_mmio(&mut r, &a, &mut |acc: Access<'_>| {
            assert_eq!(acc.data, &[0u8; 8][..])
        })
        .unwrap();
    }

    #[test]
    fn psci_over_hvc_and_smc() {
        let mut p = PowerStates::default();
        p.register(None, 0, true);
        p.register(None, 1, false);
        let mut r = Fake {
            pc: 0x100,
            ..Fake::default()
        };
        r.x[0] = u64::from(psci::CPU_ON | SMC64);
        r.x[1] = 1;
        r.x[2] = 0x4008_0000;
        r.x[3] = 9;
        // HVC: PC already points past the instruction; X0 gets the answer.
        let s = handle_exception(&mut r, esr(HVC64, 0), 0, |c| p.handle(c, Some(0))).unwrap();
        assert_eq!((s, r.x[0], r.pc), (Step::Resume, 0, 0x100));
        assert_eq!(
            p.take_cpu_on(1),
            Some(CpuOnRequest {
                target_mpidr: 1,
                entry: 0x4008_0000,
                context_id: 9
            })
        );
        // SMC: PC moves past it.
        r.x[0] = u64::from(psci::PSCI_VERSION);
        let s = handle_exception(&mut r, esr(SMC64_EC, 0), 0, |c| p.handle(c, Some(0))).unwrap();
        assert_eq!((s, r.x[0], r.pc), (Step::Resume, 0x1_0001, 0x104));
        r.x[0] = u64::from(psci::CPU_OFF);
        let s = handle_exception(&mut r, esr(HVC64, 0), 0, |c| p.handle(c, Some(1))).unwrap();
        assert_eq!(s, Step::CpuOff);
        r.x[0] = u64::from(psci::SYSTEM_RESET2 | SMC64);
        r.x[1] = 0;
        let s = handle_exception(&mut r, esr(HVC64, 0), 0, |c| p.handle(c, Some(0))).unwrap();
        assert_eq!(s, Step::SystemEvent(SystemEvent::Crash));
        r.x[0] = u64::from(psci::SYSTEM_OFF);
        let s = handle_exception(&mut r, esr(HVC64, 0), 0, |c| p.handle(c, Some(0))).unwrap();
        assert_eq!(s, Step::SystemEvent(SystemEvent::PowerOff));
    }

    #[test]
    fn wfi_wfe_and_system_registers() {
        let mut r = Fake::default();
        assert_eq!(
            handle_exception(&mut r, esr(WFX, 0), 0, no_psci).unwrap(),
            Step::Wfi
        );
        assert_eq!(
            handle_exception(&mut r, esr(WFX, 1), 0, no_psci).unwrap(),
            Step::Yield
        );
        assert_eq!(r.pc, 8);
        // mrs x5, <an IMPLEMENTATION DEFINED register Skiff does not know>: reads as zero.
        r.x[5] = 0xdead;
        let iss = (3 << 20) | (1 << 14) | (15 << 10) | (5 << 5) | (2 << 1) | 1;
        assert_eq!(
            handle_exception(&mut r, esr(SYSREG, iss), 0, no_psci).unwrap(),
            Step::Resume
        );
        assert_eq!((r.x[5], r.pc), (0, 12));
        // msr <same>, x5: ignored, PC advances.
        r.x[5] = 0x77;
        assert_eq!(
            handle_exception(&mut r, esr(SYSREG, iss & !1), 0, no_psci).unwrap(),
            Step::Resume
        );
        assert_eq!((r.x[5], r.pc), (0x77, 16));
    }

    #[test]
    fn what_cannot_be_emulated_ends_the_vm() {
        let mut r = Fake::default();
        // A data abort without ISV (e.g. ldp from MMIO).
        assert_eq!(
            handle_exception(&mut r, esr(DABT, 0x07), 0x0900_0000, no_psci).unwrap(),
            Step::Fatal(Fatal::DataAbortWithoutSyndrome(0x0900_0000))
        );
        assert_eq!(
            handle_exception(&mut r, esr(IABT, 0x07), 0x1234, no_psci).unwrap(),
            Step::Fatal(Fatal::InstructionAbort(0x1234))
        );
        assert_eq!(
            handle_exception(&mut r, esr(BRK, 0), 0, no_psci).unwrap(),
            Step::Fatal(Fatal::Unhandled)
        );
        assert_eq!(r.pc, 0, "nothing advanced");
    }

    /// Every syndrome and fault address: no panic, and registers other than X0, Rt and PC
    /// stay as they were.
    #[test]
    fn any_syndrome_is_handled_without_panicking() {
        let mut p = PowerStates::default();
        p.register(None, 0, true);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut r = Fake::default();
            for (i, x) in r.x.iter_mut().enumerate() {
                *x = seed.rotate_left(i as u32);
            }
            let before = r.x;
            let e = seed >> 7;
            if let Ok(Step::Mmio(a)) = handle_exception(&mut r, e, seed, |c| p.handle(c, Some(0))) {
                complete_mmio(&mut r, &a, &mut |acc: Access<'_>| acc.data.fill(0xa5)).unwrap();
            }
            let changed = (0..31).filter(|&i| r.x[i] != before[i]).count();
            assert!(changed <= 1, "esr {e:#x} changed {changed} registers");
        }
    }
}
