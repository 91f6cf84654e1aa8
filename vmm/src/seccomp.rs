//! Defence in depth: per-thread seccomp allowlists for the VMM's threads (Linux; a no-op on
//! macOS).
//!
//! A filter installed with `seccomp(SECCOMP_SET_MODE_FILTER)` (no TSYNC) applies to the calling
//! thread and to the threads it creates afterwards; filters stack, so a thread is bound by its
//! own filter and every filter it inherited. That makes the lists per thread *kind*:
//!
//! - [`Kind::Vmm`]: installed by the VM thread in [`crate::vm::run_controlled`] once the VM is
//!   built and right before the vCPU threads are spawned. The vCPU threads inherit it, and so do
//!   the virtio-fs worker threads, which a vCPU thread spawns when the guest activates the
//!   device (its MMIO write of DRIVER_OK); the list therefore also holds what those workers do.
//!   The memory-registration thread is spawned earlier and ends before the guest runs.
//! - [`Kind::VirtioFs`]: installed by each virtio-fs worker at its start (after it dropped its
//!   capabilities), on top of the inherited `Vmm` list: file system calls only, no KVM ioctl but
//!   `KVM_IRQ_LINE`, no thread creation, no sockets.
//! - [`Kind::Events`]: installed by a device event-loop thread (vsock, virtio-net) at its start. That thread
//!   is spawned from the caller's thread (the shim's ttrpc thread, `vmm run`'s main thread),
//!   which stays unfiltered: Unix-socket I/O and epoll, `KVM_IRQ_LINE`.
//!
//! The process's other threads (the shim's ttrpc server, stdio copies, `vmm run`'s signal
//! thread) are never filtered. A call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the
//! handler ([`crate::sys::install_sigsys_handler`]) writes one line naming the thread kind and
//! the system call to stderr and ends the whole process with status [`DENIED_EXIT_STATUS`]: in
//! the shim that ends the shim, and the VM with it. `no_new_privs` is set on every filtered
//! thread (the kernel requires it for an unprivileged filter).
//!
//! Debugging: [`Mode::Log`] (`vmm --seccomp log`, `SKIFF_SECCOMP=log`) allows every call and has
//! the kernel log the ones outside the list (audit `type=SECCOMP`, in `dmesg`/`journalctl -k`);
//! [`Mode::Off`] installs nothing.

use std::sync::atomic::{AtomicU8, Ordering};

/// Exit status of a process ended by a denied system call (128 + `SIGSYS`).
pub const DENIED_EXIT_STATUS: i32 = 159;

/// Environment variable selecting the mode when no `--seccomp` option set it.
pub const MODE_ENV: &str = "SKIFF_SECCOMP";

/// Environment variable that makes vCPU 0 perform a forbidden call after its setup (tests).
pub const SELFTEST_ENV: &str = "SKIFF_SECCOMP_SELFTEST";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mode string other than `on`, `off`, `log`.
    #[error("bad seccomp mode {0:?}: expected on, off or log")]
    BadMode(String),
    /// The filter could not be compiled.
    #[error("cannot build the {kind} seccomp filter: {msg}")]
    Build {
        /// Thread kind.
        kind: &'static str,
        /// What failed.
        msg: String,
    },
    /// The kernel refused the filter (or `no_new_privs`).
    #[error("cannot install the {kind} seccomp filter: {msg}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// What failed.
        msg: String,
    },
}

/// What a filter does with a call outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ends the process with a message (the default).
    On,
    /// No filter at all.
    Off,
    /// Allows the call; the kernel logs it.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "on" | "1" | "" => Ok(Mode::On),
            "off" | "0" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            _ => Err(Error::BadMode(s.into())),
        }
    }
}

/// The kinds of VMM thread, each with its own list (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The VM thread and what it spawns: vCPU threads (and through them virtio-fs workers).
    Vmm,
    /// A virtio-fs worker thread.
    VirtioFs,
    /// A device event-loop thread (vsock).
    Events,
}

impl Kind {
    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::VirtioFs => "virtio-fs",
            Kind::Events => "event-loop",
        }
    }
}

const UNSET: u8 = 0;
static MODE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(m: Mode) -> u8 {
    match m {
        Mode::On => 1,
        Mode::Off => 2,
        Mode::Log => 3,
    }
}

/// Sets the process-wide mode (the `--seccomp` option); call before booting.
pub fn set_mode(m: Mode) {
    MODE.store(encode(m), Ordering::Relaxed);
}

/// The process-wide mode: set by [`set_mode`], else `$SKIFF_SECCOMP`, else [`Mode::On`]. An
/// unreadable `$SKIFF_SECCOMP` is refused with a warning and the filters stay on.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => return Mode::On,
        2 => return Mode::Off,
        3 => return Mode::Log,
        _ => {}
    }
    let m = match std::env::var(MODE_ENV) {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("{MODE_ENV}: {e}; seccomp stays on");
            Mode::On
        }),
        Err(_) => Mode::On,
    };
    set_mode(m);
    m
}

/// Installs the `kind` filter on the calling thread (and the threads it creates from now on),
/// with `no_new_privs`, according to [`mode`]. A no-op with [`Mode::Off`] and on macOS.
pub fn install(kind: Kind) -> Result<(), Error> {
    let m = mode();
    if m == Mode::Off {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    crate::sys::keep_malloc_heaps();
    imp::install(kind, m)
}

/// With `$SKIFF_SECCOMP_SELFTEST=1`, performs a call no list allows (`socket(AF_INET)`), so a
/// test can see the filter end the VM. Nothing happens without the variable; with the filters
/// off or logging the call simply succeeds.
pub fn selftest_if_requested() {
    if std::env::var_os(SELFTEST_ENV).is_some_and(|v| v == "1") {
        tracing::warn!("{SELFTEST_ENV}=1: making a forbidden system call (socket)");
        let _ = std::net::UdpSocket::bind("127.0.0.1:0");
    }
}

/// Number of system calls in each list (for docs and tests): `(kind, entries)`.
pub fn list_sizes() -> Vec<(&'static str, usize)> {
    [Kind::Vmm, Kind::VirtioFs, Kind::Events]
        .into_iter()
        .map(|k| (k.name(), imp::list_len(k)))
        .collect()
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{Error, Kind, Mode};

    pub fn install(_kind: Kind, _mode: Mode) -> Result<(), Error> {
        Ok(())
    }

    pub fn list_len(_kind: Kind) -> usize {
        0
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
        SeccompFilter, SeccompRule,
    };

    use super::{Error, Kind, Mode};

    /// `(name, number)` pairs from `libc::SYS_*` constants.
    macro_rules! calls {
        ($($n:ident),* $(,)?) => {
            &[$((stringify!($n), libc::$n)),*]
        };
    }

    type Calls = &'static [(&'static str, libc::c_long)];

    /// What every filtered thread needs: the C library and Rust runtime under the hood (memory,
    /// futexes, thread exit, signal return, clocks, random keys for hash maps, `abort()` after a
    /// panic), stderr logging, and closing descriptors.
    const BASE: Calls = calls![
        SYS_brk,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_close,
        SYS_exit,
        SYS_exit_group,
        SYS_futex,
        SYS_getpid,
        SYS_getrandom,
        SYS_gettid,
        SYS_gettimeofday,
        SYS_madvise,
        SYS_mremap,
        SYS_munmap,
        SYS_nanosleep,
        SYS_restart_syscall,
        SYS_rseq,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sched_getaffinity,
        SYS_sched_yield,
        SYS_set_robust_list,
        SYS_sigaltstack,
        SYS_rt_sigaction,
        SYS_tgkill,
        // musl's pthread_kill (the static arm64 build) sends with tkill, glibc's with tgkill.
        SYS_tkill,
        SYS_write,
        SYS_writev,
    ];

    /// File calls of the virtio-fs server (`devices/src/virtio/fs/sys/linux.rs`), including
    /// the libc/rustix variants a call may become.
    const FS: Calls = calls![
        SYS_fallocate,
        SYS_fchmodat,
        SYS_fchownat,
        SYS_fcntl,
        SYS_fdatasync,
        SYS_fgetxattr,
        SYS_flistxattr,
        SYS_fremovexattr,
        SYS_fsetxattr,
        SYS_fstat,
        SYS_fstatfs,
        SYS_fsync,
        SYS_ftruncate,
        SYS_getdents64,
        SYS_getegid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getuid,
        SYS_getxattr,
        SYS_lgetxattr,
        SYS_linkat,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_lremovexattr,
        SYS_lseek,
        SYS_lsetxattr,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_newfstatat,
        SYS_openat,
        SYS_openat2,
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_read,
        SYS_readlinkat,
        SYS_readv,
        SYS_removexattr,
        SYS_renameat,
        SYS_renameat2,
        SYS_setxattr,
        SYS_statx,
        SYS_symlinkat,
        SYS_unlinkat,
        SYS_utimensat,
    ];

    /// The VM thread and vCPU threads on top of [`BASE`] and [`FS`]: KVM ioctls (`KVM_RUN`,
    /// `KVM_IRQ_LINE`, vCPU setup), starting threads (vCPUs, virtio-fs workers), a worker's own
    /// filter and capability drop, and the console file's rotation (rename, create, in [`FS`]).
    /// The kick signal's handler and `tgkill` are in [`BASE`], limited by [`arg_rules`].
    const VMM: Calls = calls![
        SYS_capget,
        SYS_capset,
        SYS_clone,
        SYS_clone3,
        SYS_ioctl,
        SYS_mmap,
        SYS_mprotect,
        SYS_prctl,
        SYS_seccomp,
    ];

    /// Legacy x86_64 names glibc and std still use for some calls (`rename`, `unlink`...).
    #[cfg(target_arch = "x86_64")]
    const VMM_X86: Calls = calls![SYS_rename, SYS_stat, SYS_lstat, SYS_open, SYS_unlink];
    #[cfg(not(target_arch = "x86_64"))]
    const VMM_X86: Calls = &[];

    /// The vsock event loop on top of [`BASE`]: epoll, the waker's eventfd, Unix sockets (a
    /// guest connect to host port P connects to `<uds>_P`; host clients are accepted), the
    /// socket file's removal, `KVM_IRQ_LINE`.
    const EVENTS: Calls = calls![
        SYS_accept4,
        SYS_connect,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_fcntl,
        SYS_getsockopt,
        SYS_ioctl,
        SYS_mmap,
        SYS_mprotect,
        SYS_read,
        SYS_readv,
        SYS_recvfrom,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_shutdown,
        SYS_socket,
        SYS_unlinkat,
    ];
    #[cfg(target_arch = "x86_64")]
    const EVENTS_X86: Calls = calls![SYS_epoll_wait, SYS_unlink];
    #[cfg(not(target_arch = "x86_64"))]
    const EVENTS_X86: Calls = &[];

    /// The virtio-fs worker on top of [`BASE`] and [`FS`]: memory for requests (no executable
    /// mappings), `KVM_IRQ_LINE` to signal replies.
    const FS_EXTRA: Calls = calls![SYS_ioctl, SYS_mmap, SYS_mprotect];

    /// Calls that no list has but a hostile guest exploiting the VMM would reach for; named in
    /// the denial message (the others are shown by number).
    const NOTABLE: Calls = calls![
        SYS_bind,
        SYS_bpf,
        SYS_chroot,
        SYS_execve,
        SYS_execveat,
        SYS_finit_module,
        SYS_init_module,
        SYS_io_uring_setup,
        SYS_kill,
        SYS_listen,
        SYS_memfd_create,
        SYS_mount,
        SYS_perf_event_open,
        SYS_pidfd_open,
        SYS_pipe2,
        SYS_pivot_root,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_ptrace,
        SYS_setgid,
        SYS_setns,
        SYS_setuid,
        SYS_socketpair,
        SYS_umount2,
        SYS_unshare,
        SYS_userfaultfd,
        SYS_wait4,
        SYS_eventfd2,
        SYS_epoll_create1,
        SYS_dup,
        SYS_dup3,
        SYS_getsockname,
        SYS_getpeername,
        SYS_setsockopt,
        SYS_mincore,
        SYS_membarrier,
    ];
    #[cfg(target_arch = "x86_64")]
    const NOTABLE_X86: Calls = calls![SYS_fork, SYS_vfork, SYS_access, SYS_poll, SYS_pipe];
    #[cfg(not(target_arch = "x86_64"))]
    const NOTABLE_X86: Calls = &[];

    /// Every name the denial message can show.
    static NAMES: [Calls; 9] = [
        BASE,
        FS,
        VMM,
        VMM_X86,
        EVENTS,
        EVENTS_X86,
        FS_EXTRA,
        NOTABLE,
        NOTABLE_X86,
    ];

    /// The name of system call `nr`, if known (async-signal-safe: static data only).
    pub fn syscall_name(nr: i64) -> Option<&'static str> {
        NAMES
            .iter()
            .flat_map(|c| c.iter())
            .find(|(_, n)| *n == nr)
            .map(|(s, _)| s.trim_start_matches("SYS_"))
    }

    fn lists(kind: Kind) -> Vec<Calls> {
        match kind {
            Kind::Vmm => vec![BASE, FS, VMM, VMM_X86],
            Kind::VirtioFs => vec![BASE, FS, FS_EXTRA],
            Kind::Events => vec![BASE, EVENTS, EVENTS_X86],
        }
    }

    pub fn list_len(kind: Kind) -> usize {
        let mut all: Vec<libc::c_long> = lists(kind)
            .into_iter()
            .flat_map(|c| c.iter().map(|(_, n)| *n))
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }

    fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition, String> {
        SeccompCondition::new(arg, len, op, value).map_err(|e| e.to_string())
    }

    fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
        SeccompRule::new(conds).map_err(|e| e.to_string())
    }

    /// One rule per allowed value of argument `arg`.
    fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
        values
            .iter()
            .map(|&v| rule(vec![cond(arg, Len::Dword, Op::Eq, v)?]))
            .collect()
    }

    /// `KVM_IRQ_LINE` = `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
    const KVM_IRQ_LINE: u64 = 0x4008_ae61;
    /// `TUNSETOFFLOAD` = `_IOW('T', 208, unsigned int)`: the virtio-net loop sets a tap's
    /// offloads once the guest has negotiated them.
    const TUNSETOFFLOAD: u64 = 0x4004_54d0;
    /// The KVM ioctl type byte (`KVMIO`), bits 8..16 of the request.
    const KVMIO: u64 = 0xae;

    /// Argument conditions for the calls that have them; an empty list allows any arguments.
    // `libc::FIONBIO` is a `c_ulong` with glibc and a `c_int` with musl.
    #[allow(clippy::unnecessary_cast)]
    fn arg_rules(kind: Kind, nr: libc::c_long) -> Result<Vec<SeccompRule>, String> {
        let no_exec = || {
            rule(vec![cond(
                2,
                Len::Dword,
                Op::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )?])
        };
        Ok(match nr {
            // Memory is never mapped executable after start-up.
            libc::SYS_mmap | libc::SYS_mprotect => vec![no_exec()?],
            libc::SYS_ioctl => match kind {
                // Any KVM ioctl (vCPU setup, KVM_RUN, KVM_IRQ_LINE...), nothing else.
                Kind::Vmm => vec![rule(vec![cond(
                    1,
                    Len::Dword,
                    Op::MaskedEq(0xff00),
                    KVMIO << 8,
                )?])?],
                Kind::VirtioFs => one_of(1, &[KVM_IRQ_LINE])?,
                Kind::Events => one_of(
                    1,
                    &[
                        KVM_IRQ_LINE,
                        libc::FIONBIO as u64,
                        libc::FIOCLEX as u64,
                        TUNSETOFFLOAD,
                    ],
                )?,
            },
            // Only threads (std/glibc use clone3, clone as a fallback).
            libc::SYS_clone => vec![rule(vec![cond(
                0,
                Len::Qword,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )?])?],
            // Thread names (std names a new thread on it) and a worker's own filter.
            libc::SYS_prctl => one_of(
                0,
                &[
                    libc::PR_SET_NAME as u64,
                    libc::PR_GET_NAME as u64,
                    libc::PR_SET_NO_NEW_PRIVS as u64,
                    libc::PR_CAPBSET_READ as u64,
                ],
            )?,
            libc::SYS_seccomp => one_of(0, &[libc::SECCOMP_SET_MODE_FILTER as u64])?,
            // abort() after a panic everywhere; the vCPU kick signal (its handler is installed
            // on the first vCPU thread, the VM thread sends it) on the vmm list.
            libc::SYS_tgkill | libc::SYS_tkill | libc::SYS_rt_sigaction => {
                // The signal: tgkill(tgid, tid, sig), tkill(tid, sig), rt_sigaction(sig, ..).
                let arg = match nr {
                    libc::SYS_tgkill => 2,
                    libc::SYS_tkill => 1,
                    _ => 0,
                };
                match kind {
                    Kind::Vmm => one_of(
                        arg,
                        &[
                            crate::hypervisor::kvm_common::kick_signal() as u64,
                            libc::SIGABRT as u64,
                        ],
                    )?,
                    Kind::VirtioFs | Kind::Events => one_of(arg, &[libc::SIGABRT as u64])?,
                }
            }
            // Unix sockets only.
            libc::SYS_socket => one_of(0, &[libc::AF_UNIX as u64])?,
            _ => Vec::new(),
        })
    }

    fn build(kind: Kind, mode: Mode) -> Result<BpfProgram, String> {
        let mut rules = BTreeMap::new();
        for calls in lists(kind) {
            for &(_, nr) in calls {
                rules.insert(nr, arg_rules(kind, nr)?);
            }
        }
        let mismatch = match mode {
            Mode::Log => SeccompAction::Log,
            Mode::On | Mode::Off => SeccompAction::Trap,
        };
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
            .map_err(|e| e.to_string())?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    }

    pub fn install(kind: Kind, mode: Mode) -> Result<(), Error> {
        let prog = build(kind, mode).map_err(|msg| Error::Build {
            kind: kind.name(),
            msg,
        })?;
        crate::sys::install_sigsys_handler(syscall_name, super::DENIED_EXIT_STATUS);
        crate::sys::set_thread_label(kind.name());
        seccompiler::apply_filter(&prog).map_err(|e| Error::Install {
            kind: kind.name(),
            msg: e.to_string(),
        })?;
        tracing::debug!(kind = kind.name(), ?mode, "seccomp filter installed");
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use super::*;

        #[test]
        fn every_filter_compiles_in_both_modes() {
            for k in [Kind::Vmm, Kind::VirtioFs, Kind::Events] {
                for m in [Mode::On, Mode::Log] {
                    let p = build(k, m).unwrap();
                    assert!(!p.is_empty() && p.len() < 4096, "{k:?}: {} insns", p.len());
                }
            }
        }

        #[test]
        fn names_resolve() {
            assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
            assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
            assert_eq!(syscall_name(100_000), None);
        }

        #[test]
        fn console_rotation_runs_under_the_vmm_list() {
            // vCPU threads write the console file and rotate it when full (rename + create);
            // a call missing from the list would end this test process with status 159.
            use std::io::Write;
            let dir = std::env::temp_dir().join(format!("skiff-seccomp-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("console.log");
            let mut log = crate::console_log::CappedLog::create(&path, 4096).unwrap();
            let t = std::thread::spawn(move || {
                install(Kind::Vmm, Mode::On).unwrap();
                for _ in 0..20 {
                    log.write_all(&[b'x'; 1000]).unwrap();
                }
                log.flush().unwrap();
            });
            t.join().unwrap();
            assert!(crate::console_log::rotated_path(&path).exists());
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn a_thread_heap_shrinks_under_the_events_list() {
            // glibc reads /proc/sys/vm/overcommit_memory (openat) the first time it shrinks a
            // thread's heap: a device thread that freed a burst's buffers ended the VMM with
            // status 159. Through the public install, as the device threads do.
            if super::super::mode() == Mode::Off {
                return;
            }
            let t = std::thread::spawn(|| {
                super::super::install(Kind::Events).unwrap();
                let blocks: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 100 << 10]).collect();
                assert_eq!(blocks.len(), 256);
                drop(blocks);
                let again: Vec<Vec<u8>> = (0..4).map(|_| vec![2u8; 1000]).collect();
                drop(again);
            });
            t.join().unwrap();
        }

        #[test]
        fn the_worker_lists_are_inside_the_vmm_list() {
            // A virtio-fs worker inherits the vmm filter from its vCPU thread: its own list can
            // only narrow it.
            let vmm: Vec<_> = lists(Kind::Vmm).concat();
            for (name, nr) in lists(Kind::VirtioFs).concat() {
                assert!(vmm.iter().any(|(_, n)| *n == nr), "{name} missing in vmm");
            }
        }
    }
}
