//! The agent's only `unsafe` code: thin wrappers over the system calls it needs.

use std::ffi::CString;
use std::io;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is NULL.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(()); // already mounted
        }
        Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} on {target}: {e}"),
        ))
    }
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /sys/fs/cgroup (v2), /tmp and /run.
pub fn mount_pseudo_filesystems() -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid)?;
    mount("sysfs", "/sys", "sysfs", nosuid)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID)?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid)?;
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    Ok(())
}

/// Writes `value` to the VMM's boot-timer port (x86: 0x3f0).
#[cfg(target_arch = "x86_64")]
pub fn boot_timer_stamp(value: u8) -> io::Result<()> {
    const PORT: u16 = 0x3f0;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(PORT), 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: port 0x3f0 is the VMM's boot-timer device; writing it has no effect on memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PORT, in("al") value, options(nomem, nostack));
    }
    Ok(())
}

/// Writes `value` to the VMM's boot-timer register: on arm64 an MMIO byte at 0x0901_0000
/// (`firmware_free_boot::aarch64::layout::BOOT_TIMER_ADDR`), written through /dev/mem.
#[cfg(target_arch = "aarch64")]
pub fn boot_timer_stamp(value: u8) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const BOOT_TIMER: libc::off_t = 0x0901_0000;
    const PAGE: usize = 4096;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")?;
    // SAFETY: maps one page of the VMM's boot-timer MMIO window (not RAM), shared, for this
    // function only; nothing else in the process aliases it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            BOOT_TIMER,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p` is the live one-page mapping made above; a volatile byte store is the MMIO
    // write the device expects; the mapping is not used after munmap.
    unsafe {
        std::ptr::write_volatile(p.cast::<u8>(), value);
        libc::munmap(p, PAGE);
    }
    Ok(())
}

/// Writes `value` to the VMM's boot-timer register (not wired on this arch).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn boot_timer_stamp(_value: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "boot timer not wired on this arch yet",
    ))
}

/// Mixes `bytes` into the kernel's entropy pool, crediting them as entropy (RNDADDENTROPY),
/// then has the CRNG reseed from it at once (RNDRESEEDCRNG): a VM restored from a snapshot
/// stops producing the same random numbers as its siblings. Needs CAP_SYS_ADMIN (PID 1 has it).
pub fn add_entropy_and_reseed(bytes: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let n = i32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&(n.saturating_mul(8)).to_ne_bytes());
    info.extend_from_slice(&n.to_ne_bytes());
    info.extend_from_slice(bytes);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: `info` is a complete rand_pool_info (two ints, then `buf_size` bytes) that lives
    // across the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the wall clock (CLOCK_REALTIME) to `unix_time_ns`.
pub fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as _,
        tv_nsec: (unix_time_ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes filesystem buffers.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Reboots the VM (the VMM treats a reboot as the end of the VM).
pub fn reboot() -> io::Result<()> {
    // SAFETY: reboot with RB_AUTOBOOT has no memory preconditions; it only returns on error.
    if unsafe { libc::reboot(libc::RB_AUTOBOOT) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Container runtime system calls.
// ---------------------------------------------------------------------------------------------

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Where the forked child's PID namespace comes from.
#[derive(Debug)]
pub enum PidNs {
    /// The agent's own.
    Inherit,
    /// A new PID namespace: the child is its PID 1.
    New,
    /// Join an existing one (an fd of `/proc/<pid>/ns/pid`).
    Join(OwnedFd),
}

/// Forks a child process that runs `child` (which must not return), from a short-lived thread
/// whose PID namespace for children is set up per `pidns`. Returns the child's pid.
///
/// The child of a multithreaded process inherits only the forking thread: `child` must not
/// wait on locks other threads may hold (stdio locks, etc.). It may allocate: glibc and musl
/// (>= 1.2.1) make malloc usable after fork.
pub fn fork_child<F>(pidns: PidNs, child: F) -> io::Result<i32>
where
    F: FnOnce() -> std::convert::Infallible + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            match &pidns {
                PidNs::Inherit => {}
                // SAFETY: unshare takes no pointers; CLONE_NEWPID only affects this thread's
                // future children.
                PidNs::New => check(unsafe { libc::unshare(libc::CLONE_NEWPID) }).map(drop)?,
                PidNs::Join(fd) => {
                    // SAFETY: fd is a valid open namespace fd owned by `pidns`; no pointers.
                    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) };
                    check(rc).map(drop)?
                }
            }
            // SAFETY: fork has no memory preconditions; in the child we only run `child`, which
            // per this function's contract avoids locks held by other threads, and never
            // return into the caller's stack frames (we _exit if it unwinds).
            let pid = check(unsafe { libc::fork() })?;
            if pid == 0 {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child));
                exit_now(1);
            }
            Ok(pid)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("fork thread panicked")))
    })
}

/// `_exit`: ends the process without running atexit handlers or flushing std buffers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// A pipe with both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid 2-element array for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both fds are fresh and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Makes `dst` a copy of `src` without close-on-exec (also when they are equal).
pub fn dup2(src: RawFd, dst: RawFd) -> io::Result<()> {
    if src == dst {
        // SAFETY: fcntl on an fd number; no pointers.
        let flags = check(unsafe { libc::fcntl(src, libc::F_GETFD) })?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) })?;
        return Ok(());
    }
    // SAFETY: dup2 on fd numbers; no pointers.
    check(unsafe { libc::dup2(src, dst) }).map(drop)
}

/// Closes every fd >= 3 not in `keep` (in a freshly forked child, so no other thread uses them).
pub fn close_fds_except(keep: &[RawFd]) {
    // close_range(2) (Linux 5.9+) over the gaps between the kept fds: a few syscalls instead
    // of a /proc/self/fd listing and one close per fd.
    let mut kept: Vec<RawFd> = keep.iter().copied().filter(|&f| f >= 3).collect();
    kept.sort_unstable();
    kept.dedup();
    let mut first: libc::c_uint = 3;
    let mut ok = true;
    for k in kept
        .iter()
        .map(|&k| k as libc::c_uint)
        .chain([libc::c_uint::MAX])
    {
        if k > first {
            // SAFETY: close_range takes no pointers; the fds it closes (all but the kept ones,
            // in a single-threaded child) are never used again in this process.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, first, k - 1, 0) };
            if rc != 0 {
                ok = false;
                break;
            }
        }
        first = k.saturating_add(1);
    }
    if ok {
        return;
    }
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        if fd >= 3 && !keep.contains(&fd) {
            // SAFETY: closing an fd number in a single-threaded child; nothing else owns it
            // afterwards (std handles to it are never used again in this process).
            unsafe { libc::close(fd) };
        }
    }
}

/// Writes all of `buf` to a raw fd (no std locks: usable after fork).
pub fn write_raw(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice for its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// Starts a new session (the process becomes its leader).
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Makes the terminal `fd` the controlling terminal of this session.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) }).map(drop)
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Opens a pty pair: (master, slave), both close-on-exec.
pub fn open_pty() -> io::Result<(File, File)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int that lives across the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int into `n`.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(format!("/dev/pts/{n}"))?;
    Ok((master, slave))
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

pub fn setns(fd: RawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers; an invalid fd is reported as an error.
    check(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// mount(2) with optional source, fstype and data.
pub fn mount_full(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let s = source.map(cstr).transpose()?;
    let t = cpath(target)?;
    let f = fstype.map(cstr).transpose()?;
    let d = data.filter(|d| !d.is_empty()).map(cstr).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a valid NUL-terminated string living across the call.
    let rc = unsafe { libc::mount(p(&s), t.as_ptr(), p(&f), flags, p(&d).cast()) };
    check(rc).map(drop).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "mount {} on {} ({}): {e}",
                source.unwrap_or("none"),
                target.display(),
                fstype.unwrap_or("-")
            ),
        )
    })
}

pub fn umount_detach(target: &Path) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: t is a valid NUL-terminated path.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let (n, o) = (cpath(new_root)?, cpath(put_old)?);
    // SAFETY: both are valid NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) };
    check(rc as libc::c_int).map(drop)
}

pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::chroot(p.as_ptr()) }).map(drop)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe a valid byte slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

pub fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid NUL-terminated path; makedev is pure arithmetic.
    check(unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) }).map(drop)
}

pub fn setrlimit(resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: rl is a valid rlimit struct living across the call. The resource's integer type
    // differs between glibc and musl, hence the cast through `as _`.
    check(unsafe { libc::setrlimit(resource as _, &rl) }).map(drop)
}

fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the prctl operations used here take integer arguments only.
    check(unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) }).map(drop)
}

pub fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0)
}

pub fn set_keepcaps(on: bool) -> io::Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0)
}

pub fn capbset_drop(cap: u32) -> io::Result<()> {
    prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0)
}

pub fn ambient_raise(cap: u32) -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
        libc::c_ulong::from(cap),
    )
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// capset(2) for this thread with 64-bit masks (version 3).
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: hdr and data match the kernel's v3 layout and live across the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    check(rc as libc::c_int).map(drop)
}

pub fn setgroups(gids: &[u32]) -> io::Result<()> {
    let g: Vec<libc::gid_t> = gids.iter().map(|&g| g as libc::gid_t).collect();
    // SAFETY: pointer and length describe a valid gid array.
    check(unsafe { libc::setgroups(g.len() as _, g.as_ptr()) }).map(drop)
}

pub fn setresgid(gid: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
}

pub fn setresuid(uid: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// execve(2); returns only on failure.
pub fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: path, argv and envp are NUL-terminated strings / NULL-terminated arrays that
    // outlive the call.
    unsafe { libc::execve(path.as_ptr(), a.as_ptr(), e.as_ptr()) };
    io::Error::last_os_error()
}

/// Default signal dispositions and an empty signal mask (Rust ignores SIGPIPE by default, and
/// ignored signals survive exec).
pub fn reset_signals() {
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: setting SIG_DFL for a valid signal number.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: set is a valid sigset_t initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Blocking waitpid (`pid` -1 = any child); returns (pid, raw status). Retries on EINTR.
pub fn waitpid(pid: i32) -> io::Result<(i32, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid int for waitpid to fill.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 {
            return Ok((rc, status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`_OLD`, a `struct timeval`; level `AF_VSOCK`), from
/// `<linux/vm_sockets.h>` (not in the `libc` crate).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// How long the agent's vsock connects to the host may take.
const VSOCK_CONNECT_TIMEOUT_S: u32 = 10;

/// Connects an AF_VSOCK stream socket to (cid, port). The fd is returned as a `UnixStream`:
/// read, write and shutdown are socket-family independent. `patient`: wait up to
/// [`VSOCK_CONNECT_TIMEOUT_S`] for the host's answer instead of the kernel's 2 s (for dials
/// the host is known to be listening for; a retry loop keeps the default).
pub fn vsock_connect(cid: u32, port: u32, patient: bool) -> io::Result<UnixStream> {
    // SAFETY: socket takes integer arguments.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // Linux gives a vsock connect 2 s by default. A host under load (measured: a busy nested
    // CI VM, where a pod's stdout stream timed out) can take longer to answer; the host's
    // own deadline on the agent is far longer (the shim's agent_timeout, 60 s by default).
    let timeout = libc::timeval {
        tv_sec: VSOCK_CONNECT_TIMEOUT_S.into(),
        tv_usec: 0,
    };
    if patient {
        // SAFETY: fd is a valid socket; the option value is a valid timeval of the given size
        // (SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD takes a `struct timeval` where time_t is a long,
        // as on x86_64 and aarch64). A kernel without the option leaves the default.
        unsafe {
            libc::setsockopt(
                fd,
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
    }
    loop {
        // SAFETY: addr is a valid sockaddr_vm and the length matches it.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(UnixStream::from(owned));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Microseconds since boot (CLOCK_BOOTTIME).
pub fn boottime_us() -> u64 {
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// An inotify instance watching one file for modification (e.g. a cgroup's `memory.events`,
/// which the kernel marks modified when a counter changes).
#[derive(Debug)]
pub struct FileWatch {
    fd: OwnedFd,
}

impl FileWatch {
    pub fn new(path: &Path) -> io::Result<Self> {
        // SAFETY: a plain system call with integer arguments.
        let raw = check(unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) })?;
        // SAFETY: `raw` was just returned by inotify_init1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c = cpath(path)?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        check(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) })?;
        Ok(Self { fd })
    }

    /// Waits up to `timeout_ms` for a change and drains the queued events. True when the
    /// file changed (or may have: a spurious wakeup only costs the caller a re-read).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: `buf` is writable for its whole length; the fd is non-blocking.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                break;
            }
        }
        Ok(true)
    }
}

/// A `NETLINK_ROUTE` socket, in the network namespace of the thread that opened it. Reads
/// time out after 5 s so a silent kernel cannot hang the agent.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    pub fn route() -> io::Result<Self> {
        // SAFETY: socket takes integer arguments.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `raw` was just returned by socket and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0: the kernel
        // picks the port id).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl and the length matches it.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval and the length matches it.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd })
    }

    /// Sends one datagram (one or more netlink messages) to the kernel.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: buf is readable for its whole length; the socket's default destination
            // is the kernel.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return if n as usize == buf.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short netlink send",
                    ))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one datagram into `buf`; a datagram larger than `buf` is an error.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is writable for its whole length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                let n = n as usize;
                return if n <= buf.len() {
                    Ok(n)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("netlink reply of {n} bytes truncated"),
                    ))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
