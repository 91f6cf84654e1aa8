//! The VMM's small OS seam outside the hypervisor layer: host signals and the host terminal
//! for `vmm run`. Every `unsafe` block has a `// SAFETY:` comment.

use std::io;

/// Signals `vmm run` forwards to the container.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage for a sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` was initialised above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks `signals` in the calling thread (call it before spawning threads so they inherit the
/// mask), so that [`wait_signal`] receives them instead of their default actions.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is valid for writing.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc == 0 {
        Ok(sig)
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The size (rows, cols) of the terminal on `fd`, if it is one.
pub fn window_size(fd: libc::c_int) -> Option<(u16, u16)> {
    // SAFETY: an all-zero winsize is valid storage.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which is valid for writing.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts the terminal on `fd` in raw mode; the returned guard restores it when dropped.
pub fn raw_mode(fd: libc::c_int) -> io::Result<RawModeGuard> {
    // SAFETY: an all-zero termios is valid storage; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid for writing.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let saved = t;
    // SAFETY: `t` holds the terminal's current settings; cfmakeraw edits them in place.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Ok(mut g) = SAVED_TERMINAL.lock() {
        *g = Some((fd, saved));
    }
    Ok(RawModeGuard { fd, saved })
}

/// Restores a terminal's settings on drop.
#[derive(Debug)]
pub struct RawModeGuard {
    fd: libc::c_int,
    saved: libc::termios,
}

/// The terminal settings to put back if the process has to exit without unwinding (a forced
/// exit from the signal thread): (descriptor, termios before raw mode).
static SAVED_TERMINAL: std::sync::Mutex<Option<(libc::c_int, libc::termios)>> =
    std::sync::Mutex::new(None);

/// Puts back the terminal settings saved by [`raw_mode`], if a guard is still live.
pub fn restore_terminal() {
    if let Some((fd, saved)) = SAVED_TERMINAL.lock().ok().and_then(|mut g| g.take()) {
        // SAFETY: `saved` is the termios read from this descriptor before it went raw.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = SAVED_TERMINAL.lock() {
            *g = None;
        }
        // SAFETY: `saved` is the termios read from this descriptor before it went raw.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Raises this process's open-file limit (every inode a virtio-fs guest has looked up holds a
/// host descriptor): to the kernel's `fs.nr_open` when allowed (root), else to the hard limit.
/// Best effort, once.
pub fn raise_nofile_limit() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `r` is valid for writing one rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
            return;
        }
        let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if nr_open > r.rlim_max {
            let big = libc::rlimit {
                rlim_cur: nr_open,
                rlim_max: nr_open,
            };
            // SAFETY: `big` is a valid rlimit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &big) } == 0 {
                return;
            }
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            // SAFETY: `r` is a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
        }
    });
}

/// Stops glibc from ever shrinking a thread's malloc heap. The first shrink reads
/// `/proc/sys/vm/overcommit_memory` (an `openat`), from whichever thread frees memory then:
/// under a seccomp allowlist without `openat` (the device threads) that ended the VMM (status
/// 159) after a burst of guest traffic. Large blocks are mmapped and unmapped as before; only
/// the top of a heap stays mapped (at most 128 MiB, the trim threshold). Once per process,
/// before any filter is installed; a no-op off glibc.
pub fn keep_malloc_heaps() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes the allocator's parameters; any value is accepted.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
    });
}

/// Makes `fd` descriptor 3 of the child `cmd` starts (inherited across exec) and gives the
/// child an empty signal mask (the caller may have blocked signals for its own forwarding).
pub fn pass_fd_as_3(cmd: &mut std::process::Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    let empty = sigset(&[]);
    // SAFETY: the hook runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, pthread_sigmask) on plain integers and a sigset
    // built before the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            let flags = libc::fcntl(3, libc::F_GETFD);
            if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// What the `SIGSYS` handler needs, set once by [`install_sigsys_handler`].
#[cfg(target_os = "linux")]
struct SigsysConfig {
    name: fn(i64) -> Option<&'static str>,
    status: i32,
}

#[cfg(target_os = "linux")]
static SIGSYS_CONFIG: std::sync::OnceLock<SigsysConfig> = std::sync::OnceLock::new();

#[cfg(target_os = "linux")]
thread_local! {
    /// The seccomp list this thread runs under, for the denial message.
    static THREAD_LABEL: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// Records which seccomp list the calling thread runs under (named by the `SIGSYS` handler).
#[cfg(target_os = "linux")]
pub fn set_thread_label(label: &'static str) {
    THREAD_LABEL.with(|l| l.set(label));
}

/// A fixed-size buffer for building the denial message without allocating.
#[cfg(target_os = "linux")]
struct MsgBuf {
    buf: [u8; 384],
    len: usize,
}

#[cfg(target_os = "linux")]
impl MsgBuf {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let neg = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        if neg {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// The `SIGSYS` handler: one line on stderr naming the system call and the thread's list, then
/// `_exit` with the configured status. Async-signal-safe: stack buffer, static data, `write`
/// and `_exit` (both allowed by every list).
#[cfg(target_os = "linux")]
extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let mut m = MsgBuf {
        buf: [0; 384],
        len: 0,
    };
    // siginfo_t for SIGSYS (`_sigsys` in the kernel's union, which starts at byte 16 on 64-bit
    // targets): `void *_call_addr; int _syscall; unsigned int _arch;`.
    let nr: i64 = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO), 128 bytes long; byte 24
        // holds `_syscall` for SIGSYS on 64-bit Linux, an aligned i32 inside the struct.
        i64::from(unsafe { info.cast::<u8>().add(24).cast::<i32>().read() })
    };
    let (name, status) = match SIGSYS_CONFIG.get() {
        Some(c) => ((c.name)(nr), c.status),
        None => (None, 159),
    };
    // A const-initialised thread-local without a destructor is a plain TLS slot: reading it
    // takes no lock and allocates nothing.
    let label = THREAD_LABEL.with(|l| l.get());
    // Threads that installed no list of their own (vCPU threads) inherited the VM thread's.
    let label = if label.is_empty() { "vmm" } else { label };
    m.push(b"skiff-vmm: seccomp: forbidden system call ");
    m.push(name.unwrap_or("syscall").as_bytes());
    m.push(b" (");
    m.push_num(nr);
    m.push(b") by a thread under the ");
    m.push(label.as_bytes());
    m.push(b" allowlist; the VMM exits with status ");
    m.push_num(i64::from(status));
    m.push(b" (debug with --seccomp log or SKIFF_SECCOMP=log)\n");
    // SAFETY: `m.buf[..m.len]` is initialised memory; write(2) and _exit(2) are
    // async-signal-safe.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(status);
    }
}

/// Installs (once per process) the `SIGSYS` handler that reports a call a seccomp filter
/// trapped: `name` maps a system call number to its name, `status` is the exit status.
#[cfg(target_os = "linux")]
pub fn install_sigsys_handler(name: fn(i64) -> Option<&'static str>, status: i32) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = SIGSYS_CONFIG.set(SigsysConfig { name, status });
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs an async-signal-safe handler (see `sigsys_handler`) for SIGSYS,
        // which nothing else in the process handles; `action` is fully initialised.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

/// A whole file's bytes: mapped read-only (`MAP_PRIVATE`) where the file system allows,
/// else read into memory. A mapping costs no copy and, read in order, one page fault per
/// fault-around window instead of one per page (the kernel and initramfs, 20+ MiB, are read
/// once per cold boot: the copy and faults of `std::fs::read` were a visible part of "kernel
/// loaded" under a slow hypervisor).
pub enum FileBytes {
    /// A read-only mapping of the whole file.
    Mapped {
        /// Start of the mapping.
        ptr: std::ptr::NonNull<u8>,
        /// Its length (the file's size when mapped).
        len: usize,
    },
    /// The file, read.
    Read(Vec<u8>),
}

// SAFETY: the mapping is private, read-only and owned by this value; nothing else aliases it
// mutably, so sharing and sending it between threads is as safe as for a `Box<[u8]>`.
unsafe impl Send for FileBytes {}
// SAFETY: see `Send`: only shared reads of the mapping are possible.
unsafe impl Sync for FileBytes {}

impl FileBytes {
    /// `path`'s bytes (mapped when possible). A file that changes size while mapped is the
    /// caller's problem only in that reads past the new end raise SIGBUS; the artefacts read
    /// here (kernel, initramfs) are not written while a VM boots from them.
    pub fn open(path: &std::path::Path) -> io::Result<FileBytes> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path)?;
        let len = usize::try_from(f.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        if len == 0 {
            return Ok(FileBytes::Read(Vec::new()));
        }
        // SAFETY: a fresh read-only private mapping of an open file descriptor; the kernel
        // picks the address, so no existing memory is affected. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // A file system without mmap: read it.
            return std::fs::read(path).map(FileBytes::Read);
        }
        // SAFETY: the mapping was just created with this length; the advice only changes how
        // the kernel reads it ahead, and a failure is harmless.
        unsafe {
            libc::madvise(p, len, libc::MADV_SEQUENTIAL);
        }
        match std::ptr::NonNull::new(p.cast::<u8>()) {
            Some(ptr) => Ok(FileBytes::Mapped { ptr, len }),
            None => std::fs::read(path).map(FileBytes::Read),
        }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: `ptr` is a live read-only mapping of `len` bytes owned by `self` (unmapped
            // only in `drop`), so the slice is valid for the borrow of `self`.
            FileBytes::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
            FileBytes::Read(v) => v,
        }
    }
}

impl Drop for FileBytes {
    fn drop(&mut self) {
        if let FileBytes::Mapped { ptr, len } = self {
            // SAFETY: the mapping was created in `open` with this address and length and is
            // unmapped once, here; no slice of it outlives `self`.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), *len);
            }
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            FileBytes::Mapped { .. } => "mapped",
            FileBytes::Read(_) => "read",
        };
        write!(f, "FileBytes({kind}, {} bytes)", self.len())
    }
}

#[cfg(test)]
mod file_bytes_tests {
    #![allow(clippy::unwrap_used)]
    use super::FileBytes;

    #[test]
    fn a_file_is_mapped_with_its_exact_bytes() {
        let dir = std::env::temp_dir().join(format!("skiff-filebytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let b = FileBytes::open(&p).unwrap();
        assert!(matches!(b, FileBytes::Mapped { .. }));
        assert_eq!(&*b, &data[..]);
        std::fs::write(&p, b"").unwrap();
        assert!(FileBytes::open(&p).unwrap().is_empty());
        assert!(FileBytes::open(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
