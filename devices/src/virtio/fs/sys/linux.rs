//! Linux implementation of the FUSE server's system calls.
//!
//! Confinement rules implemented here:
//! - names are resolved one component at a time with `openat(dir, name, O_PATH | O_NOFOLLOW)`
//!   (the caller has checked that `name` is a single component);
//! - an inode is reopened for I/O through its `/proc/self/fd/N` magic link (which names
//!   exactly the inode the server holds, never a path), and only after the caller checked it is
//!   a regular file or directory: symlinks are never opened, only `readlinkat`'ed;
//! - all creation / removal / rename / link calls are `*at()` calls on parent fds with
//!   single-component names and no symlink following.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{
    self as rfs, AtFlags, FallocateFlags, FileType, Mode, OFlags, RawDir, RenameFlags,
    ResolveFlags, SeekFrom, Timespec, Timestamps, XattrFlags,
};

use super::{DirEntry, Errno, Lock, Result, Stat, StatFs, Time};
use vm_memory::VolatileSlice;

fn e(err: rustix::io::Errno) -> Errno {
    Errno(err.raw_os_error())
}

fn io_e(err: std::io::Error) -> Errno {
    Errno(err.raw_os_error().unwrap_or(libc::EIO))
}

/// `/proc/self/fd/N` as a C string number relative to the `/proc/self/fd` directory.
fn fd_name(fd: &OwnedFd) -> String {
    fd.as_raw_fd().to_string()
}

fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens the shared directory itself (`O_PATH | O_DIRECTORY`). The configured path may contain
/// symlinks: it is chosen by the host administrator, not the guest.
pub fn open_root(path: &Path) -> Result<OwnedFd> {
    rfs::openat(
        rfs::CWD,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(e)
}

/// Opens `/proc/self/fd` (needed to reopen `O_PATH` fds).
pub fn open_proc_self_fd() -> Result<OwnedFd> {
    rfs::openat(
        rfs::CWD,
        "/proc/self/fd",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(e)
}

/// Whether `openat2` works here (Linux 5.6+, not filtered by a seccomp policy).
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// Makes [`lookup_at`] use plain `openat` from now on (tests of the fallback path).
#[cfg(test)]
pub fn disable_openat2() {
    OPENAT2.store(false, Ordering::Relaxed);
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW)`: one component, never following a symlink.
///
/// Defence in depth: where available this is `openat2` with `RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so even a name that slipped past the
/// single-component check could not leave `dir` or cross a symlink (a trailing symlink is
/// still returned as an `O_PATH` fd of the link itself).
pub fn lookup_at(dir: &OwnedFd, name: &CStr) -> Result<OwnedFd> {
    if OPENAT2.load(Ordering::Relaxed) {
        match rfs::openat2(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {
                OPENAT2.store(false, Ordering::Relaxed);
            }
            r => return r.map_err(e),
        }
    }
    rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(e)
}

/// An `O_PATH` fd for the inode `fd` refers to.
pub fn path_fd(proc_fd: &OwnedFd, fd: &OwnedFd) -> Result<OwnedFd> {
    rfs::openat(
        proc_fd,
        fd_name(fd),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(e)
}

#[allow(clippy::unnecessary_cast)]
fn conv_stat(st: &rfs::Stat) -> Stat {
    Stat {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        mode: st.st_mode as u32,
        nlink: st.st_nlink as u64,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        rdev: st.st_rdev as u64,
        size: st.st_size as u64,
        blksize: st.st_blksize as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as i64,
        atime_nsec: st.st_atime_nsec as u32,
        mtime: st.st_mtime as i64,
        mtime_nsec: st.st_mtime_nsec as u32,
        ctime: st.st_ctime as i64,
        ctime_nsec: st.st_ctime_nsec as u32,
    }
}

/// `fstat` (works on `O_PATH` fds).
pub fn fstat(fd: &OwnedFd) -> Result<Stat> {
    rfs::fstat(fd).map(|s| conv_stat(&s)).map_err(e)
}

/// Reopens the regular file `fd` through `/proc/self/fd` with `flags` (Linux open flags,
/// already filtered by the caller; `O_CLOEXEC` and `O_NOCTTY` are added). The caller must have
/// checked that `fd` is a regular file.
pub fn reopen(proc_fd: &OwnedFd, fd: &OwnedFd, flags: u32) -> Result<OwnedFd> {
    let fl = OFlags::from_bits_retain(flags) | OFlags::CLOEXEC | OFlags::NOCTTY;
    rfs::openat(proc_fd, fd_name(fd), fl, Mode::empty()).map_err(e)
}

/// Opens the directory `fd` for reading (`openat(fd, ".")`).
pub fn open_dir(fd: &OwnedFd) -> Result<OwnedFd> {
    rfs::openat(
        fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(e)
}

/// Creates and opens a regular file `name` in `dir` (`O_CREAT | O_EXCL | O_NOFOLLOW`).
pub fn create_at(dir: &OwnedFd, name: &CStr, flags: u32, mode: u32) -> Result<OwnedFd> {
    let fl = OFlags::from_bits_retain(flags)
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NOCTTY;
    rfs::openat(dir, name, fl, Mode::from_raw_mode(mode)).map_err(e)
}

/// `mkdirat`.
pub fn mkdir_at(dir: &OwnedFd, name: &CStr, mode: u32) -> Result<()> {
    rfs::mkdirat(dir, name, Mode::from_raw_mode(mode)).map_err(e)
}

/// `mknodat` (`mode` includes the file type bits).
pub fn mknod_at(dir: &OwnedFd, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    rfs::mknodat(
        dir,
        name,
        FileType::from_raw_mode(mode),
        Mode::from_raw_mode(mode),
        rdev,
    )
    .map_err(e)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &CStr, dir: &OwnedFd, name: &CStr) -> Result<()> {
    rfs::symlinkat(target, dir, name).map_err(e)
}

/// Reads the symlink `fd` (an `O_PATH` fd of the link itself).
pub fn readlink(fd: &OwnedFd) -> Result<Vec<u8>> {
    rfs::readlinkat(fd, c"", Vec::new())
        .map(|c| c.into_bytes())
        .map_err(e)
}

/// `unlinkat` (with `AT_REMOVEDIR` when `dir_flag`).
pub fn unlink_at(dir: &OwnedFd, name: &CStr, dir_flag: bool) -> Result<()> {
    let fl = if dir_flag {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rfs::unlinkat(dir, name, fl).map_err(e)
}

/// `renameat2` with Linux `RENAME_*` flags.
pub fn rename_at(
    olddir: &OwnedFd,
    oldname: &CStr,
    newdir: &OwnedFd,
    newname: &CStr,
    flags: u32,
) -> Result<()> {
    rfs::renameat_with(
        olddir,
        oldname,
        newdir,
        newname,
        RenameFlags::from_bits_retain(flags),
    )
    .map_err(e)
}

/// Hard-links the inode `fd` as `newname` in `newdir` (through `/proc/self/fd`, which does
/// not need `CAP_DAC_READ_SEARCH`).
pub fn link_at(proc_fd: &OwnedFd, fd: &OwnedFd, newdir: &OwnedFd, newname: &CStr) -> Result<()> {
    rfs::linkat(
        proc_fd,
        fd_name(fd),
        newdir,
        newname,
        AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(e)
}

/// Changes the owner of the inode `fd` (an `O_PATH` fd, symlinks included). An id of
/// `u32::MAX` (`-1`) leaves that id unchanged, as in `chown(2)`.
pub fn chown_fd(fd: &OwnedFd, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    let uid = uid.filter(|&u| u != u32::MAX);
    let gid = gid.filter(|&g| g != u32::MAX);
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    rfs::chownat(
        fd,
        c"",
        uid.map(rfs::Uid::from_raw),
        gid.map(rfs::Gid::from_raw),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(e)
}

/// Changes the mode of the (non-symlink) inode `fd`.
pub fn chmod_fd(proc_fd: &OwnedFd, fd: &OwnedFd, mode: u32) -> Result<()> {
    rfs::chmodat(
        proc_fd,
        fd_name(fd),
        Mode::from_raw_mode(mode),
        AtFlags::empty(),
    )
    .map_err(e)
}

fn ts(t: Time) -> Timespec {
    match t {
        Time::Omit => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        Time::Now => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        Time::Set(s, ns) => Timespec {
            tv_sec: s,
            tv_nsec: i64::from(ns.min(999_999_999)),
        },
    }
}

/// Sets atime/mtime of the inode `fd`; `symlink` selects the `AT_EMPTY_PATH` variant (the
/// `/proc` path would follow nothing useful for a link).
pub fn utimens(proc_fd: &OwnedFd, fd: &OwnedFd, symlink: bool, at: Time, mt: Time) -> Result<()> {
    let t = Timestamps {
        last_access: ts(at),
        last_modification: ts(mt),
    };
    if symlink {
        rfs::utimensat(fd, c"", &t, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(e)
    } else {
        rfs::utimensat(proc_fd, fd_name(fd), &t, AtFlags::empty()).map_err(e)
    }
}

/// `ftruncate`.
pub fn truncate(fd: &OwnedFd, size: u64) -> Result<()> {
    rfs::ftruncate(fd, size).map_err(e)
}

/// `pread` until `buf` is full or end of file.
pub fn pread(fd: &OwnedFd, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let pos = off.checked_add(done as u64).ok_or(Errno(libc::EINVAL))?;
        match rustix::io::pread(fd, &mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(e(err)),
        }
    }
    Ok(done)
}

/// `preadv` from `off` straight into guest buffers until they are full or the file ends;
/// returns the bytes read. At most `IOV_MAX` buffers go into one call; the rest follow.
pub fn pread_guest(fd: &OwnedFd, bufs: &[VolatileSlice<'_>], off: u64) -> Result<usize> {
    const IOV_MAX: usize = 1024;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The buffers from byte `done` on, as iovecs.
        let mut skip = done;
        let mut iov: Vec<libc::iovec> = Vec::new();
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            if iov.len() == IOV_MAX {
                break;
            }
            let base = b.ptr_guard_mut().as_ptr();
            iov.push(libc::iovec {
                // `skip` < b.len(), so this stays inside the slice.
                iov_base: base.wrapping_add(skip).cast(),
                iov_len: b.len() - skip,
            });
            skip = 0;
        }
        let pos = off.checked_add(done as u64).ok_or(Errno(libc::EINVAL))?;
        let pos = libc::off_t::try_from(pos).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: every iovec points into a `VolatileSlice` of guest memory borrowed for this
        // call (mapped for the VM's lifetime, writable, `iov_len` bytes from `iov_base`); the
        // kernel only writes file data there. `iov` outlives the call and its length is
        // at most IOV_MAX.
        let n =
            unsafe { libc::preadv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, pos) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_e(err));
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// `pwrite` (one call; a short count is returned to the guest).
pub fn pwrite(fd: &OwnedFd, data: &[u8], off: u64) -> Result<usize> {
    rustix::io::pwrite(fd, data, off).map_err(e)
}

/// `fsync` / `fdatasync`.
pub fn fsync(fd: &OwnedFd, datasync: bool) -> Result<()> {
    if datasync {
        rfs::fdatasync(fd).map_err(e)
    } else {
        rfs::fsync(fd).map_err(e)
    }
}

/// `fstatvfs` (works on `O_PATH` fds).
pub fn statfs(fd: &OwnedFd) -> Result<StatFs> {
    let s = rfs::fstatvfs(fd).map_err(e)?;
    Ok(StatFs {
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: s.f_bsize,
        namelen: s.f_namemax,
        frsize: s.f_frsize,
    })
}

fn path_c(fd: &OwnedFd) -> Result<std::ffi::CString> {
    std::ffi::CString::new(fd_path(fd)).map_err(|_| Errno(libc::EINVAL))
}

/// `getxattr` on the (non-symlink) inode `fd`; an empty `buf` asks for the size.
///
/// The size probe goes through libc: rustix 1.1 returns 0 for a zero-length buffer.
pub fn getxattr(fd: &OwnedFd, name: &CStr, buf: &mut [u8]) -> Result<usize> {
    if buf.is_empty() {
        let p = path_c(fd)?;
        // SAFETY: `p` and `name` are valid NUL-terminated strings for the call; a null value
        // pointer with size 0 only asks for the size and is never written.
        let r = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        return usize::try_from(r).map_err(|_| io_e(std::io::Error::last_os_error()));
    }
    rfs::getxattr(fd_path(fd), name, buf).map_err(e)
}

/// `setxattr` on the (non-symlink) inode `fd` with `XATTR_CREATE`/`XATTR_REPLACE` flags.
pub fn setxattr(fd: &OwnedFd, name: &CStr, value: &[u8], flags: u32) -> Result<()> {
    rfs::setxattr(
        fd_path(fd),
        name,
        value,
        XattrFlags::from_bits_retain(flags),
    )
    .map_err(e)
}

/// `listxattr` on the (non-symlink) inode `fd`; an empty `buf` asks for the size.
pub fn listxattr(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize> {
    if buf.is_empty() {
        let p = path_c(fd)?;
        // SAFETY: `p` is a valid NUL-terminated string for the call; a null list pointer with
        // size 0 only asks for the size and is never written.
        let r = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        return usize::try_from(r).map_err(|_| io_e(std::io::Error::last_os_error()));
    }
    rfs::listxattr(fd_path(fd), buf).map_err(e)
}

/// `removexattr` on the (non-symlink) inode `fd`.
pub fn removexattr(fd: &OwnedFd, name: &CStr) -> Result<()> {
    rfs::removexattr(fd_path(fd), name).map_err(e)
}

/// `fallocate` with Linux `FALLOC_FL_*` mode bits.
pub fn fallocate(fd: &OwnedFd, mode: u32, off: u64, len: u64) -> Result<()> {
    rfs::fallocate(fd, FallocateFlags::from_bits_retain(mode), off, len).map_err(e)
}

/// `lseek` with `SEEK_SET`/`CUR`/`END`/`DATA`/`HOLE` (Linux values 0..=4).
pub fn lseek(fd: &OwnedFd, off: u64, whence: u32) -> Result<u64> {
    // SEEK_CUR/SEEK_END offsets are signed on the wire (two's complement in a u64).
    let signed = off as i64;
    let pos = match whence {
        0 => SeekFrom::Start(off),
        1 => SeekFrom::Current(signed),
        2 => SeekFrom::End(signed),
        3 => SeekFrom::Data(off),
        4 => SeekFrom::Hole(off),
        _ => return Err(Errno(libc::EINVAL)),
    };
    rfs::seek(fd, pos).map_err(e)
}

/// Reads directory entries of the directory `fd` starting at cookie `offset`, calling `f` for
/// each until it returns `false` or the directory ends.
pub fn read_dir(
    fd: &OwnedFd,
    offset: u64,
    mut f: impl FnMut(DirEntry<'_>) -> Result<bool>,
) -> Result<()> {
    rfs::seek(fd, SeekFrom::Start(offset)).map_err(e)?;
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 32 * 1024];
    let mut dir = RawDir::new(fd.as_fd(), &mut buf);
    while let Some(ent) = dir.next() {
        let ent = ent.map_err(e)?;
        let typ = match ent.file_type() {
            FileType::Unknown => 0,
            t => t.as_raw_mode() >> 12,
        };
        let de = DirEntry {
            ino: ent.ino(),
            next: ent.next_entry_cookie(),
            typ,
            name: ent.file_name().to_bytes(),
        };
        if !f(de)? {
            break;
        }
    }
    Ok(())
}

fn to_flock(l: &Lock) -> Result<libc::flock> {
    let start = i64::try_from(l.start).map_err(|_| Errno(libc::EINVAL))?;
    let len = if l.end >= i64::MAX as u64 {
        0
    } else {
        if l.end < l.start {
            return Err(Errno(libc::EINVAL));
        }
        i64::try_from(l.end - l.start + 1).map_err(|_| Errno(libc::EINVAL))?
    };
    let typ = match l.typ {
        0 => libc::F_RDLCK,
        1 => libc::F_WRLCK,
        2 => libc::F_UNLCK,
        _ => return Err(Errno(libc::EINVAL)),
    };
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl.l_pid = 0;
    Ok(fl)
}

/// Sets (or clears) an open-file-description lock on `fd`, never blocking.
///
/// OFD locks belong to the server's open file (one per guest open), so two guest opens
/// conflict like two processes would; a blocking request (SETLKW) is answered non-blocking
/// (`EAGAIN` on conflict) so a guest can never park a server thread.
pub fn set_lock(fd: &OwnedFd, l: &Lock) -> Result<()> {
    let fl = to_flock(l)?;
    // SAFETY: `fd` is a valid open fd for the duration of the call and `fl` is a valid,
    // initialised `struct flock` the kernel only reads.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(io_e(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Tests for a lock conflicting with `l`; returns the conflicting lock or `F_UNLCK`.
pub fn get_lock(fd: &OwnedFd, l: &Lock) -> Result<Lock> {
    let mut fl = to_flock(l)?;
    // SAFETY: `fd` is a valid open fd and `fl` a valid `struct flock` the kernel may
    // overwrite; it lives across the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io_e(std::io::Error::last_os_error()));
    }
    let typ = match i32::from(fl.l_type) {
        libc::F_RDLCK => 0,
        libc::F_WRLCK => 1,
        _ => 2,
    };
    let start = u64::try_from(fl.l_start).unwrap_or(0);
    let end = if fl.l_len <= 0 {
        i64::MAX as u64
    } else {
        start.saturating_add(u64::try_from(fl.l_len).unwrap_or(1) - 1)
    };
    Ok(Lock { typ, start, end })
}

/// Effective uid of the server process.
pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The effective group id of this process.
pub fn getegid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// Limits the calling thread's capabilities (effective, permitted and inheritable sets) to what
/// file operations need: `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`,
/// plus `CAP_FSETID` and `CAP_SETFCAP` when `keep` says so. Capabilities are per thread on
/// Linux (`capset` on the caller), so other threads of the process keep theirs. Capabilities
/// the thread does not have are not added. Returns the effective set left (the raw bits).
pub fn limit_thread_caps(keep: super::KeepCaps) -> Result<u64> {
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet as C, CapabilitySets};
    let mut want = C::CHOWN | C::DAC_OVERRIDE | C::DAC_READ_SEARCH | C::FOWNER;
    if keep.fsetid {
        want |= C::FSETID;
    }
    if keep.setfcap {
        want |= C::SETFCAP;
    }
    let cur = capabilities(None).map_err(e)?;
    let new = CapabilitySets {
        effective: cur.effective & want,
        permitted: cur.permitted & want,
        inheritable: cur.inheritable & want,
    };
    set_capabilities(None, new).map_err(e)?;
    Ok(new.effective.bits())
}
