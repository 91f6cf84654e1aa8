//! Guest-reachable on aarch64 (HVF): the exception syndrome, fault address, register values
//! and PSCI arguments of a trapped access are all chosen by the guest. Decoding must never
//! panic, and a decoded MMIO access must stay within 8 bytes. The whole exit path the HVF
//! backend runs (`exit::handle_exception`, PSCI power states, `complete_mmio`) over a fake
//! register file: no panic, and no general-purpose register but X0 or Rt changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_vmm::hypervisor::aarch64::exit::{self, Regs, Step};
use skiff_vmm::hypervisor::aarch64::power::PowerStates;
use skiff_vmm::hypervisor::aarch64::{esr, psci, sysreg, Reg};

struct Fake {
    x: [u64; 31],
    pc: u64,
}

impl Regs for Fake {
    type Error = ();
    fn get(&self, reg: Reg) -> Result<u64, ()> {
        match reg {
            Reg::X(n) => self.x.get(usize::from(n)).copied().ok_or(()),
            Reg::Pc => Ok(self.pc),
            Reg::Pstate => Ok(0),
        }
    }
    fn set(&mut self, reg: Reg, value: u64) -> Result<(), ()> {
        match reg {
            Reg::X(n) => *self.x.get_mut(usize::from(n)).ok_or(())? = value,
            Reg::Pc => self.pc = value,
            Reg::Pstate => {}
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = [0u64; 6];
    for (i, c) in data.chunks(8).take(6).enumerate() {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        w[i] = u64::from_le_bytes(b);
    }
    let _ = esr::decode(w[0]);
    if let Ok(a) = esr::MmioAccess::from_data_abort(w[0], w[1]) {
        let (bytes, len) = a.store_bytes(w[2]);
        assert!(len <= bytes.len());
        let _ = a.load_value(&bytes[..len]);
        let _ = a.load_value(&data[..data.len().min(8)]);
    }
    let s = esr::SysRegAccess::from_iss(esr::iss(w[0]));
    let _ = sysreg::action(s.id()).read_value();
    let call = psci::decode([w[2], w[3], w[4], w[5]]);
    let _ = call.action();
    let _ = psci::mpidr_affinity(w[1]);

    let mut power = PowerStates::default();
    power.register(None, 0, true);
    power.register(None, 1, false);
    let mut r = Fake {
        x: [0; 31],
        pc: w[1],
    };
    for (i, x) in r.x.iter_mut().enumerate() {
        *x = w[2 + i % 4].rotate_left(i as u32);
    }
    let before = r.x;
    if let Ok(Step::Mmio(a)) =
        exit::handle_exception(&mut r, w[0], w[1], |c| power.handle(c, Some(0)))
    {
        let fill = data.first().copied().unwrap_or(0);
        let _ = exit::complete_mmio(&mut r, &a, &mut |acc| acc.data.fill(fill));
    }
    let changed = (0..31).filter(|&i| r.x[i] != before[i]).count();
    assert!(changed <= 1);
});
