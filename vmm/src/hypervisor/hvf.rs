//! Hypervisor.framework backend (macOS on Apple silicon), through `applevisor`.
//!
//! - One VM per process (a framework limit). It is created with the framework's GICv3
//!   (macOS 15+) at the addresses the FDT describes ([`firmware_free_boot::aarch64::layout`]);
//!   [`Vm::set_irq_line`] is `hv_gic_set_spi(32 + spi)`.
//! - Guest RAM is mapped with `hv_vm_map` straight from the VMM's `GuestMemoryMmap`.
//! - A vCPU belongs to the thread that created it: [`Vm::create_vcpu`] must run on the vCPU's
//!   own thread, and the returned [`HvfVcpu`] must stay there (checked at run time).
//! - Exits go through the plain logic in [`super::aarch64`], unit-tested on Linux with
//!   synthetic exits: [`super::aarch64::exit::handle_exception`] decodes ESR_EL2 (data aborts
//!   become [`VcpuExit::Mmio`], completed by [`super::aarch64::exit::complete_mmio`]; HVC/SMC
//!   are PSCI, answered by [`super::aarch64::power::PowerStates`]: power off/reset become
//!   [`VcpuExit::SystemEvent`], a warm `SYSTEM_RESET2` a crash as on KVM; trapped system
//!   registers follow [`super::aarch64::sysreg`]). WFI parks the thread until the virtual
//!   timer's deadline ([`super::aarch64::vtimer`]), an interrupt line change or a kick; the
//!   virtual timer's PPI is injected on `VTIMER_ACTIVATED`.
//!
//! # Secondary CPUs
//!
//! Every vCPU other than 0 starts powered off, as PSCI requires. A guest `CPU_ON` is recorded in
//! the VM's shared PSCI state (see [`HvfVm::take_cpu_on_request`]) and answered `SUCCESS`; the
//! target vCPU, parked inside its own [`Vcpu::run`], takes the request and starts at the
//! requested entry with X0 = context id. The VMM therefore just calls `run` on every vCPU; a
//! powered-off vCPU's `run` returns [`VcpuExit::Interrupted`] now and then so its thread can
//! check for stop.

use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use applevisor::prelude as av;
use firmware_free_boot::aarch64::layout;

use super::aarch64::esr::MmioAccess;
use super::aarch64::exit::{self, Fatal, Regs, Step};
pub use super::aarch64::power::CpuOnRequest;
use super::aarch64::power::PowerStates;
use super::aarch64::psci;
use super::aarch64::vtimer;
use super::aarch64::{Reg, SysReg, BOOT_PSTATE};
use super::{
    Access, Error, Hypervisor, MemoryRegion, Result, Vcpu, VcpuAarch64, VcpuExit, VcpuKicker, Vm,
};

// `hv_vm_map` with a caller-owned host buffer: `applevisor` only maps memory it allocates
// itself. The framework is already linked by `applevisor-sys`.
#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    fn hv_vm_map(addr: *const c_void, ipa: u64, size: usize, flags: u64) -> i32;
}

#[repr(C)]
#[derive(Default)]
struct MachTimebaseInfo {
    numer: u32,
    denom: u32,
}

extern "C" {
    fn mach_absolute_time() -> u64;
    fn mach_timebase_info(info: *mut MachTimebaseInfo) -> i32;
}

const HV_MEMORY_READ: u64 = 1;
const HV_MEMORY_WRITE: u64 = 1 << 1;
const HV_MEMORY_EXEC: u64 = 1 << 2;

/// INTID of SPI 0.
const SPI_INTID_BASE: u32 = 32;
/// INTID of the EL1 virtual timer PPI.
const VTIMER_INTID: u32 = 27;
/// Longest a WFI or a powered-off vCPU parks before re-checking.
const MAX_PARK: Duration = Duration::from_millis(20);
/// Slice of a WFI park between checks for pending SGIs/PPIs (IPIs from other vCPUs land in
/// the framework's GIC without waking this thread).
const PARK_SLICE: Duration = Duration::from_millis(1);

fn hv(call: &'static str) -> impl Fn(av::HypervisorError) -> Error {
    move |e| Error::call(call, std::io::Error::other(e.to_string()))
}

/// The Hypervisor.framework.
#[derive(Debug)]
pub struct Hvf {
    max_vcpus: u32,
}

impl Hypervisor for Hvf {
    type Vm = HvfVm;

    fn new() -> Result<Self> {
        let max = av::Vcpu::get_max_count().map_err(|e| match e {
            av::HypervisorError::Denied => Error::NoPermission(
                "Hypervisor.framework (sign the vmm binary with the com.apple.security.hypervisor entitlement)"
                    .into(),
            ),
            av::HypervisorError::Unsupported | av::HypervisorError::NoDevice => {
                Error::NoDevice("Hypervisor.framework support (Apple silicon, macOS 15+)".into())
            }
            e => hv("hv_vm_get_max_vcpu_count")(e),
        })?;
        Ok(Hvf { max_vcpus: max })
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    fn create_vm(&self, vcpus: u32) -> Result<HvfVm> {
        if vcpus > self.max_vcpus {
            return Err(Error::TooManyVcpus {
                requested: vcpus,
                max: self.max_vcpus,
            });
        }
        let dist =
            av::GicConfig::get_distributor_size().map_err(hv("hv_gic_get_distributor_size"))?;
        let redist =
            av::GicConfig::get_redistributor_size().map_err(hv("hv_gic_get_redistributor_size"))?;
        if dist as u64 > layout::GIC_DIST_SIZE
            || redist as u64 > layout::GIC_REDIST_SIZE_PER_CPU
            || u64::from(vcpus) * redist as u64 > layout::GIC_REDIST_ROOM
        {
            return Err(Error::Unsupported(format!(
                "the framework's GIC (distributor {dist:#x} bytes, redistributor {redist:#x} per vCPU) does not fit Skiff's layout"
            )));
        }
        let mut gic = av::GicConfig::new();
        gic.set_distributor_base(layout::GIC_DIST_ADDR)
            .map_err(hv("hv_gic_config_set_distributor_base"))?;
        gic.set_redistributor_base(layout::GIC_REDIST_ADDR)
            .map_err(hv("hv_gic_config_set_redistributor_base"))?;
        let mut cfg = av::VirtualMachineConfig::default();
        // RAM starts at 2 GiB: ask for the largest IPA space the host offers.
        if let Ok(bits) = av::VirtualMachineConfig::get_max_ipa_size() {
            cfg.set_ipa_size(bits)
                .map_err(hv("hv_vm_config_set_ipa_size"))?;
        }
        let vm = av::VirtualMachine::with_gic(cfg, gic).map_err(|e| match e {
            av::HypervisorError::Busy => {
                Error::Unsupported("this process already has a Hypervisor.framework VM".into())
            }
            av::HypervisorError::Denied => Error::NoPermission(
                "Hypervisor.framework (missing com.apple.security.hypervisor entitlement)".into(),
            ),
            e => hv("hv_vm_create/hv_gic_create")(e),
        })?;
        let (spi_base, spi_count) = av::GicConfig::get_spi_interrupt_range()
            .map_err(hv("hv_gic_get_spi_interrupt_range"))?;
        let mut timebase = MachTimebaseInfo::default();
        // SAFETY: `mach_timebase_info` writes one `mach_timebase_info` struct (two u32, the
        // layout of `MachTimebaseInfo`) through a valid pointer to a local.
        let rc = unsafe { mach_timebase_info(&mut timebase) };
        if rc != 0 || timebase.denom == 0 {
            // Apple silicon: 24 MHz ticks are 125/3 ns.
            timebase = MachTimebaseInfo {
                numer: 125,
                denom: 3,
            };
        }
        Ok(HvfVm {
            vm,
            shared: Arc::new(Shared::default()),
            spi_base,
            spi_count,
            timebase: (timebase.numer, timebase.denom),
        })
    }
}

#[derive(Debug, Default)]
struct PsciState {
    /// The vCPUs' PSCI power states.
    power: PowerStates,
    /// vCPU ids kicked since their last check.
    kicked: HashSet<u32>,
    /// Bumped on every interrupt line change, so a parked vCPU re-enters the guest.
    irq_gen: u64,
}

/// Per-VM state shared by the vCPUs, their kickers and the VM handle.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<PsciState>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PsciState> {
        // A poisoned lock only means another vCPU thread panicked; the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_cpu_on(&self, mpidr: u64) -> Option<CpuOnRequest> {
        self.lock().power.take_cpu_on(mpidr)
    }

    fn kick(&self, id: u32) {
        self.lock().kicked.insert(id);
        self.cv.notify_all();
    }

    fn take_kick(&self, id: u32) -> bool {
        self.lock().kicked.remove(&id)
    }
}

/// A Hypervisor.framework VM with its GIC.
#[derive(Debug)]
pub struct HvfVm {
    vm: av::VirtualMachineInstance<av::GicEnabled>,
    shared: Arc<Shared>,
    spi_base: u32,
    spi_count: u32,
    timebase: (u32, u32),
}

impl HvfVm {
    /// Takes the pending `CPU_ON` request for the vCPU with MPIDR affinity `mpidr`, marking it
    /// on. A vCPU created by this VM does this itself inside [`Vcpu::run`]; a VMM only calls it
    /// to inspect or start CPUs its own way.
    pub fn take_cpu_on_request(&self, mpidr: u64) -> Option<CpuOnRequest> {
        self.shared.take_cpu_on(mpidr)
    }
}

/// Snapshots need the GIC state (`hv_gic_state_*`) and every vCPU's system registers saved
/// and restored; not written yet on this backend.
const SNAPSHOT_UNSUPPORTED: &str =
    "snapshots are not supported on Hypervisor.framework yet (boot with --cold)";

impl Vm for HvfVm {
    type Vcpu = HvfVcpu;

    fn add_memory_region(&self, region: MemoryRegion) -> Result<()> {
        let size = usize::try_from(region.size)
            .map_err(|_| Error::Unsupported(format!("region of {} bytes", region.size)))?;
        // SAFETY: the caller guarantees (trait contract) that `host_addr .. + size` is a valid
        // mapping owned by the VMM for the VM's lifetime; the framework only records it.
        let rc = unsafe {
            hv_vm_map(
                region.host_addr as *const c_void,
                region.guest_addr,
                size,
                HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC,
            )
        };
        if rc != 0 {
            return Err(hv("hv_vm_map")(av::HypervisorError::from(rc)));
        }
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<HvfVcpu> {
        let vcpu = self.vm.vcpu_create().map_err(hv("hv_vcpu_create"))?;
        let sctlr = vcpu
            .get_sys_reg(av::SysReg::SCTLR_EL1)
            .map_err(hv("hv_vcpu_get_sys_reg(SCTLR_EL1)"))?;
        // PSCI only finds the vCPU once its MPIDR is set (`VcpuAarch64::set_sys_reg`): the
        // framework's default MPIDRs are not guaranteed to be distinct.
        let powered = id == 0;
        Ok(HvfVcpu {
            vcpu,
            id,
            thread: std::thread::current().id(),
            vm: self.vm.clone(),
            shared: self.shared.clone(),
            mpidr: None,
            reset_sctlr: sctlr,
            powered,
            pending_mmio: None,
            vtimer_masked: false,
            timebase: self.timebase,
        })
    }

    fn set_irq_line(&self, irq: u32, high: bool) -> Result<()> {
        let intid = SPI_INTID_BASE
            .checked_add(irq)
            .filter(|i| *i >= self.spi_base && *i - self.spi_base < self.spi_count)
            .ok_or_else(|| Error::Unsupported(format!("SPI {irq} is outside the GIC's range")))?;
        self.vm
            .gic_set_spi(intid, high)
            .map_err(hv("hv_gic_set_spi"))?;
        if high {
            self.shared.lock().irq_gen += 1;
            self.shared.cv.notify_all();
        }
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn restore_state(&self, _state: &[u8]) -> Result<()> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }
}

/// Kicks one vCPU: `hv_vcpus_exit`, plus a wake-up if it is parked in WFI or powered off.
#[derive(Debug)]
pub struct HvfKicker {
    vm: av::VirtualMachineInstance<av::GicEnabled>,
    handle: av::VcpuHandle,
    shared: Arc<Shared>,
    id: u32,
}

impl VcpuKicker for HvfKicker {
    fn kick(&self) {
        self.shared.kick(self.id);
        let _ = self.vm.vcpus_exit(std::slice::from_ref(&self.handle));
    }
}

/// A Hypervisor.framework vCPU. It must be used and dropped on the thread that created it.
#[derive(Debug)]
pub struct HvfVcpu {
    vcpu: av::Vcpu,
    id: u32,
    thread: ThreadId,
    vm: av::VirtualMachineInstance<av::GicEnabled>,
    shared: Arc<Shared>,
    /// MPIDR affinity, once the VMM set it; the key of this vCPU's PSCI power state.
    mpidr: Option<u64>,
    reset_sctlr: u64,
    powered: bool,
    pending_mmio: Option<MmioAccess>,
    vtimer_masked: bool,
    timebase: (u32, u32),
}

// SAFETY: the framework binds a vCPU to the thread that created it, which is why
// `applevisor::Vcpu` is `!Send`. The `Vcpu` trait needs `Send` only so the VMM can hold the
// vCPU in a thread-spawning closure; Skiff creates each vCPU on its own thread
// (`Vm::create_vcpu` contract) and never moves it, and every call into the framework here first
// checks that it runs on the creating thread (`check_thread`).
unsafe impl Send for HvfVcpu {}

fn av_reg(reg: Reg) -> Result<av::Reg> {
    use av::Reg as R;
    const X: [av::Reg; 31] = [
        R::X0,
        R::X1,
        R::X2,
        R::X3,
        R::X4,
        R::X5,
        R::X6,
        R::X7,
        R::X8,
        R::X9,
        R::X10,
        R::X11,
        R::X12,
        R::X13,
        R::X14,
        R::X15,
        R::X16,
        R::X17,
        R::X18,
        R::X19,
        R::X20,
        R::X21,
        R::X22,
        R::X23,
        R::X24,
        R::X25,
        R::X26,
        R::X27,
        R::X28,
        R::X29,
        R::X30,
    ];
    match reg {
        Reg::X(n) => X
            .get(usize::from(n))
            .copied()
            .ok_or_else(|| Error::Unsupported(format!("register X{n}"))),
        Reg::Pc => Ok(R::PC),
        Reg::Pstate => Ok(R::CPSR),
    }
}

/// What the exit handler loop does next.
enum Next {
    Resume,
    Exit(VcpuExit),
}

impl HvfVcpu {
    fn check_thread(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            return Err(Error::Unsupported(
                "a Hypervisor.framework vCPU was used from a thread other than its creator".into(),
            ));
        }
        Ok(())
    }

    fn get(&self, reg: Reg) -> Result<u64> {
        self.vcpu
            .get_reg(av_reg(reg)?)
            .map_err(hv("hv_vcpu_get_reg"))
    }

    fn put(&self, reg: Reg, value: u64) -> Result<()> {
        self.vcpu
            .set_reg(av_reg(reg)?, value)
            .map_err(hv("hv_vcpu_set_reg"))
    }

    fn sys(&self, reg: av::SysReg) -> Result<u64> {
        self.vcpu
            .get_sys_reg(reg)
            .map_err(hv("hv_vcpu_get_sys_reg"))
    }

    /// Starts this vCPU at a `CPU_ON` entry: EL1h, DAIF masked, MMU off, X0 = context id.
    fn start_at(&mut self, req: CpuOnRequest) -> Result<()> {
        self.vcpu
            .set_sys_reg(av::SysReg::SCTLR_EL1, self.reset_sctlr)
            .map_err(hv("hv_vcpu_set_sys_reg(SCTLR_EL1)"))?;
        self.put(Reg::Pstate, BOOT_PSTATE)?;
        self.put(Reg::X(0), req.context_id)?;
        self.put(Reg::Pc, req.entry)?;
        self.powered = true;
        Ok(())
    }

    /// Waits for a `CPU_ON` aimed at this vCPU. `None` after a kick or a timeout.
    fn wait_for_cpu_on(&mut self) -> Option<CpuOnRequest> {
        let deadline = Instant::now() + MAX_PARK;
        let mut s = self.shared.lock();
        loop {
            if s.kicked.remove(&self.id) {
                return None;
            }
            if let Some(mpidr) = self.mpidr {
                if let Some(req) = s.power.take_cpu_on(mpidr) {
                    return Some(req);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = match self.shared.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// How long until the virtual timer fires: `None` when it is off or masked, zero when due.
    fn vtimer_remaining(&self) -> Result<Option<Duration>> {
        let ctl = self.sys(av::SysReg::CNTV_CTL_EL0)?;
        let cval = self.sys(av::SysReg::CNTV_CVAL_EL0)?;
        let offset = self
            .vcpu
            .get_vtimer_offset()
            .map_err(hv("hv_vcpu_get_vtimer_offset"))?;
        // SAFETY: `mach_absolute_time` has no preconditions.
        let now = unsafe { mach_absolute_time() }.wrapping_sub(offset);
        Ok(vtimer::remaining(ctl, cval, now, self.timebase))
    }

    /// Unmasks the virtual timer once the guest has dealt with its interrupt (the framework
    /// masks it when it reports `VTIMER_ACTIVATED`).
    fn sync_vtimer(&mut self) -> Result<()> {
        if !self.vtimer_masked {
            return Ok(());
        }
        let ctl = self.sys(av::SysReg::CNTV_CTL_EL0)?;
        if !vtimer::asserted(ctl) {
            self.vcpu
                .set_vtimer_mask(false)
                .map_err(hv("hv_vcpu_set_vtimer_mask"))?;
            self.vtimer_masked = false;
        }
        Ok(())
    }

    /// Marks the virtual timer PPI pending in this vCPU's redistributor.
    fn inject_vtimer(&mut self) -> Result<()> {
        let reg = av::GicRedistributorReg::ISPENDR0;
        let pending = self
            .vcpu
            .get_redistributor_reg(reg)
            .map_err(hv("hv_gic_get_redistributor_reg"))?;
        self.vcpu
            .set_redistributor_reg(reg, pending | (1 << VTIMER_INTID))
            .map_err(hv("hv_gic_set_redistributor_reg"))?;
        self.vtimer_masked = true;
        Ok(())
    }

    fn sgi_ppi_pending(&self) -> bool {
        self.vcpu
            .get_redistributor_reg(av::GicRedistributorReg::ISPENDR0)
            .map(|v| v != 0)
            .unwrap_or(true)
    }

    /// WFI: parks until the virtual timer is due, an interrupt line rises, an SGI/PPI becomes
    /// pending, or a kick. Returns whether a kick ended it.
    fn park(&mut self, irq_gen: u64) -> Result<bool> {
        let wait = match self.vtimer_remaining()? {
            Some(d) => d.min(MAX_PARK),
            None => MAX_PARK,
        };
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut s = self.shared.lock();
                if s.kicked.remove(&self.id) {
                    return Ok(true);
                }
                if s.irq_gen != irq_gen {
                    return Ok(false);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok(false);
                }
                let slice = (deadline - now).min(PARK_SLICE);
                drop(match self.shared.cv.wait_timeout(s, slice) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                });
            }
            if self.sgi_ppi_pending() {
                return Ok(false);
            }
        }
    }

    fn handle_exception(&mut self, e: av::VcpuExitException, irq_gen: u64) -> Result<Next> {
        let shared = self.shared.clone();
        let me = self.mpidr;
        let step = exit::handle_exception(self, e.syndrome, e.physical_address, |call| {
            let out = shared.lock().power.handle(call, me);
            shared.cv.notify_all();
            out
        })?;
        Ok(match step {
            Step::Resume => Next::Resume,
            Step::Yield => {
                std::thread::yield_now();
                Next::Resume
            }
            Step::Wfi => {
                if self.park(irq_gen)? {
                    Next::Exit(VcpuExit::Interrupted)
                } else {
                    Next::Resume
                }
            }
            Step::Mmio(access) => {
                self.pending_mmio = Some(access);
                Next::Exit(VcpuExit::Mmio)
            }
            Step::CpuOff => {
                self.powered = false;
                Next::Resume
            }
            Step::SystemEvent(ev) => Next::Exit(VcpuExit::SystemEvent(ev)),
            Step::Fatal(f) => {
                match f {
                    Fatal::InstructionAbort(addr) => {
                        tracing::error!(vcpu = self.id, addr, "guest executed from unmapped memory")
                    }
                    Fatal::DataAbortWithoutSyndrome(addr) => tracing::error!(
                        vcpu = self.id,
                        addr,
                        "guest MMIO access without a syndrome (cannot be emulated)"
                    ),
                    Fatal::Unhandled => {
                        tracing::error!(
                            vcpu = self.id,
                            esr = e.syndrome,
                            "unhandled guest exception"
                        )
                    }
                }
                Next::Exit(VcpuExit::InternalError(e.syndrome))
            }
        })
    }
}

impl Regs for HvfVcpu {
    type Error = Error;

    fn get(&self, reg: Reg) -> Result<u64> {
        HvfVcpu::get(self, reg)
    }

    fn set(&mut self, reg: Reg, value: u64) -> Result<()> {
        self.put(reg, value)
    }
}

impl Vcpu for HvfVcpu {
    fn run(&mut self) -> Result<VcpuExit> {
        self.check_thread()?;
        loop {
            if self.shared.take_kick(self.id) {
                return Ok(VcpuExit::Interrupted);
            }
            if !self.powered {
                match self.wait_for_cpu_on() {
                    Some(req) => self.start_at(req)?,
                    None => return Ok(VcpuExit::Interrupted),
                }
            }
            self.sync_vtimer()?;
            let irq_gen = self.shared.lock().irq_gen;
            self.vcpu.run().map_err(hv("hv_vcpu_run"))?;
            let exit = self.vcpu.get_exit_info();
            let next = match exit.reason {
                av::ExitReason::CANCELED => Next::Exit(VcpuExit::Interrupted),
                av::ExitReason::VTIMER_ACTIVATED => {
                    self.inject_vtimer()?;
                    Next::Resume
                }
                av::ExitReason::EXCEPTION => self.handle_exception(exit.exception, irq_gen)?,
                av::ExitReason::UNKNOWN => Next::Exit(VcpuExit::Other(3)),
            };
            if let Next::Exit(e) = next {
                return Ok(e);
            }
        }
    }

    fn handle_io(&mut self, _f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        Err(Error::Unsupported(
            "port I/O does not exist on aarch64".into(),
        ))
    }

    fn handle_mmio(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
        self.check_thread()?;
        let a = self.pending_mmio.take().ok_or_else(|| {
            Error::Unsupported("handle_mmio called without a pending MMIO exit".into())
        })?;
        exit::complete_mmio(self, &a, f)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(HvfKicker {
            vm: self.vm.clone(),
            handle: self.vcpu.get_handle(),
            shared: self.shared.clone(),
            id: self.id,
        })
    }
    fn save_state(&mut self) -> Result<Vec<u8>> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn restore_state(&mut self, _state: &[u8]) -> Result<()> {
        Err(Error::Unsupported(SNAPSHOT_UNSUPPORTED.into()))
    }

    fn set_guest_debug(&mut self, _debug: &super::GuestDebug) -> Result<()> {
        Err(Error::Unsupported(super::GUEST_DEBUG_UNSUPPORTED.into()))
    }

    fn reinject_breakpoint(&mut self, _debug: &super::GuestDebug) -> Result<()> {
        Err(Error::Unsupported(super::GUEST_DEBUG_UNSUPPORTED.into()))
    }
}

impl VcpuAarch64 for HvfVcpu {
    fn reg(&self, reg: Reg) -> Result<u64> {
        self.check_thread()?;
        self.get(reg)
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        self.check_thread()?;
        self.put(reg, value)
    }

    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<()> {
        self.check_thread()?;
        match reg {
            SysReg::MpidrEl1 => {
                self.vcpu
                    .set_sys_reg(av::SysReg::MPIDR_EL1, value)
                    .map_err(hv("hv_vcpu_set_sys_reg(MPIDR_EL1)"))?;
                // Re-key this vCPU's PSCI power state under its new affinity.
                let new = psci::mpidr_affinity(value);
                let old = self.mpidr.replace(new);
                self.shared.lock().power.register(old, new, self.powered);
                Ok(())
            }
        }
    }
}
