//! Builds a VM from a [`VmConfig`], runs its vCPUs (one thread each, created on that thread),
//! and returns how the guest ended.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_devices::legacy::{BootTimer, SerialConsole, MAX_BOOT_STAMPS};
use skiff_devices::{Bus, BusDevice, EventSink, IrqTrigger, VmExitRequest};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::arch::{self, BootConfig};
use crate::console_log::{CappedLog, CONSOLE_LOG_CAP};
use crate::hypervisor::{self, Access, Hypervisor, MemoryRegion, SystemEvent, Vcpu, VcpuExit, Vm};
use crate::snapshot;
use crate::timings::{Phase, Timings};
pub use crate::vm_control::{ControlError, VmControl};

type Hv = hypervisor::Backend;
type HvVm = <Hv as Hypervisor>::Vm;
type HvVcpu = <HvVm as Vm>::Vcpu;
type Debugger = crate::gdb::DebugControl<HvVcpu>;

/// Default kernel command line for Linux guests: serial console, quiet, reboot through the
/// i8042 (so the VMM sees it), a panic reboots at once and marks the reboot "warm" so the VMM
/// can tell a panic from a clean reboot.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 quiet reboot=k,panic_warm panic=-1 pci=off nomodules";

/// Smallest guest RAM accepted.
pub const MIN_MEMORY_MIB: u64 = 2;

/// Where the serial console goes.
#[derive(Debug, Clone)]
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated), capped at [`CONSOLE_LOG_CAP`] bytes: when full it is
    /// renamed to `<file>.1` (replacing an older one) and a new file is started, so at most
    /// twice the cap is on disk and the newest output is always in the file itself.
    File(PathBuf),
    /// Nowhere.
    Null,
}

/// Whether to create the legacy PIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PitMode {
    /// Only for Linux kernels (which calibrate against it).
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Serial console destination.
    pub serial: SerialOut,
    /// Legacy PIT.
    pub pit: PitMode,
    /// Take a snapshot when the guest asks for one, then end the VM.
    pub snapshot: Option<SnapshotAt>,
    /// Restore this snapshot instead of booting `kernel` (`kernel`, `initrd`, `cmdline`,
    /// `cpus`, `memory_mib` and `pit` then come from the snapshot).
    pub restore: Option<RestoreFrom>,
    /// Input for the guest's UART (the interactive console, see [`crate::console`]).
    pub serial_in: Option<crate::console::SerialIn>,
    /// GDB's connection: the vCPUs wait for it before their first instruction (see
    /// [`crate::gdb`]).
    pub gdb: Option<crate::gdb::GdbConnection>,
}

/// The snapshot a VM is restored from.
#[derive(Debug, Clone)]
pub enum RestoreFrom {
    /// A snapshot directory, read and checked when the VM is built.
    Dir(PathBuf),
    /// A snapshot already read and checked (a template).
    Loaded(Arc<snapshot::Loaded>),
}

/// When and where [`VmConfig::snapshot`] saves the VM.
#[derive(Debug, Clone)]
pub struct SnapshotAt {
    /// The snapshot directory (created; must not exist yet, or hold a valid snapshot).
    pub dir: PathBuf,
    /// The boot-timer value the guest writes to ask for it (a tiny guest: whenever it likes;
    /// the Skiff agent: once it is ready and idle).
    pub stamp: u8,
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (a clean `reboot`, how Linux guests stop here).
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// The vCPU hit a triple fault.
    TripleFault,
    /// The hypervisor could not run the guest (emulation failure, bad state).
    HypervisorError(u64),
    /// The host ended the VM ([`VmControl::stop`]), whatever the guest was doing.
    Stopped,
    /// The VM was saved as [`VmConfig::snapshot`] asked, then ended.
    Snapshotted,
}

impl GuestExit {
    /// The `vmm` process exit status for this ending (see `vmm --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::PowerOff
            | GuestExit::Reset
            | GuestExit::Stopped
            | GuestExit::Snapshotted => 0,
            GuestExit::Panic => 3,
            GuestExit::TripleFault | GuestExit::HypervisorError(_) => 4,
        }
    }
}

/// Errors before or while running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input (exit status 2).
    #[error("{0}")]
    Input(String),
    /// The boot layout failed because of the user's input (kernel, initrd, sizes).
    #[error(transparent)]
    Boot(#[from] firmware_free_boot::Error),
    /// The hypervisor refused something.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    /// Anything else the VMM failed at (exit status 1).
    #[error("{0}")]
    Vmm(String),
}

impl Error {
    /// Whether this is the user's input (exit status 2) rather than a VMM failure (1).
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Input(_) | Error::Boot(_) => true,
            Error::Hypervisor(e) => matches!(
                e,
                hypervisor::Error::NoDevice(_)
                    | hypervisor::Error::NoPermission(_)
                    | hypervisor::Error::TooManyVcpus { .. }
            ),
            Error::Vmm(_) => false,
        }
    }
}

impl From<arch::Error> for Error {
    fn from(e: arch::Error) -> Self {
        match e {
            arch::Error::Boot(b) => Error::Boot(b),
            arch::Error::Hypervisor(h) => Error::Hypervisor(h),
        }
    }
}

/// Result of a VM run.
#[derive(Debug)]
pub struct RunResult {
    /// How the guest ended.
    pub exit: GuestExit,
    /// Phase timings.
    pub timings: Timings,
}

enum Event {
    Exit(GuestExit),
    HostStop,
    Stamp(Phase, Instant),
    VcpuFailed(u32, String),
}

/// Room in the event channel for everything a VM can send: the boot timer reports at most
/// [`MAX_BOOT_STAMPS`] stamps, the i8042 one reset, each vCPU one exit or one failure, plus
/// the first vCPU entry, the first serial byte and the host's stop. Nothing the guest does
/// beyond that reaches the channel, so a send never waits; stamps are sent with `try_send`
/// anyway (dropped rather than queued should the bound ever be wrong).
fn event_queue_len(cpus: u32) -> usize {
    MAX_BOOT_STAMPS as usize + 4 + 2 * cpus as usize
}

struct Sink(Mutex<SyncSender<Event>>);

impl Sink {
    fn send(&self, e: Event) {
        if let Ok(tx) = self.0.lock() {
            let _ = match e {
                Event::Stamp(..) => tx.try_send(e).map_err(|_| ()),
                _ => tx.send(e).map_err(|_| ()),
            };
        }
    }
}

impl EventSink for Sink {
    fn exit_request(&self, req: VmExitRequest) {
        // A reset's meaning (clean or panic) is decided by the main thread from guest memory.
        let exit = match req {
            VmExitRequest::Reset => GuestExit::Reset,
            VmExitRequest::PowerOff => GuestExit::PowerOff,
        };
        self.send(Event::Exit(exit));
    }
    fn boot_stamp(&self, value: u8) {
        self.send(Event::Stamp(Phase::BootStamp(value), Instant::now()));
    }
    fn first_serial_byte(&self) {
        self.send(Event::Stamp(Phase::FirstSerialByte, Instant::now()));
    }
}

fn read_file(what: &str, path: &std::path::Path) -> Result<crate::sys::FileBytes, Error> {
    crate::sys::FileBytes::open(path)
        .map_err(|e| Error::Input(format!("cannot read {what} {}: {e}", path.display())))
}

/// Raw, unbuffered stdout: the guest's bytes reach the host as the guest writes them.
struct RawStdout;
impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Builds one MMIO device once guest memory and the VM exist: gets guest memory, the device's
/// interrupt and, in a VM restored from a snapshot, the state the device saved
/// ([`BusDevice::save_state`]); returns the bus device that serves the slot's register window.
pub type MmioDeviceFactory = Box<
    dyn FnOnce(
            &GuestMemoryMmap,
            IrqTrigger,
            Option<&[u8]>,
        ) -> Result<Arc<Mutex<dyn BusDevice>>, String>
        + Send,
>;

/// A virtio-mmio transport for `device`: new, or restored from `saved`.
pub fn transport(
    device: Box<dyn skiff_devices::virtio::VirtioDevice>,
    mem: &GuestMemoryMmap,
    irq: IrqTrigger,
    saved: Option<&[u8]>,
) -> Result<Arc<Mutex<dyn BusDevice>>, String> {
    use skiff_devices::virtio::mmio::MmioTransport;
    let t = match saved {
        None => MmioTransport::new(device, mem.clone(), irq),
        Some(s) => MmioTransport::restore(device, mem.clone(), irq, s),
    }
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(Mutex::new(t)) as Arc<Mutex<dyn BusDevice>>)
}

/// Boots the VM described by `cfg` and runs it until the guest ends.
pub fn run(cfg: &VmConfig, timings: Timings) -> Result<RunResult, Error> {
    run_with_devices(cfg, timings, Vec::new())
}

/// Like [`run`], with virtio-mmio devices: each factory gets the next free slot (address and
/// interrupt per arch, described to the guest on the command line or in the FDT).
pub fn run_with_devices(
    cfg: &VmConfig,
    timings: Timings,
    devices: Vec<MmioDeviceFactory>,
) -> Result<RunResult, Error> {
    run_controlled(cfg, timings, devices, &VmControl::new())
}

/// Like [`run_with_devices`], controlled from other threads through `control` (pause, resume,
/// stop; see [`VmControl`]). Create the control before calling this and keep a clone. When
/// this returns, for any reason, `control` is stopped.
pub fn run_controlled(
    cfg: &VmConfig,
    mut timings: Timings,
    devices: Vec<MmioDeviceFactory>,
    control: &VmControl,
) -> Result<RunResult, Error> {
    // Every way out of here leaves the control stopped (a pause then fails instead of
    // waiting on a VM that is gone).
    struct StopOnReturn<'a>(&'a VmControl);
    impl Drop for StopOnReturn<'_> {
        fn drop(&mut self) {
            self.0.stop_vcpus();
        }
    }
    let _stop_on_return = StopOnReturn(control);
    let slots_used: Vec<arch::VirtioSlot> = (0..devices.len() as u32)
        .map(|i| {
            arch::current::virtio_slot(i)
                .ok_or_else(|| Error::Input(format!("too many virtio devices ({})", devices.len())))
        })
        .collect::<Result<_, _>>()?;
    let restore = match &cfg.restore {
        None => None,
        Some(from) => {
            let (loaded, dir) = match from {
                RestoreFrom::Dir(dir) => (
                    Arc::new(snapshot::load(dir).map_err(|e| Error::Input(e.to_string()))?),
                    dir.clone(),
                ),
                RestoreFrom::Loaded(l) => (l.clone(), PathBuf::from("(template)")),
            };
            let saved_devices = (0..)
                .take_while(|i| loaded.state.device(&virtio_name(*i)).is_some())
                .count();
            if saved_devices != devices.len() {
                return Err(Error::Input(format!(
                    "snapshot {} has {saved_devices} virtio devices, this VM {}",
                    dir.display(),
                    devices.len()
                )));
            }
            if loaded.state.device(DEV_SERIAL).is_none() {
                return Err(Error::Input(format!(
                    "snapshot {}: no serial console state",
                    dir.display()
                )));
            }
            Some(loaded)
        }
    };
    let mut cfg = cfg.clone();
    if let Some(l) = &restore {
        cfg.cpus = l.state.cpus;
        cfg.memory_mib = l.state.memory_mib;
    }
    let cfg = &cfg;
    if cfg.memory_mib < MIN_MEMORY_MIB {
        return Err(Error::Input(format!(
            "--memory {} is too small: the guest needs at least {MIN_MEMORY_MIB} MiB",
            cfg.memory_mib
        )));
    }
    let mem_bytes = cfg
        .memory_mib
        .checked_mul(1 << 20)
        .filter(|b| *b <= 1 << 46)
        .ok_or_else(|| {
            Error::Input(format!(
                "--memory {} MiB is larger than this VMM supports",
                cfg.memory_mib
            ))
        })?;
    if cfg.cpus == 0 {
        return Err(Error::Input(
            "--cpus 0: a VM needs at least one vCPU".into(),
        ));
    }
    if cfg.cpus > arch::current::MAX_CPUS {
        return Err(Error::Input(format!(
            "--cpus {}: the boot tables describe at most {} vCPUs",
            cfg.cpus,
            arch::current::MAX_CPUS
        )));
    }
    let boot_files = std::iter::once(("kernel", &cfg.kernel))
        .chain(cfg.initrd.iter().map(|p| ("initrd", p)))
        .filter(|_| restore.is_none());
    for (what, p) in boot_files {
        // Fail on a missing file before touching the hypervisor; read it later, in parallel
        // with memory registration.
        std::fs::metadata(p)
            .map_err(|e| Error::Input(format!("cannot read {what} {}: {e}", p.display())))?;
    }
    let serial_out: Box<dyn Write + Send> = match &cfg.serial {
        SerialOut::Stdout => Box::new(RawStdout),
        SerialOut::Null => Box::new(std::io::sink()),
        SerialOut::File(p) => Box::new(
            CappedLog::create(p, CONSOLE_LOG_CAP).map_err(|e| Error::Input(e.to_string()))?,
        ),
    };

    let hv = Hv::new()?;
    let max = hv.max_vcpus();
    if cfg.cpus > max {
        return Err(hypervisor::Error::TooManyVcpus {
            requested: cfg.cpus,
            max,
        }
        .into());
    }
    let vm = Arc::new(hv.create_vm(cfg.cpus)?);
    timings.mark(Phase::VmCreated);

    let mem = match &restore {
        Some(l) => {
            let m = l.map_memory().map_err(|e| Error::Vmm(e.to_string()))?;
            // The VM-wide state (clock, interrupt controllers, PIT) goes in before any vCPU
            // exists.
            vm.restore_state(&l.state.vm)?;
            m
        }
        None => {
            let regions = arch::current::memory_regions(mem_bytes);
            let ranges: Vec<(GuestAddress, usize)> = regions
                .iter()
                .map(|&(a, s)| (GuestAddress(a), s as usize))
                .collect();
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
                Error::Vmm(format!(
                    "cannot allocate {} MiB of guest memory: {e}",
                    cfg.memory_mib
                ))
            })?
        }
    };
    let mut slots = Vec::new();
    for (slot, r) in mem.iter().enumerate() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Vmm(format!("guest memory has no host mapping: {e}")))?;
        slots.push(MemoryRegion {
            slot: slot as u32,
            guest_addr: r.start_addr().0,
            size: r.len(),
            host_addr: host as u64,
        });
    }
    // Registering memory waits for an RCU grace period in the host kernel (0.2-12 ms here):
    // do it in the background while the kernel is loaded and the vCPUs are created. `mem`
    // outlives the VM (it is dropped after the vCPU threads stop), as add_memory_region needs.
    // A restored vCPU's state names guest memory (the paravirtual MSRs: steal time, PV EOI,
    // async page faults), which KVM refuses while the memory is not registered yet, so a
    // restoring vCPU waits for `mem_ready`; a booting one needs no memory to be configured.
    let mem_vm = vm.clone();
    let mem_ready = Arc::new(MemoryGate::default());
    let mem_done = mem_ready.clone();
    let mem_thread = std::thread::spawn(move || -> Result<Instant, hypervisor::Error> {
        // Opens the gate however this thread ends (an error or a panic included): the main
        // thread sees the outcome through `join` and stops the vCPUs.
        let _open = mem_done.opener();
        for r in slots {
            mem_vm.add_memory_region(r)?;
        }
        Ok(Instant::now())
    });
    let boot = match &restore {
        Some(_) => None,
        None => {
            let kernel = read_file("kernel", &cfg.kernel)?;
            let initrd = cfg
                .initrd
                .as_ref()
                .map(|p| read_file("initrd", p))
                .transpose()?;
            let boot_cfg = BootConfig {
                kernel,
                kernel_path: cfg.kernel.clone(),
                initrd,
                cmdline: cfg.cmdline.clone(),
                cpus: cfg.cpus,
                mem_bytes,
                virtio: slots_used.clone(),
            };
            let boot = arch::current::load(&mem, &boot_cfg)?;
            timings.mark(Phase::KernelLoaded);
            Some(boot)
        }
    };
    let vcpu_states: Vec<Vec<u8>> = restore
        .as_ref()
        .map(|l| l.state.vcpus.clone())
        .unwrap_or_default();
    if restore.is_some() {
        timings.mark(Phase::SnapshotRestored);
    }

    let (tx, rx) = sync_channel::<Event>(event_queue_len(cfg.cpus));
    let sink = Arc::new(Sink(Mutex::new(tx.clone())));
    let create_pit = match &boot {
        Some(b) => cfg.pit == PitMode::On || (cfg.pit == PitMode::Auto && is_linux(b)),
        // A restored VM's PIT (if it had one) came back with the VM's state.
        None => false,
    };
    let serial_state = restore.as_ref().and_then(|l| l.state.device(DEV_SERIAL));
    let (pio, mmio, serial) =
        platform_devices(&vm, create_pit, serial_state, serial_out, sink.clone())?;
    if let Some(rx) = cfg.serial_in.as_ref().and_then(|s| s.take()) {
        let (serial, control) = (serial.clone(), control.clone());
        std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || feed_serial(rx, &serial, &control))
            .map_err(|e| Error::Vmm(format!("cannot start the console input thread: {e}")))?;
    }
    let mut mmio = mmio;
    let mut virtio: Vec<Arc<Mutex<dyn BusDevice>>> = Vec::new();
    for (slot, factory) in slots_used.iter().zip(devices) {
        let irq_vm = vm.clone();
        let line = slot.irq;
        // One pulse at a time: a device may signal from several threads (virtio-fs has a
        // worker per queue), and two overlapping high/low pulses make a single edge, so the
        // second interrupt would be lost while the guest is already in its handler.
        let pulse = Mutex::new(());
        let irq = IrqTrigger::new(move || {
            let _g = pulse.lock().unwrap_or_else(|e| e.into_inner());
            let _ = irq_vm.trigger_edge_irq(line);
        });
        let saved = restore
            .as_ref()
            .and_then(|l| l.state.device(&virtio_name(virtio.len())));
        let dev = factory(&mem, irq, saved).map_err(Error::Vmm)?;
        virtio.push(dev.clone());
        mmio.insert(slot.addr, slot.size, dev)
            .map_err(|e| Error::Vmm(e.to_string()))?;
    }
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);

    let stop_tx = Mutex::new(tx.clone());
    control.set_on_stop(Box::new(move || {
        if let Ok(tx) = stop_tx.lock() {
            let _ = tx.send(Event::HostStop);
        }
    }));
    // The snapshot's files are written by a thread of their own, started before the allowlist.
    let writer = match &cfg.snapshot {
        Some(s) => Some(
            snapshot::Writer::spawn(s.dir.clone(), mem.clone())
                .map_err(|e| Error::Vmm(format!("cannot start the snapshot writer: {e}")))?,
        ),
        None => None,
    };
    let (debugger, gdb_thread) = match cfg.gdb.as_ref().and_then(|g| g.take()) {
        Some(conn) => {
            let (d, t) = start_gdb(conn, cfg.cpus, control, &mem)?;
            (Some(d), Some(t))
        }
        None => (None, None),
    };
    // From here on this thread, the vCPU threads and what they spawn (virtio-fs workers, at
    // the guest's device activation) run under the `vmm` seccomp allowlist; the guest has not
    // run yet. The memory thread above ends before it does.
    if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Vmm) {
        let _ = mem_thread.join();
        return Err(Error::Vmm(e.to_string()));
    }
    // Every vCPU must exist before the boot CPU runs: an INIT/SIPI sent to a vCPU that has not
    // been created yet is lost.
    let ready = Arc::new(std::sync::Barrier::new(cfg.cpus as usize + 1));
    let mut threads = Vec::new();
    for id in 0..cfg.cpus {
        let (vm, pio, mmio, control, tx, ready, debugger) = (
            vm.clone(),
            pio.clone(),
            mmio.clone(),
            control.clone(),
            tx.clone(),
            ready.clone(),
            debugger.clone(),
        );
        let cpus = cfg.cpus;
        let snapshot_stamp = cfg.snapshot.as_ref().map(|s| s.stamp);
        let saved = vcpu_states.get(id as usize).cloned();
        let mem_ready = mem_ready.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let sink = Sink(Mutex::new(tx));
                let init = match (&boot, &saved) {
                    (_, Some(state)) => VcpuInit::Restore(state),
                    (Some(b), None) => VcpuInit::Boot(b),
                    (None, None) => {
                        sink.send(Event::VcpuFailed(
                            id,
                            "the snapshot has no state for it".into(),
                        ));
                        return;
                    }
                };
                let ctx = VcpuContext {
                    id,
                    cpus,
                    init,
                    pio: &pio,
                    mmio: &mmio,
                    control: &control,
                    debugger: debugger.as_deref(),
                    snapshot_stamp,
                    mem_ready: &mem_ready,
                };
                if let Err(e) = vcpu_thread(&vm, &ctx, &sink, &ready) {
                    sink.send(Event::VcpuFailed(id, e.to_string()));
                }
                if let Some(d) = &debugger {
                    d.vcpu_gone(id);
                }
            })
            .map_err(|e| Error::Vmm(format!("cannot start vCPU thread: {e}")))?;
        threads.push(t);
    }
    drop(tx);
    // Guest memory must be in place before any vCPU runs.
    let mapped = mem_thread.join();
    if !matches!(mapped, Ok(Ok(_))) {
        control.stop_vcpus();
    }
    ready.wait();
    // Every vCPU exists now (or failed to): the VM's last setup before any of them runs (the
    // in-kernel GIC on arm64), then the second round of the barrier lets them go.
    let created = match mapped {
        Ok(Ok(_)) => vm.vcpus_created(),
        _ => Ok(()),
    };
    if created.is_err() {
        control.stop_vcpus();
    }
    ready.wait();
    if let Err(e) = created {
        stop_vcpus(control, threads);
        return Err(e.into());
    }
    match mapped {
        Ok(Ok(at)) => timings.mark_at(Phase::MemoryMapped, at),
        Ok(Err(e)) => {
            stop_vcpus(control, threads);
            return Err(e.into());
        }
        Err(_) => {
            stop_vcpus(control, threads);
            return Err(Error::Vmm("the memory-mapping thread panicked".into()));
        }
    }
    if restore.is_some() {
        // Interrupts the restored devices raised again (a pending InterruptStatus, the vsock
        // transport reset, the UART's "transmitter empty") were raised before any vCPU
        // existed, so no local APIC took them: pulse every device line once more now that
        // the vCPUs are restored. A spurious one is harmless (drivers check their status
        // register first).
        for slot in &slots_used {
            let _ = vm.trigger_edge_irq(slot.irq);
        }
        let _ = vm.trigger_edge_irq(SERIAL_IRQ);
    }

    let exit = loop {
        match rx.recv() {
            Ok(Event::Stamp(p, at)) => {
                tracing::info!(
                    phase = ?p,
                    ms = format!("{:.1}", timings.ms_since_start(at)),
                    "boot phase (ms since VMM start)"
                );
                timings.mark_at(p, at);
                if let (Some(snap), Some(w), Phase::BootStamp(v)) = (&cfg.snapshot, &writer, p) {
                    if v == snap.stamp {
                        let saved =
                            take_snapshot(&vm, cfg, control, &serial, &virtio, w, &snap.dir);
                        if let Err(e) = saved {
                            stop_vcpus(control, threads);
                            return Err(e);
                        }
                        timings.mark(Phase::SnapshotSaved);
                        break GuestExit::Snapshotted;
                    }
                }
            }
            Ok(Event::Exit(GuestExit::Reset)) => {
                break if warm_reset_flag(&mem) {
                    GuestExit::Panic
                } else {
                    GuestExit::Reset
                }
            }
            Ok(Event::Exit(e)) => break e,
            Ok(Event::HostStop) => break GuestExit::Stopped,
            Ok(Event::VcpuFailed(id, msg)) => {
                stop_vcpus(control, threads);
                return Err(Error::Vmm(format!("vCPU {id} failed: {msg}")));
            }
            Err(_) => {
                return Err(Error::Vmm(
                    "all vCPU threads ended without a guest exit".into(),
                ))
            }
        }
    };
    timings.mark(Phase::Exit);
    // Late stamps that raced with the exit.
    while let Ok(Event::Stamp(p, at)) = rx.try_recv() {
        timings.mark_at(p, at);
    }
    stop_vcpus(control, threads);
    if let (Some(d), Some(t)) = (&debugger, gdb_thread) {
        // GDB hears how the guest ended (up to 1 s; a stub blocked on a silent GDB is left).
        d.vm_ended(exit.exit_code());
        let deadline = Instant::now() + Duration::from_secs(1);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if let Ok(mut s) = serial.lock() {
        s.flush();
    }
    tracing::info!(?exit, "guest ended");
    Ok(RunResult { exit, timings })
}

/// Starts the GDB stub's thread (before the seccomp allowlist: it serves GDB's socket).
#[cfg(target_arch = "x86_64")]
fn start_gdb(
    conn: crate::gdb::Connection,
    cpus: u32,
    control: &VmControl,
    mem: &GuestMemoryMmap,
) -> Result<(Arc<Debugger>, std::thread::JoinHandle<()>), Error> {
    let d = Arc::new(Debugger::new(cpus, control.clone()));
    let (dt, mem) = (d.clone(), mem.clone());
    let t = std::thread::Builder::new()
        .name("gdb".into())
        .spawn(move || crate::gdb::serve(conn, dt, mem))
        .map_err(|e| Error::Vmm(format!("cannot start the GDB stub's thread: {e}")))?;
    Ok((d, t))
}

/// The GDB stub needs guest debugging, which this backend lacks.
#[cfg(not(target_arch = "x86_64"))]
fn start_gdb(
    _conn: crate::gdb::Connection,
    _cpus: u32,
    _control: &VmControl,
    _mem: &GuestMemoryMmap,
) -> Result<(Arc<Debugger>, std::thread::JoinHandle<()>), Error> {
    Err(Error::Input(format!(
        "--gdb: {}",
        hypervisor::GUEST_DEBUG_UNSUPPORTED
    )))
}

/// Linux writes 0x1234 at 0x472 (the BIOS warm-boot flag) before an i8042 reset when the reboot
/// is warm; the default command line makes only panics warm (`reboot=k,panic_warm`).
fn warm_reset_flag(mem: &GuestMemoryMmap) -> bool {
    use vm_memory::Bytes;
    mem.read_obj::<u16>(GuestAddress(0x472))
        .map(|v| v == 0x1234)
        .unwrap_or(false)
}

/// Stops the vCPUs (parked ones included) and joins their threads, waiting up to 2 s.
fn stop_vcpus(control: &VmControl, threads: Vec<std::thread::JoinHandle<()>>) {
    control.stop_vcpus();
    let deadline = Instant::now() + Duration::from_secs(2);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        control.kick_all();
        std::thread::sleep(Duration::from_micros(200));
    }
    for t in threads {
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("a vCPU thread did not stop within 2 s");
        }
    }
}

/// How a vCPU starts: configured for the boot, or restored from a snapshot.
#[derive(Clone, Copy)]
enum VcpuInit<'a> {
    Boot(&'a arch::current::BootInfo),
    Restore(&'a [u8]),
}

struct VcpuContext<'a> {
    id: u32,
    cpus: u32,
    init: VcpuInit<'a>,
    pio: &'a Bus,
    mmio: &'a Bus,
    control: &'a VmControl,
    debugger: Option<&'a Debugger>,
    /// The boot-timer value that asks for a snapshot (`VmConfig::snapshot`).
    snapshot_stamp: Option<u8>,
    /// Opens once guest memory is registered (or failed to be).
    mem_ready: &'a MemoryGate,
}

/// Opens once, when the thread that registers guest memory ends; restoring vCPUs wait for it.
#[derive(Default)]
struct MemoryGate {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl MemoryGate {
    /// A guard that opens the gate when dropped (on return and on unwind alike).
    fn opener(&self) -> impl Drop + '_ {
        struct Opener<'a>(&'a MemoryGate);
        impl Drop for Opener<'_> {
            fn drop(&mut self) {
                *self.0.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
                self.0.cv.notify_all();
            }
        }
        Opener(self)
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn vcpu_thread(
    vm: &HvVm,
    ctx: &VcpuContext<'_>,
    sink: &Sink,
    ready: &std::sync::Barrier,
) -> Result<(), hypervisor::Error> {
    let VcpuContext {
        id,
        cpus,
        init,
        pio,
        mmio,
        control,
        debugger,
        snapshot_stamp,
        mem_ready,
    } = *ctx;
    let created = vm.create_vcpu(id).and_then(|mut v| {
        match init {
            VcpuInit::Boot(boot) => configure_vcpu(&mut v, id, boot, cpus)?,
            VcpuInit::Restore(state) => {
                mem_ready.wait();
                v.restore_state(state)?
            }
        }
        Ok(v)
    });
    // Wait for the others even on failure, so no thread blocks forever on the barrier; then
    // for the VM's setup that needs every vCPU (`Vm::vcpus_created`, the barrier's second
    // round).
    ready.wait();
    ready.wait();
    let mut vcpu = created?;
    // Registered before the first entry: from here on a pause waits for this vCPU to park,
    // and a stop kicks it. Dropped (unregistered) before the vCPU itself.
    let gate = control.enter(vcpu.kicker());
    if id == 0 {
        crate::seccomp::selftest_if_requested();
        sink.send(Event::Stamp(Phase::FirstVcpuEntry, Instant::now()));
    }
    let mut unknown_exits = 0u32;
    let bus_access = |bus: &Bus, a: Access<'_>| {
        if a.is_write {
            // The snapshot is taken where the guest asks: this vCPU (and every other) parks
            // before it runs on, instead of racing the VM thread that takes it.
            if snapshot_stamp.is_some()
                && a.addr == arch::current::BOOT_TIMER_ADDR
                && a.data.first().copied() == snapshot_stamp
            {
                control.request_pause();
            }
            bus.write(a.addr, a.data);
        } else {
            bus.read(a.addr, a.data);
        }
    };
    while gate.may_run_or_save(id, &mut || vcpu_save(&mut vcpu)) {
        if let Some(d) = debugger {
            if !d.gate(id, &mut vcpu, &mut |v, g| v.set_guest_debug(g))? {
                continue;
            }
        }
        match vcpu.run()? {
            VcpuExit::Io => vcpu.handle_io(&mut |a| bus_access(pio, a))?,
            VcpuExit::Mmio => vcpu.handle_mmio(&mut |a| bus_access(mmio, a))?,
            VcpuExit::Halt => std::thread::sleep(Duration::from_micros(100)),
            VcpuExit::Interrupted => {}
            VcpuExit::Shutdown => {
                sink.send(Event::Exit(GuestExit::TripleFault));
                break;
            }
            VcpuExit::SystemEvent(e) => {
                sink.send(Event::Exit(match e {
                    SystemEvent::PowerOff => GuestExit::PowerOff,
                    SystemEvent::Reset => GuestExit::Reset,
                    SystemEvent::Crash => GuestExit::Panic,
                }));
                break;
            }
            VcpuExit::Debug(exit) => match debugger {
                Some(d) => {
                    tracing::debug!(vcpu = id, ?exit, "debug exit");
                    if d.on_debug_exit(id, exit) {
                        vcpu.reinject_breakpoint(&d.current_debug())?;
                    }
                }
                None => {
                    skiff_devices::warn_limited!(vcpu = id, ?exit, "debug exit without a debugger")
                }
            },
            VcpuExit::InternalError(code) => {
                tracing::error!(vcpu = id, code, "hypervisor internal error");
                if debugger.is_some_and(|d| d.current_debug().sw_breakpoints) {
                    // PVM's /dev/kvm fails an int3 it should hand to the VMM this way.
                    eprintln!(
                        "vmm: the hypervisor failed while GDB software breakpoints were set; \
                         it may not support them: use hardware breakpoints (GDB's hbreak)"
                    );
                }
                sink.send(Event::Exit(GuestExit::HypervisorError(code)));
                break;
            }
            VcpuExit::Other(reason) => {
                unknown_exits += 1;
                skiff_devices::warn_limited!(vcpu = id, reason, "unhandled vCPU exit");
                if unknown_exits > 1000 {
                    sink.send(Event::Exit(GuestExit::HypervisorError(u64::from(reason))));
                    break;
                }
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn configure_vcpu(
    vcpu: &mut <HvVm as Vm>::Vcpu,
    id: u32,
    boot: &arch::current::BootInfo,
    cpus: u32,
) -> Result<(), hypervisor::Error> {
    arch::current::configure_vcpu(vcpu, id, boot, cpus)
}

#[cfg(target_arch = "aarch64")]
fn configure_vcpu(
    vcpu: &mut <HvVm as Vm>::Vcpu,
    id: u32,
    boot: &arch::current::BootInfo,
    _cpus: u32,
) -> Result<(), hypervisor::Error> {
    arch::current::configure_vcpu(vcpu, id, boot)
}

type Devices = (Bus, Bus, Arc<Mutex<SerialConsole>>);

/// Name of the serial console's state in a snapshot.
const DEV_SERIAL: &str = "serial";

/// The serial console's interrupt line.
#[cfg(target_arch = "x86_64")]
const SERIAL_IRQ: u32 = skiff_devices::legacy::COM1_IRQ;
/// The serial console's interrupt line.
#[cfg(target_arch = "aarch64")]
const SERIAL_IRQ: u32 = arch::current::SERIAL_SPI;

/// Name of the state of the virtio device in slot `i` in a snapshot.
fn virtio_name(i: usize) -> String {
    format!("virtio{i}")
}

#[cfg(target_arch = "x86_64")]
fn is_linux(boot: &arch::current::BootInfo) -> bool {
    boot.is_linux
}

#[cfg(target_arch = "aarch64")]
fn is_linux(_boot: &arch::current::BootInfo) -> bool {
    true
}

/// Moves console input into the UART as the guest makes room in its receive FIFO, until the
/// input ends or the VM stops. Only locks and sleeps (it runs under the VM's allowlist).
fn feed_serial(
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    serial: &Mutex<SerialConsole>,
    control: &VmControl,
) {
    for chunk in rx {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if control.is_stopped() {
                return;
            }
            let n = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(rest);
            rest = &rest[n..];
            if !rest.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The serial console: new, or as a snapshot saved it.
fn serial_console(
    saved: Option<&[u8]>,
    out: Box<dyn Write + Send>,
    irq: IrqTrigger,
    sink: Arc<Sink>,
) -> Result<Arc<Mutex<SerialConsole>>, Error> {
    let dev = match saved {
        None => SerialConsole::new(out, irq, sink),
        Some(state) => SerialConsole::restore(state, out, irq, sink)
            .ok_or_else(|| Error::Input("the snapshot's serial console state is invalid".into()))?,
    };
    Ok(Arc::new(Mutex::new(dev)))
}

/// Saves the paused VM into `dir`: every vCPU's state (each saved on its own thread), the
/// VM's, the serial console's and guest RAM.
fn take_snapshot(
    vm: &HvVm,
    cfg: &VmConfig,
    control: &VmControl,
    serial: &Arc<Mutex<SerialConsole>>,
    virtio: &[Arc<Mutex<dyn BusDevice>>],
    writer: &snapshot::Writer,
    dir: &std::path::Path,
) -> Result<(), Error> {
    let t0 = Instant::now();
    control
        .pause()
        .map_err(|e| Error::Vmm(format!("cannot pause the VM for a snapshot: {e}")))?;
    let vcpus = control
        .collect_vcpu_states(cfg.cpus as usize, Duration::from_secs(10))
        .map_err(|e| Error::Vmm(format!("cannot save the vCPUs: {e}")))?;
    if vcpus.len() != cfg.cpus as usize
        || vcpus.iter().enumerate().any(|(i, (id, _))| *id != i as u32)
    {
        return Err(Error::Vmm(format!(
            "{} of {} vCPUs saved their state",
            vcpus.len(),
            cfg.cpus
        )));
    }
    let vm_state = vm.save_state()?;
    let serial_state = serial
        .lock()
        .map_err(|_| Error::Vmm("the serial console's lock is poisoned".into()))?
        .save_state();
    let mut devices = vec![(DEV_SERIAL.to_string(), serial_state)];
    for (i, d) in virtio.iter().enumerate() {
        let st = d
            .lock()
            .map_err(|_| Error::Vmm("a virtio device's lock is poisoned".into()))?
            .save_state()
            .ok_or_else(|| Error::Vmm(format!("virtio device {i} cannot be saved")))?;
        devices.push((virtio_name(i), st));
    }
    let state = snapshot::VmState {
        backend: hypervisor::BACKEND_NAME.into(),
        skiff_version: snapshot::skiff_version(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        regions: Vec::new(),
        vm: vm_state,
        vcpus: vcpus.into_iter().map(|(_, b)| b).collect(),
        devices,
        memory_len: 0,
        memory_digest: [0; 32],
    };
    writer
        .write(state, Duration::from_secs(300))
        .map_err(|e| Error::Vmm(e.to_string()))?;
    tracing::info!(
        dir = %dir.display(),
        ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
        "snapshot saved"
    );
    Ok(())
}

fn vcpu_save<V: Vcpu>(vcpu: &mut V) -> Result<Vec<u8>, String> {
    vcpu.save_state().map_err(|e| e.to_string())
}

#[cfg(target_arch = "x86_64")]
fn platform_devices(
    vm: &Arc<HvVm>,
    create_pit: bool,
    serial_state: Option<&[u8]>,
    serial_out: Box<dyn Write + Send>,
    sink: Arc<Sink>,
) -> Result<Devices, Error> {
    use crate::hypervisor::VmX86_64;
    use skiff_devices::legacy::{BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT, I8042, I8042_PORT};
    if create_pit {
        vm.create_pit()?;
    }
    let irq_vm = vm.clone();
    let irq = IrqTrigger::new(move || {
        let _ = irq_vm.trigger_edge_irq(COM1_IRQ);
    });
    let serial = serial_console(serial_state, serial_out, irq, sink.clone())?;
    let mut pio = Bus::new();
    let e = |e: skiff_devices::BusError| Error::Vmm(e.to_string());
    pio.insert(COM1_PORT, 8, serial.clone()).map_err(e)?;
    pio.insert(
        I8042_PORT,
        5,
        Arc::new(Mutex::new(I8042::new(sink.clone()))),
    )
    .map_err(e)?;
    pio.insert(
        BOOT_TIMER_PORT,
        1,
        Arc::new(Mutex::new(BootTimer::new(sink))),
    )
    .map_err(e)?;
    Ok((pio, Bus::new(), serial))
}

#[cfg(target_arch = "aarch64")]
fn platform_devices(
    vm: &Arc<HvVm>,
    _create_pit: bool,
    serial_state: Option<&[u8]>,
    serial_out: Box<dyn Write + Send>,
    sink: Arc<Sink>,
) -> Result<Devices, Error> {
    use arch::current::{BOOT_TIMER_ADDR, SERIAL_ADDR, SERIAL_SPI};
    let irq_vm = vm.clone();
    let irq = IrqTrigger::new(move || {
        let _ = irq_vm.trigger_edge_irq(SERIAL_SPI);
    });
    let serial = serial_console(serial_state, serial_out, irq, sink.clone())?;
    let mut mmio = Bus::new();
    let e = |e: skiff_devices::BusError| Error::Vmm(e.to_string());
    mmio.insert(SERIAL_ADDR, 0x1000, serial.clone())
        .map_err(e)?;
    mmio.insert(
        BOOT_TIMER_ADDR,
        0x1000,
        Arc::new(Mutex::new(BootTimer::new(sink))),
    )
    .map_err(e)?;
    Ok((Bus::new(), mmio, serial))
}
