//! KVM backend on x86_64 Linux. With `kvm_aarch64.rs` (arm64) and `kvm_common.rs` (what both
//! share), the only modules that name `kvm-ioctls`/`kvm-bindings` types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debug_exit_arch, kvm_debugregs, kvm_fpu, kvm_guest_debug,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_EXIT_IO_OUT, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm as KvmFd, VcpuFd, VmFd};
use zerocopy::{FromBytes, IntoBytes};

use super::kvm_common::{self, errno, KvmKicker};
use super::state::{StateReader, StateWriter};
use super::x86_64::{CpuidEntry, DescriptorTable, Regs, Segment, Sregs, VcpuX86_64, VmX86_64};
use super::{
    Access, DebugExit, DebugKind, Error, GuestDebug, Hypervisor, MemoryRegion, Result, Vcpu,
    VcpuExit, VcpuKicker, Vm,
};

/// Where KVM puts the three pages of the TSS on Intel (below 4 GiB, outside RAM and devices).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// The opened `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    kvm: Arc<KvmFd>,
}

impl Hypervisor for Kvm {
    type Vm = KvmVm;

    fn new() -> Result<Self> {
        Ok(Kvm {
            kvm: kvm_common::open()?,
        })
    }

    fn max_vcpus(&self) -> u32 {
        kvm_common::max_vcpus(&self.kvm)
    }

    fn create_vm(&self, vcpus: u32) -> Result<KvmVm> {
        let max = self.max_vcpus();
        if vcpus == 0 || vcpus > max {
            return Err(Error::TooManyVcpus {
                requested: vcpus,
                max,
            });
        }
        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", errno(e)))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(|e| Error::call("KVM_SET_TSS_ADDR", errno(e)))?;
        vm.create_irq_chip()
            .map_err(|e| Error::call("KVM_CREATE_IRQCHIP", errno(e)))?;
        // The supported CPUID is fetched by the first vCPU (off the main thread's path).
        Ok(KvmVm {
            vm,
            kvm: Arc::clone(&self.kvm),
            supported_cpuid: std::sync::OnceLock::new(),
            pit: AtomicBool::new(false),
        })
    }
}

fn fetch_supported_cpuid(kvm: &KvmFd) -> Result<Vec<CpuidEntry>> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::call("KVM_GET_SUPPORTED_CPUID", errno(e)))?;
    // KVM emulates the TSC-deadline LAPIC timer mode (with the in-kernel LAPIC) but leaves it
    // out of KVM_GET_SUPPORTED_CPUID; QEMU and Firecracker add it when the capability is
    // there. Without it Linux calibrates the LAPIC timer against the PIT, and where that
    // fails (nested KVM: "APIC timer disabled due to verification failure") it ticks on the
    // PIT for good, one in-kernel PIT worker wakeup per tick on the host.
    let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    Ok(cpuid
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: if e.function == 1 && deadline {
                e.ecx | TSC_DEADLINE_TIMER
            } else {
                e.ecx
            },
            edx: e.edx,
        })
        .collect())
}

/// CPUID leaf 1 ECX bit 24: TSC-deadline mode of the LAPIC timer.
const TSC_DEADLINE_TIMER: u32 = 1 << 24;

/// A KVM VM with an in-kernel irqchip (LAPIC, IOAPIC, PIC).
#[derive(Debug)]
pub struct KvmVm {
    vm: VmFd,
    kvm: Arc<KvmFd>,
    supported_cpuid: std::sync::OnceLock<Arc<Vec<CpuidEntry>>>,
    /// Whether the in-kernel PIT exists (its state is then part of the VM's).
    pit: AtomicBool,
}

impl KvmVm {
    fn cpuid(&self) -> Result<Arc<Vec<CpuidEntry>>> {
        if let Some(c) = self.supported_cpuid.get() {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(fetch_supported_cpuid(&self.kvm)?);
        Ok(Arc::clone(self.supported_cpuid.get_or_init(|| c)))
    }
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn add_memory_region(&self, r: MemoryRegion) -> Result<()> {
        kvm_common::add_memory_region(&self.vm, r)
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let mut fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::call("KVM_CREATE_VCPU", errno(e)))?;
        let kicker = KvmKicker::for_this_thread(&mut fd);
        Ok(KvmVcpu {
            fd,
            kicker,
            supported_cpuid: self.cpuid()?,
            run_size: self.vm.run_size(),
            kvm: Arc::clone(&self.kvm),
        })
    }

    fn set_irq_line(&self, irq: u32, high: bool) -> Result<()> {
        self.vm
            .set_irq_line(irq, high)
            .map_err(|e| Error::call("KVM_IRQ_LINE", errno(e)))
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        let mut w = StateWriter::new();
        let clock = self
            .vm
            .get_clock()
            .map_err(|e| Error::call("KVM_GET_CLOCK", errno(e)))?;
        w.put(VM_CLOCK, clock.as_bytes())?;
        for (tag, chip_id) in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(|e| Error::call("KVM_GET_IRQCHIP", errno(e)))?;
            w.put(tag, chip.as_bytes())?;
        }
        if self.pit.load(Ordering::SeqCst) {
            let pit = self
                .vm
                .get_pit2()
                .map_err(|e| Error::call("KVM_GET_PIT2", errno(e)))?;
            w.put(VM_PIT, pit.as_bytes())?;
        }
        Ok(w.finish())
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        let r = StateReader::parse(state)?;
        if let Some(b) = r.get(VM_PIT) {
            let pit: kvm_pit_state2 = pod(b, "PIT state")?;
            self.create_pit()?;
            self.vm
                .set_pit2(&pit)
                .map_err(|e| Error::call("KVM_SET_PIT2", errno(e)))?;
        }
        let mut clock: kvm_clock_data = pod(r.need(VM_CLOCK, "VM clock")?, "VM clock")?;
        // Only the clock value is restored (the flags of KVM_GET_CLOCK describe the source).
        clock.flags = 0;
        self.vm
            .set_clock(&clock)
            .map_err(|e| Error::call("KVM_SET_CLOCK", errno(e)))?;
        for (tag, chip_id) in IRQCHIPS {
            let chip: kvm_irqchip = pod(r.need(tag, "interrupt controller")?, "irqchip")?;
            if chip.chip_id != chip_id {
                return Err(Error::BadState(format!(
                    "interrupt controller {} saved as {chip_id}",
                    chip.chip_id
                )));
            }
            self.vm
                .set_irqchip(&chip)
                .map_err(|e| Error::call("KVM_SET_IRQCHIP", errno(e)))?;
        }
        Ok(())
    }
}

// Tags of the VM's and the vCPUs' state parts (see `super::state`).
const VM_CLOCK: u32 = 1;
const VM_PIT: u32 = 2;
/// PIC master, PIC slave, IOAPIC: (tag, KVM chip id).
const IRQCHIPS: [(u32, u32); 3] = [(3, 0), (4, 1), (5, 2)];
const CPU_CPUID: u32 = 20;
const CPU_MP_STATE: u32 = 21;
const CPU_REGS: u32 = 22;
const CPU_SREGS: u32 = 23;
const CPU_XSAVE: u32 = 24;
const CPU_XCRS: u32 = 25;
const CPU_DEBUGREGS: u32 = 26;
const CPU_LAPIC: u32 = 27;
const CPU_MSRS: u32 = 28;
const CPU_EVENTS: u32 = 29;
const CPU_TSC_KHZ: u32 = 30;

/// Reads a KVM structure saved with `as_bytes` (exact size, or an error naming `what`).
fn pod<T: FromBytes>(b: &[u8], what: &str) -> Result<T> {
    T::read_from_bytes(b).map_err(|_| {
        Error::BadState(format!(
            "{what}: {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        ))
    })
}

/// Reads a run of KVM structures saved back to back.
fn pods<T: FromBytes>(b: &[u8], what: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if size == 0 || !b.len().is_multiple_of(size) {
        return Err(Error::BadState(format!(
            "{what}: {} bytes is not a whole number of entries",
            b.len()
        )));
    }
    b.chunks_exact(size).map(|c| pod(c, what)).collect()
}

impl VmX86_64 for KvmVm {
    fn create_pit(&self) -> Result<()> {
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm
            .create_pit2(config)
            .map_err(|e| Error::call("KVM_CREATE_PIT2", errno(e)))?;
        self.pit.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
    supported_cpuid: Arc<Vec<CpuidEntry>>,
    /// Size of the vCPU's kvm_run mapping (port I/O data lives inside it).
    run_size: usize,
    /// The KVM device (its MSR list and capabilities, for snapshots).
    kvm: Arc<KvmFd>,
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit> {
        kvm_common::run(&mut self.fd, |d| VcpuExit::Debug(debug_exit(d)))
    }

    fn handle_io(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_IO {
            return Err(Error::Unsupported(
                "handle_io without a pending port I/O exit".into(),
            ));
        }
        // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the active union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let total = size * io.count as usize;
        // KVM keeps port data inside the kvm_run mapping; never trust the offset blindly.
        if size == 0 || size > 4 || (io.data_offset as usize).saturating_add(total) > run_size {
            return Err(Error::Unsupported(format!(
                "port I/O of {size}x{} bytes",
                io.count
            )));
        }
        let base = run as *mut kvm_run as *mut u8;
        // SAFETY: data_offset and the length were checked to lie within the kvm_run mapping
        // (`run_size` bytes, from KVM_GET_VCPU_MMAP_SIZE), which KVM maps for the vCPU's lifetime; `run` is borrowed mutably so
        // nothing else aliases it while the slice lives.
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), total) };
        let is_write = u32::from(io.direction) == KVM_EXIT_IO_OUT;
        for chunk in data.chunks_mut(size) {
            f(Access {
                addr: u64::from(io.port),
                data: chunk,
                is_write,
            });
        }
        Ok(())
    }

    fn handle_mmio(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        kvm_common::handle_mmio(&mut self.fd, f)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::clone(&self.kicker) as Arc<dyn VcpuKicker>
    }

    fn save_state(&mut self) -> Result<Vec<u8>> {
        self.check_xsave_fits()?;
        // A port I/O or MMIO exit is only complete (RIP past the instruction, a read's value
        // in its register) once KVM_RUN is entered again: enter it with immediate_exit set,
        // which completes the access and returns at once without running the guest (the
        // KVM API's advice before saving state).
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(Error::call("KVM_RUN (completing a pending exit)", errno(e))),
        }
        let fd = &self.fd;
        let c = |call: &'static str| move |e: kvm_ioctls::Error| Error::call(call, errno(e));
        let mut w = StateWriter::new();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(c("KVM_GET_CPUID2"))?;
        let mut bytes = Vec::new();
        for e in cpuid.as_slice() {
            bytes.extend_from_slice(e.as_bytes());
        }
        w.put(CPU_CPUID, &bytes)?;
        w.put(
            CPU_MP_STATE,
            fd.get_mp_state().map_err(c("KVM_GET_MP_STATE"))?.as_bytes(),
        )?;
        w.put(
            CPU_REGS,
            fd.get_regs().map_err(c("KVM_GET_REGS"))?.as_bytes(),
        )?;
        w.put(
            CPU_SREGS,
            fd.get_sregs().map_err(c("KVM_GET_SREGS"))?.as_bytes(),
        )?;
        w.put(
            CPU_XSAVE,
            fd.get_xsave().map_err(c("KVM_GET_XSAVE"))?.as_bytes(),
        )?;
        w.put(
            CPU_XCRS,
            fd.get_xcrs().map_err(c("KVM_GET_XCRS"))?.as_bytes(),
        )?;
        w.put(
            CPU_DEBUGREGS,
            fd.get_debug_regs()
                .map_err(c("KVM_GET_DEBUGREGS"))?
                .as_bytes(),
        )?;
        w.put(
            CPU_LAPIC,
            fd.get_lapic().map_err(c("KVM_GET_LAPIC"))?.as_bytes(),
        )?;
        let mut bytes = Vec::new();
        for e in self.read_msrs()? {
            bytes.extend_from_slice(e.as_bytes());
        }
        w.put(CPU_MSRS, &bytes)?;
        w.put(
            CPU_EVENTS,
            fd.get_vcpu_events()
                .map_err(c("KVM_GET_VCPU_EVENTS"))?
                .as_bytes(),
        )?;
        if let Ok(khz) = fd.get_tsc_khz() {
            w.put(CPU_TSC_KHZ, &khz.to_le_bytes())?;
        }
        Ok(w.finish())
    }

    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        self.apply_guest_debug(debug, 0)
    }

    fn reinject_breakpoint(&mut self, debug: &GuestDebug) -> Result<()> {
        self.apply_guest_debug(debug, kvm_bindings::KVM_GUESTDBG_INJECT_BP)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<()> {
        self.check_xsave_fits()?;
        let r = StateReader::parse(state)?;
        let cpuid: Vec<kvm_cpuid_entry2> = pods(r.need(CPU_CPUID, "CPUID")?, "CPUID")?;
        let mp: kvm_mp_state = pod(r.need(CPU_MP_STATE, "MP state")?, "MP state")?;
        let regs: kvm_regs = pod(r.need(CPU_REGS, "registers")?, "registers")?;
        let sregs: kvm_sregs = pod(r.need(CPU_SREGS, "special registers")?, "sregs")?;
        let xsave: kvm_xsave = pod(r.need(CPU_XSAVE, "XSAVE area")?, "XSAVE area")?;
        let xcrs: kvm_xcrs = pod(r.need(CPU_XCRS, "XCRs")?, "XCRs")?;
        let dregs: kvm_debugregs = pod(r.need(CPU_DEBUGREGS, "debug registers")?, "debugregs")?;
        let lapic: kvm_lapic_state = pod(r.need(CPU_LAPIC, "local APIC")?, "local APIC")?;
        let msrs: Vec<kvm_msr_entry> = pods(r.need(CPU_MSRS, "MSRs")?, "MSRs")?;
        let events: kvm_vcpu_events = pod(r.need(CPU_EVENTS, "vCPU events")?, "events")?;
        let fd = &self.fd;
        let c = |call: &'static str| move |e: kvm_ioctls::Error| Error::call(call, errno(e));
        if let Some(b) = r.get(CPU_TSC_KHZ) {
            let saved = u32::from_le_bytes(
                b.try_into()
                    .map_err(|_| Error::BadState("TSC frequency: not 4 bytes".into()))?,
            );
            // A different host TSC frequency needs TSC scaling; without it the guest's
            // clocks would run at the wrong speed, so the restore fails instead.
            if fd.get_tsc_khz().ok() != Some(saved) {
                fd.set_tsc_khz(saved).map_err(c("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = CpuId::from_entries(&cpuid)
            .map_err(|e| Error::BadState(format!("too many CPUID leaves: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(c("KVM_SET_CPUID2"))?;
        fd.set_mp_state(mp).map_err(c("KVM_SET_MP_STATE"))?;
        fd.set_regs(&regs).map_err(c("KVM_SET_REGS"))?;
        fd.set_sregs(&sregs).map_err(c("KVM_SET_SREGS"))?;
        // SAFETY: `check_xsave_fits` confirmed that this vCPU's XSAVE area (KVM_CAP_XSAVE2)
        // is no larger than `kvm_xsave`, so KVM reads only inside the structure.
        unsafe { fd.set_xsave(&xsave) }.map_err(c("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&xcrs).map_err(c("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&dregs).map_err(c("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&lapic).map_err(c("KVM_SET_LAPIC"))?;
        // KVM_SET_MSRS stops at the first MSR it refuses. KVM refuses the paravirtual MSRs
        // that name guest memory (async page faults, PV EOI) while that memory is not
        // registered: the VM thread makes restoring vCPUs wait for it (vm.rs, `MemoryGate`;
        // before that, 5 of 170 warm restores under load in nested KVM lost these MSRs).
        // Should a host still refuse one, the guest only loses a hint it checks in shared
        // memory (async page faults, steal time, PV EOI), so such an MSR is left out with a
        // warning and the rest set. Any other refused MSR fails the restore.
        let mut rest: &[kvm_msr_entry] = &msrs;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let list = Msrs::from_entries(chunk)
                .map_err(|e| Error::BadState(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&list).map_err(c("KVM_SET_MSRS"))?;
            if n < chunk.len() {
                let refused = chunk[n];
                if !OPTIONAL_PV_MSRS.contains(&refused.index) {
                    return Err(Error::BadState(format!(
                        "KVM refused MSR {:#x} of the saved state",
                        refused.index
                    )));
                }
                tracing::warn!(
                    msr = format!("{:#x}", refused.index),
                    value = format!("{:#x}", refused.data),
                    "KVM refused an optional paravirtual MSR of the saved state; left out"
                );
                rest = &rest[n + 1..];
            } else {
                rest = &rest[chunk.len()..];
            }
        }
        fd.set_vcpu_events(&events)
            .map_err(c("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// KVM paravirtual MSRs a restore may leave out (see `restore_state`): async page faults
/// (enable, interrupt vector, ack), steal time, PV EOI, poll control.
const OPTIONAL_PV_MSRS: [u32; 6] = [
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d05,
    0x4b56_4d06,
    0x4b56_4d07,
];

/// Decodes an x86 debug exit: `#BP` (3) is a breakpoint instruction; `#DB` (1) is a single
/// step (DR6.BS) or hardware breakpoint n (DR6.Bn).
fn debug_exit(d: &kvm_debug_exit_arch) -> DebugExit {
    let kind = match d.exception {
        3 => DebugKind::SwBreakpoint,
        1 if d.dr6 & (1 << 14) != 0 => DebugKind::Step,
        1 if d.dr6 & 0xf != 0 => DebugKind::HwBreakpoint(d.dr6.trailing_zeros() as u8),
        _ => DebugKind::Other,
    };
    DebugExit { kind, pc: d.pc }
}

/// `KVM_GUESTDBG_*` flags and debug registers for `debug` (DR7: the global enable bit of each
/// breakpoint used, type "execute", length 1; plus GE and the reserved bit 10, as QEMU sets).
fn guest_debug_struct(debug: &GuestDebug, extra: u32) -> kvm_guest_debug {
    use kvm_bindings::{
        KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
        KVM_GUESTDBG_USE_SW_BP,
    };
    let mut g = kvm_guest_debug::default();
    if !debug.enabled {
        // KVM honours INJECT_BP without ENABLE (and then turns debugging off).
        g.control = extra;
        return g;
    }
    g.control = KVM_GUESTDBG_ENABLE | extra;
    if debug.single_step {
        g.control |= KVM_GUESTDBG_SINGLESTEP;
    }
    if debug.sw_breakpoints {
        g.control |= KVM_GUESTDBG_USE_SW_BP;
    }
    let mut dr7 = 0x600u64;
    for (n, addr) in debug.hw_breakpoints.iter().enumerate() {
        if let Some(a) = addr {
            g.arch.debugreg[n] = *a;
            dr7 |= 2 << (n * 2);
        }
    }
    if dr7 != 0x600 {
        g.control |= KVM_GUESTDBG_USE_HW_BP;
        g.arch.debugreg[7] = dr7;
    }
    g
}

impl KvmVcpu {
    /// Snapshots use the 4 KiB `kvm_xsave`; a host whose XSAVE area is larger (AMX) would need
    /// KVM_GET_XSAVE2, which this backend does not use yet.
    fn check_xsave_fits(&self) -> Result<()> {
        let size = self.kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if usize::try_from(size).unwrap_or(0) > std::mem::size_of::<kvm_xsave>() {
            return Err(Error::Unsupported(format!(
                "snapshots of vCPUs with a {size}-byte XSAVE area (AMX hosts)"
            )));
        }
        Ok(())
    }

    /// Every MSR KVM lists for saving (KVM_GET_MSR_INDEX_LIST) that this vCPU can read; an
    /// MSR the vCPU does not have (its CPUID lacks the feature) is left out.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| Error::call("KVM_GET_MSR_INDEX_LIST", errno(e)))?;
        let indices = list.as_slice();
        let mut out = Vec::new();
        let mut i = 0;
        while i < indices.len() {
            let end = (i + KVM_MAX_MSR_ENTRIES).min(indices.len());
            let entries: Vec<kvm_msr_entry> = indices[i..end]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Unsupported(format!("MSR list: {e:?}")))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| Error::call("KVM_GET_MSRS", errno(e)))?;
            out.extend_from_slice(&msrs.as_slice()[..n.min(entries.len())]);
            // KVM stops at the first MSR it cannot read: skip that one.
            i += n + usize::from(n < entries.len());
        }
        Ok(out)
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kicker.vcpu_gone();
    }
}

impl KvmVcpu {
    fn apply_guest_debug(&mut self, debug: &GuestDebug, extra: u32) -> Result<()> {
        let mut extra = extra;
        if debug.enabled && debug.single_step {
            // Keep interrupts out of a single step where the host can (Linux 5.16+): a step
            // otherwise lands in whichever interrupt handler is pending.
            let caps = self
                .kvm
                .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2));
            if caps > 0 && (caps as u32) & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0 {
                extra |= kvm_bindings::KVM_GUESTDBG_BLOCKIRQ;
            }
        }
        let g = guest_debug_struct(debug, extra);
        tracing::debug!(
            control = format!("{:#x}", g.control),
            dr7 = format!("{:#x}", g.arch.debugreg[7]),
            "KVM_SET_GUEST_DEBUG"
        );
        self.fd
            .set_guest_debug(&g)
            .map_err(|e| Error::call("KVM_SET_GUEST_DEBUG", errno(e)))
    }
}

fn to_kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn from_kvm_seg(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
    }
}

impl VcpuX86_64 for KvmVcpu {
    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| Error::call("KVM_GET_REGS", errno(e)))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        let k = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd
            .set_regs(&k)
            .map_err(|e| Error::call("KVM_SET_REGS", errno(e)))
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", errno(e)))?;
        Ok(Sregs {
            cs: from_kvm_seg(&s.cs),
            ds: from_kvm_seg(&s.ds),
            es: from_kvm_seg(&s.es),
            fs: from_kvm_seg(&s.fs),
            gs: from_kvm_seg(&s.gs),
            ss: from_kvm_seg(&s.ss),
            tr: from_kvm_seg(&s.tr),
            ldt: from_kvm_seg(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    fn set_sregs(&mut self, n: &Sregs) -> Result<()> {
        let mut s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", errno(e)))?;
        s.cs = to_kvm_seg(&n.cs);
        s.ds = to_kvm_seg(&n.ds);
        s.es = to_kvm_seg(&n.es);
        s.fs = to_kvm_seg(&n.fs);
        s.gs = to_kvm_seg(&n.gs);
        s.ss = to_kvm_seg(&n.ss);
        s.tr = to_kvm_seg(&n.tr);
        s.ldt = to_kvm_seg(&n.ldt);
        s.gdt.base = n.gdt.base;
        s.gdt.limit = n.gdt.limit;
        s.idt.base = n.idt.base;
        s.idt.limit = n.idt.limit;
        s.cr0 = n.cr0;
        s.cr3 = n.cr3;
        s.cr4 = n.cr4;
        s.efer = n.efer;
        self.fd
            .set_sregs(&s)
            .map_err(|e| Error::call("KVM_SET_SREGS", errno(e)))
    }

    fn reset_fpu(&mut self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| Error::call("KVM_SET_FPU", errno(e)))
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<usize> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Unsupported(format!("too many MSRs: {e:?}")))?;
        self.fd
            .set_msrs(&msrs)
            .map_err(|e| Error::call("KVM_SET_MSRS", errno(e)))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(self.supported_cpuid.as_ref().clone())
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        let k: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&k)
            .map_err(|e| Error::Unsupported(format!("too many CPUID leaves: {e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::call("KVM_SET_CPUID2", errno(e)))
    }

    fn setup_lapic_lints(&mut self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_NMI: u32 = 0x4;
        const MODE_EXTINT: u32 = 0x7;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::call("KVM_GET_LAPIC", errno(e)))?;
        for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
            let mut b = [0u8; 4];
            for (i, v) in b.iter_mut().enumerate() {
                *v = lapic.regs[off + i] as u8;
            }
            let reg = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, v) in reg.to_le_bytes().iter().enumerate() {
                lapic.regs[off + i] = *v as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::call("KVM_SET_LAPIC", errno(e)))
    }
}
