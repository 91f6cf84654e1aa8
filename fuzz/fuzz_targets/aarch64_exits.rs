//! Guest-reachable on aarch64 (HVF): the exception syndrome, fault address, register values
//! and PSCI arguments of a trapped access are all chosen by the guest. Decoding must never
//! panic, and a decoded MMIO access must stay within 8 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_vmm::hypervisor::aarch64::{esr, psci, sysreg};

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
});
