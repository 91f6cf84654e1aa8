//! What the x86_64 (`kvm.rs`) and arm64 (`kvm_aarch64.rs`) KVM backends share: opening the
//! device, memory slots, `KVM_RUN` and its common exits, MMIO completion, and the kicker that
//! gets a vCPU out of `KVM_RUN` from another thread.

use std::sync::{Arc, Once};

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_run, kvm_userspace_memory_region, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm as KvmFd, VcpuExit as KvmExit, VcpuFd, VmFd};

use super::{Access, Error, MemoryRegion, Result, SystemEvent, VcpuExit, VcpuKicker};

const KVM_PATH: &str = "/dev/kvm";

/// `KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2` (arm64 uapi; the x86 bindings lack the name).
const PSCI_RESET2: u64 = 1;

/// The OS error of a failed KVM call.
pub(super) fn errno(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// Opens `/dev/kvm` (or `SKIFF_KVM_DEVICE`: tests use it to show the errors).
pub(super) fn open() -> Result<Arc<KvmFd>> {
    let path = std::env::var("SKIFF_KVM_DEVICE").unwrap_or_else(|_| KVM_PATH.to_string());
    let cpath = std::ffi::CString::new(path.clone()).map_err(|_| Error::NoDevice(path.clone()))?;
    match KvmFd::new_with_path(&cpath) {
        Ok(kvm) => Ok(Arc::new(kvm)),
        Err(e) if e.errno() == libc::ENOENT => Err(Error::NoDevice(path)),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(Error::NoPermission(path))
        }
        Err(e) if e.errno() == libc::ENOTTY || e.errno() == libc::EINVAL => {
            Err(Error::Unsupported(format!("{path} is not a KVM device")))
        }
        Err(e) => Err(Error::call("open the KVM device", errno(e))),
    }
}

/// The most vCPUs one VM may have on this host.
pub(super) fn max_vcpus(kvm: &KvmFd) -> u32 {
    u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX)
}

/// Maps a memory slot.
pub(super) fn add_memory_region(vm: &VmFd, r: MemoryRegion) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: r.slot,
        flags: 0,
        guest_phys_addr: r.guest_addr,
        memory_size: r.size,
        userspace_addr: r.host_addr,
    };
    // SAFETY: the caller of `Vm::add_memory_region` guarantees (trait contract) that the host
    // range stays mapped for the VM's lifetime; KVM only reads and writes inside it.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| Error::call("KVM_SET_USER_MEMORY_REGION", errno(e)))
}

/// `KVM_RUN` and the exits both architectures share; `debug` turns the architecture's debug
/// exit into a [`VcpuExit`].
pub(super) fn run(
    fd: &mut VcpuFd,
    debug: impl FnOnce(&kvm_debug_exit_arch) -> VcpuExit,
) -> Result<VcpuExit> {
    match fd.run() {
        Ok(exit) => Ok(match exit {
            KvmExit::IoIn(..) | KvmExit::IoOut(..) => VcpuExit::Io,
            KvmExit::MmioRead(..) | KvmExit::MmioWrite(..) => VcpuExit::Mmio,
            KvmExit::Hlt => VcpuExit::Halt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::SystemEvent(kind, data) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::SystemEvent(SystemEvent::PowerOff),
                // arm64: a PSCI SYSTEM_RESET2 (a warm reset) is how a Linux guest with the
                // default `reboot=panic_warm` reboots after a panic; a clean reboot is a
                // plain SYSTEM_RESET. (x86 reports no flags here: its panics are told by
                // the BIOS warm-boot flag, see `vm::warm_reset_flag`.)
                KVM_SYSTEM_EVENT_RESET
                    if data.first().is_some_and(|d| d & PSCI_RESET2 != 0)
                        && cfg!(target_arch = "aarch64") =>
                {
                    VcpuExit::SystemEvent(SystemEvent::Crash)
                }
                KVM_SYSTEM_EVENT_RESET => VcpuExit::SystemEvent(SystemEvent::Reset),
                KVM_SYSTEM_EVENT_CRASH => VcpuExit::SystemEvent(SystemEvent::Crash),
                other => VcpuExit::Other(other),
            },
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::InternalError => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active union member.
                let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VcpuExit::InternalError(u64::from(suberror))
            }
            KvmExit::FailEntry(reason, _) => VcpuExit::InternalError(reason),
            KvmExit::Debug(d) => debug(&d),
            _ => VcpuExit::Other(fd.get_kvm_run().exit_reason),
        }),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            Ok(VcpuExit::Interrupted)
        }
        Err(e) => Err(Error::call("KVM_RUN", errno(e))),
    }
}

/// Completes a pending MMIO exit in the `kvm_run` page by calling `f` once.
pub(super) fn handle_mmio(fd: &mut VcpuFd, f: &mut dyn FnMut(Access<'_>)) -> Result<()> {
    let run = fd.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
        return Err(Error::Unsupported(
            "handle_mmio without a pending MMIO exit".into(),
        ));
    }
    // SAFETY: exit_reason is KVM_EXIT_MMIO, so `mmio` is the active union member.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    f(Access {
        addr: mmio.phys_addr,
        data: &mut mmio.data[..len],
        is_write: mmio.is_write != 0,
    });
    Ok(())
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn kick_handler(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = kick_handler as *const () as usize;
        // No SA_RESTART: KVM_RUN must return EINTR.
        action.sa_flags = 0;
        // SAFETY: installs an async-signal-safe no-op handler for a real-time signal that
        // nothing else in the process uses.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Kicks a KVM vCPU: sets `immediate_exit` and signals its thread.
#[derive(Debug)]
pub struct KvmKicker {
    thread: libc::pthread_t,
    /// Address of the vCPU's mmapped `kvm_run`, which lives as long as the vCPU fd.
    run_ptr: usize,
    /// False once the vCPU (its thread, fd and kvm_run mapping) is gone; guarded so that a
    /// kick never races with the vCPU's drop.
    alive: std::sync::Mutex<bool>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let alive = match self.alive.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !*alive {
            return;
        }
        // SAFETY: run_ptr points to the vCPU's kvm_run mapping, which is still mapped: `alive`
        // is held, and the vCPU's Drop clears it (under the same lock) before unmapping. A volatile byte store
        // to `immediate_exit` is the documented way to make the next KVM_RUN return at once.
        unsafe {
            let run = self.run_ptr as *mut kvm_run;
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1);
        }
        // SAFETY: the vCPU still exists (see above) and lives on this thread, so the thread
        // has not exited; the signal has a no-op handler installed before any vCPU exists.
        unsafe {
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}

impl KvmKicker {
    /// The kicker of `fd`, a vCPU that runs on this thread (installs the kick signal's
    /// handler the first time).
    pub(super) fn for_this_thread(fd: &mut VcpuFd) -> Arc<KvmKicker> {
        install_kick_handler();
        let run_ptr = fd.get_kvm_run() as *mut kvm_run as usize;
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Arc::new(KvmKicker {
            thread,
            run_ptr,
            alive: std::sync::Mutex::new(true),
        })
    }

    /// Called by the vCPU's Drop before its fd (and `kvm_run` mapping) goes: no kick touches
    /// them after this.
    pub(super) fn vcpu_gone(&self) {
        match self.alive.lock() {
            Ok(mut g) => *g = false,
            Err(p) => *p.into_inner() = false,
        }
    }
}

// SAFETY: the raw address is only used for a single volatile byte store (see `kick`), and
// pthread_t is a plain thread id.
unsafe impl Send for KvmKicker {}
// SAFETY: as above; all other state is atomic.
unsafe impl Sync for KvmKicker {}
