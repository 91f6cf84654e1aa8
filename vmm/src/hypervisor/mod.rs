//! The hypervisor layer: the only code in Skiff that names KVM or Hypervisor.framework types.
//!
//! Shape (after crosvm): arch-neutral [`Vm`] and [`Vcpu`] traits, per-arch extension traits
//! ([`VcpuX86_64`], [`VcpuAarch64`]) for registers, and a small [`VcpuExit`]. Port I/O and MMIO
//! exits are completed inside the backend: the caller gets `VcpuExit::Io`/`VcpuExit::Mmio` and
//! then calls [`Vcpu::handle_io`] / [`Vcpu::handle_mmio`] with a closure that talks to the
//! device bus; the backend decodes the access (KVM: the `kvm_run` page; HVF: the ESR syndrome)
//! and writes the result back into the guest's registers.
//!
//! Each vCPU is created on the thread that runs it ([`Vm::create_vcpu`] is called from that
//! thread), because Hypervisor.framework binds a vCPU to its creating thread.
//!
//! The backend is picked by target OS at compile time: [`Backend`] is KVM on Linux and
//! Hypervisor.framework on macOS.

pub mod aarch64;
pub mod state;
pub mod x86_64;

#[cfg(target_os = "macos")]
pub mod hvf;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub mod kvm_aarch64;
#[cfg(target_os = "linux")]
pub mod kvm_common;

pub use aarch64::VcpuAarch64;
pub use x86_64::{VcpuX86_64, VmX86_64};

/// The backend for this target OS.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub type Backend = kvm::Kvm;
/// The backend for this target OS.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub type Backend = kvm_aarch64::Kvm;
/// The backend for this target OS.
#[cfg(target_os = "macos")]
pub type Backend = hvf::Hvf;

/// Names the backend and architecture whose state blobs this build reads and writes (a
/// snapshot records it; one made by another backend is refused).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub const BACKEND_NAME: &str = "kvm-x86_64";
/// Names the backend and architecture whose state blobs this build reads and writes.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub const BACKEND_NAME: &str = "kvm-aarch64";
/// Names the backend and architecture whose state blobs this build reads and writes.
#[cfg(target_os = "macos")]
pub const BACKEND_NAME: &str = "hvf-aarch64";

/// Why `--gdb` is refused on a backend without guest debugging (arm64: HVF's debug exceptions
/// and `hv_vcpu_set_trap_debug_exceptions`, KVM's arm64 `KVM_SET_GUEST_DEBUG`, and an arm64
/// target for the stub are not wired up yet).
pub const GUEST_DEBUG_UNSUPPORTED: &str =
    "the GDB stub is not supported on this backend yet (x86_64 KVM only)";

/// Whether this build's backend supports guest debugging ([`Vcpu::set_guest_debug`]) and the
/// GDB stub's architecture (x86_64 KVM only, for now).
pub const GUEST_DEBUG_SUPPORTED: bool = cfg!(all(target_os = "linux", target_arch = "x86_64"));

/// Whether this build's backend saves and restores VMs (`Vm::save_state`, `Vcpu::save_state`):
/// x86_64 KVM only so far. Without it, warm start (templates) is off and VMs boot cold.
pub const SNAPSHOTS_SUPPORTED: bool = cfg!(all(target_os = "linux", target_arch = "x86_64"));

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor device (`/dev/kvm`) does not exist.
    #[error("{0} does not exist: this host offers no hardware virtualization (is the kvm module loaded?)")]
    NoDevice(String),
    /// The hypervisor device exists but may not be opened.
    #[error("no permission to open {0}: run as root or add this user to the group owning it")]
    NoPermission(String),
    /// The host cannot run this many vCPUs.
    #[error("{requested} vCPUs requested, but this host allows at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// Host limit.
        max: u32,
    },
    /// A hypervisor call failed.
    #[error("{call} failed: {source}")]
    Call {
        /// The call that failed.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The hypervisor reported something this layer does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A saved state blob is malformed or does not fit this VM.
    #[error("bad saved state: {0}")]
    BadState(String),
}

impl Error {
    /// Wraps an OS error from a named call.
    pub fn call(call: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Call {
            call,
            source: source.into(),
        }
    }
}

/// Result of the hypervisor layer.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a VM stopped on its own, as the hypervisor reports it (not through a device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The guest asked to power off (PSCI SYSTEM_OFF, KVM shutdown event).
    PowerOff,
    /// The guest asked to reset (PSCI SYSTEM_RESET, KVM reset event).
    Reset,
    /// The guest reported a crash.
    Crash,
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// A port I/O access (x86): complete it with [`Vcpu::handle_io`].
    Io,
    /// An MMIO access: complete it with [`Vcpu::handle_mmio`].
    Mmio,
    /// The vCPU halted (only when the hypervisor does not handle HLT/WFI itself).
    Halt,
    /// The vCPU hit a triple fault or an equivalent unrecoverable state.
    Shutdown,
    /// The guest requested a system event.
    SystemEvent(SystemEvent),
    /// The run was interrupted (a kick from another thread, or a signal): check for stop.
    Interrupted,
    /// The hypervisor failed to run the guest (emulation failure, bad state).
    InternalError(u64),
    /// A debug exit while guest debugging is on ([`Vcpu::set_guest_debug`]).
    Debug(DebugExit),
    /// Any other exit, with the backend's raw reason code. Logged and retried by the caller.
    Other(u32),
}

/// How many hardware breakpoints [`GuestDebug`] can hold (x86 DR0-DR3; the backend may allow
/// fewer, see [`Vcpu::set_guest_debug`]).
pub const MAX_HW_BREAKPOINTS: usize = 4;

/// Guest debugging settings of one vCPU (the GDB stub's). The default turns debugging off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Debugging on at all (breakpoint instructions and the settings below exit to the VMM).
    pub enabled: bool,
    /// Exit after every guest instruction.
    pub single_step: bool,
    /// Breakpoint instructions (x86 `int3`) exit to the VMM instead of reaching the guest.
    pub sw_breakpoints: bool,
    /// Instruction breakpoints on these guest virtual addresses.
    pub hw_breakpoints: [Option<u64>; MAX_HW_BREAKPOINTS],
}

/// What a [`VcpuExit::Debug`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugKind {
    /// A breakpoint instruction; `pc` is its address.
    SwBreakpoint,
    /// Hardware breakpoint `n` of [`GuestDebug::hw_breakpoints`].
    HwBreakpoint(u8),
    /// One instruction done under [`GuestDebug::single_step`].
    Step,
    /// Any other debug exception.
    Other,
}

/// A debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExit {
    /// Why.
    pub kind: DebugKind,
    /// The guest's program counter (a virtual address).
    pub pc: u64,
}

/// One guest access, handed to the bus by [`Vcpu::handle_io`] / [`Vcpu::handle_mmio`].
#[derive(Debug)]
pub struct Access<'a> {
    /// Port number or guest physical address.
    pub addr: u64,
    /// For a write: the bytes written. For a read: fill these bytes.
    pub data: &'a mut [u8],
    /// Whether this is a write.
    pub is_write: bool,
}

/// Backend-neutral handle to kick a running vCPU out of [`Vcpu::run`] from another thread.
pub trait VcpuKicker: Send + Sync + std::fmt::Debug {
    /// Makes the vCPU's current or next `run` return [`VcpuExit::Interrupted`].
    fn kick(&self);
}

/// A guest memory region to map.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    /// Slot number, unique per VM.
    pub slot: u32,
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the backing memory (must stay mapped for the VM's lifetime).
    pub host_addr: u64,
}

/// A hypervisor (the open device or framework).
pub trait Hypervisor: Sized + Send + Sync {
    /// The VM type.
    type Vm: Vm;
    /// Opens the hypervisor.
    fn new() -> Result<Self>;
    /// The most vCPUs one VM may have on this host.
    fn max_vcpus(&self) -> u32;
    /// Creates a VM with room for `vcpus` vCPUs.
    fn create_vm(&self, vcpus: u32) -> Result<Self::Vm>;
}

/// A virtual machine.
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// The vCPU type.
    type Vcpu: Vcpu;
    /// Maps guest memory.
    ///
    /// The caller guarantees that `region.host_addr .. + size` stays a valid mapping for the
    /// lifetime of the VM.
    fn add_memory_region(&self, region: MemoryRegion) -> Result<()>;
    /// Creates vCPU `id`. Call this on the thread that will run the vCPU.
    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu>;
    /// Called once every vCPU exists and before any runs (arm64 KVM initialises its in-kernel
    /// GIC here).
    fn vcpus_created(&self) -> Result<()> {
        Ok(())
    }
    /// Sets an interrupt line (GSI on x86, SPI number on aarch64) high or low.
    fn set_irq_line(&self, irq: u32, high: bool) -> Result<()>;
    /// Pulses an edge-triggered interrupt line.
    fn trigger_edge_irq(&self, irq: u32) -> Result<()> {
        self.set_irq_line(irq, true)?;
        self.set_irq_line(irq, false)
    }
    /// Saves the VM-wide state the hypervisor keeps (clock, in-kernel interrupt controllers
    /// and timers) as an opaque blob of this backend ([`BACKEND_NAME`]). Call it while no vCPU
    /// is in the guest.
    fn save_state(&self) -> Result<Vec<u8>>;
    /// Restores a blob from [`Vm::save_state`] into a new VM, before its vCPUs exist.
    fn restore_state(&self, state: &[u8]) -> Result<()>;
}

/// A virtual CPU.
pub trait Vcpu: Send {
    /// Runs the vCPU until it exits to the VMM.
    fn run(&mut self) -> Result<VcpuExit>;
    /// Completes a pending port I/O exit by calling `f` once per access.
    fn handle_io(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()>;
    /// Completes a pending MMIO exit by calling `f` once.
    fn handle_mmio(&mut self, f: &mut dyn FnMut(Access<'_>)) -> Result<()>;
    /// A handle another thread uses to interrupt `run`.
    fn kicker(&self) -> std::sync::Arc<dyn VcpuKicker>;
    /// Saves everything the hypervisor keeps for this vCPU (registers, FPU/XSAVE, MSRs,
    /// local interrupt controller, pending events, run state) as an opaque blob, after
    /// completing an exit still pending (an I/O instruction the VMM has served). Call it on
    /// the vCPU's own thread, outside the guest.
    fn save_state(&mut self) -> Result<Vec<u8>>;
    /// Restores a blob from [`Vcpu::save_state`] into a new vCPU that has not run yet (instead
    /// of the boot configuration), after [`Vm::restore_state`].
    fn restore_state(&mut self, state: &[u8]) -> Result<()>;
    /// Sets up guest debugging (the GDB stub): breakpoints, single step. Call it on the
    /// vCPU's own thread, outside the guest. A backend without guest debugging answers
    /// [`Error::Unsupported`]; one with fewer hardware breakpoints than asked for, too.
    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()>;
    /// Hands the breakpoint exception of the last [`DebugKind::SwBreakpoint`] exit to the
    /// guest (its own `int3`, not one the debugger placed), keeping `debug` on.
    fn reinject_breakpoint(&mut self, debug: &GuestDebug) -> Result<()>;
}
