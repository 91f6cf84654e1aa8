//! Stub for hosts without a port yet (macOS): every call fails with `ENOSYS`, so
//! [`crate::virtio::fs::Server::new`] fails cleanly. A macOS port implements the same functions
//! (`openat` + `O_NOFOLLOW`, `fcntl(F_GETPATH)`-free reopen through `/dev/fd`, xattrs with
//! `XATTR_NOFOLLOW`, errno translation to Linux values).

#![allow(unused_variables)]

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::{DirEntry, Errno, Lock, Result, Stat, StatFs, Time};

const ENOSYS: Errno = Errno(38);

/// Opens the shared directory itself (`O_PATH | O_DIRECTORY`). The configured path may contain
/// symlinks: it is chosen by the host administrator, not the guest.
pub fn open_root(path: &Path) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// Opens `/proc/self/fd` (needed to reopen `O_PATH` fds).
pub fn open_proc_self_fd() -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW)`: one component, never following a symlink.
pub fn lookup_at(dir: &OwnedFd, name: &CStr) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// An `O_PATH` fd for the inode `fd` refers to.
pub fn path_fd(proc_fd: &OwnedFd, fd: &OwnedFd) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// `fstat` (works on `O_PATH` fds).
pub fn fstat(fd: &OwnedFd) -> Result<Stat> {
    Err(ENOSYS)
}

/// Reopens the regular file `fd` through `/proc/self/fd` with `flags` (Linux open flags,
/// already filtered by the caller; `O_CLOEXEC` and `O_NOCTTY` are added). The caller must have
/// checked that `fd` is a regular file.
pub fn reopen(proc_fd: &OwnedFd, fd: &OwnedFd, flags: u32) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// Opens the directory `fd` for reading (`openat(fd, ".")`).
pub fn open_dir(fd: &OwnedFd) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// Creates and opens a regular file `name` in `dir` (`O_CREAT | O_EXCL | O_NOFOLLOW`).
pub fn create_at(dir: &OwnedFd, name: &CStr, flags: u32, mode: u32) -> Result<OwnedFd> {
    Err(ENOSYS)
}

/// `mkdirat`.
pub fn mkdir_at(dir: &OwnedFd, name: &CStr, mode: u32) -> Result<()> {
    Err(ENOSYS)
}

/// `mknodat` (`mode` includes the file type bits).
pub fn mknod_at(dir: &OwnedFd, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    Err(ENOSYS)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &CStr, dir: &OwnedFd, name: &CStr) -> Result<()> {
    Err(ENOSYS)
}

/// Reads the symlink `fd` (an `O_PATH` fd of the link itself).
pub fn readlink(fd: &OwnedFd) -> Result<Vec<u8>> {
    Err(ENOSYS)
}

/// `unlinkat` (with `AT_REMOVEDIR` when `dir_flag`).
pub fn unlink_at(dir: &OwnedFd, name: &CStr, dir_flag: bool) -> Result<()> {
    Err(ENOSYS)
}

/// `renameat2` with Linux `RENAME_*` flags.
pub fn rename_at(
    olddir: &OwnedFd,
    oldname: &CStr,
    newdir: &OwnedFd,
    newname: &CStr,
    flags: u32,
) -> Result<()> {
    Err(ENOSYS)
}

/// Hard-links the inode `fd` as `newname` in `newdir` (through `/proc/self/fd`, which does
/// not need `CAP_DAC_READ_SEARCH`).
pub fn link_at(proc_fd: &OwnedFd, fd: &OwnedFd, newdir: &OwnedFd, newname: &CStr) -> Result<()> {
    Err(ENOSYS)
}

/// Changes the owner of the inode `fd` (an `O_PATH` fd, symlinks included).
pub fn chown_fd(fd: &OwnedFd, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    Err(ENOSYS)
}

/// Changes the mode of the (non-symlink) inode `fd`.
pub fn chmod_fd(proc_fd: &OwnedFd, fd: &OwnedFd, mode: u32) -> Result<()> {
    Err(ENOSYS)
}

/// Sets atime/mtime of the inode `fd`; `symlink` selects the `AT_EMPTY_PATH` variant (the
/// `/proc` path would follow nothing useful for a link).
pub fn utimens(proc_fd: &OwnedFd, fd: &OwnedFd, symlink: bool, at: Time, mt: Time) -> Result<()> {
    Err(ENOSYS)
}

/// `ftruncate`.
pub fn truncate(fd: &OwnedFd, size: u64) -> Result<()> {
    Err(ENOSYS)
}

/// `pread` until `buf` is full or end of file.
pub fn pread(fd: &OwnedFd, buf: &mut [u8], off: u64) -> Result<usize> {
    Err(ENOSYS)
}

/// `preadv` straight into guest buffers until they are full or the file ends.
pub fn pread_guest(fd: &OwnedFd, bufs: &[vm_memory::VolatileSlice<'_>], off: u64) -> Result<usize> {
    Err(ENOSYS)
}

/// `pwrite` (one call; a short count is returned to the guest).
pub fn pwrite(fd: &OwnedFd, data: &[u8], off: u64) -> Result<usize> {
    Err(ENOSYS)
}

/// `fsync` / `fdatasync`.
pub fn fsync(fd: &OwnedFd, datasync: bool) -> Result<()> {
    Err(ENOSYS)
}

/// `fstatvfs` (works on `O_PATH` fds).
pub fn statfs(fd: &OwnedFd) -> Result<StatFs> {
    Err(ENOSYS)
}

/// `getxattr` on the (non-symlink) inode `fd`; an empty `buf` asks for the size.
pub fn getxattr(fd: &OwnedFd, name: &CStr, buf: &mut [u8]) -> Result<usize> {
    Err(ENOSYS)
}

/// `setxattr` on the (non-symlink) inode `fd` with `XATTR_CREATE`/`XATTR_REPLACE` flags.
pub fn setxattr(fd: &OwnedFd, name: &CStr, value: &[u8], flags: u32) -> Result<()> {
    Err(ENOSYS)
}

/// `listxattr` on the (non-symlink) inode `fd`; an empty `buf` asks for the size.
pub fn listxattr(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize> {
    Err(ENOSYS)
}

/// `removexattr` on the (non-symlink) inode `fd`.
pub fn removexattr(fd: &OwnedFd, name: &CStr) -> Result<()> {
    Err(ENOSYS)
}

/// `fallocate` with Linux `FALLOC_FL_*` mode bits.
pub fn fallocate(fd: &OwnedFd, mode: u32, off: u64, len: u64) -> Result<()> {
    Err(ENOSYS)
}

/// `lseek` with `SEEK_SET`/`CUR`/`END`/`DATA`/`HOLE` (Linux values 0..=4).
pub fn lseek(fd: &OwnedFd, off: u64, whence: u32) -> Result<u64> {
    Err(ENOSYS)
}

/// Reads directory entries of the directory `fd` starting at cookie `offset`, calling `f` for
/// each until it returns `false` or the directory ends.
pub fn read_dir(
    fd: &OwnedFd,
    offset: u64,
    f: impl FnMut(DirEntry<'_>) -> Result<bool>,
) -> Result<()> {
    Err(ENOSYS)
}

/// Sets (or clears) an open-file-description lock on `fd`, never blocking.
///
/// OFD locks belong to the server's open file (one per guest open), so two guest opens
/// conflict like two processes would; a blocking request (SETLKW) is answered non-blocking
/// (`EAGAIN` on conflict) so a guest can never park a server thread.
pub fn set_lock(fd: &OwnedFd, l: &Lock) -> Result<()> {
    Err(ENOSYS)
}

/// Tests for a lock conflicting with `l`; returns the conflicting lock or `F_UNLCK`.
pub fn get_lock(fd: &OwnedFd, l: &Lock) -> Result<Lock> {
    Err(ENOSYS)
}

/// Effective uid of the server process.
pub fn geteuid() -> u32 {
    0
}

/// The effective group id of this process.
pub fn getegid() -> u32 {
    0
}

/// Limits the calling thread's capabilities: nothing to do on hosts without Linux
/// capabilities (the macOS port runs unprivileged).
pub fn limit_thread_caps(keep: super::KeepCaps) -> Result<u64> {
    Ok(0)
}
