//! The OS seam of the FUSE server: every system call the server makes goes through here.
//!
//! The Linux implementation ([`linux`]) uses `rustix` (no `unsafe`) except for the POSIX
//! (open file description) locks, which `rustix` does not expose. Other hosts get a stub that
//! fails every call with `ENOSYS` until a real port (macOS) is written; the types here are the
//! contract such a port has to meet. Errors are [`Errno`]s holding **Linux** errno values (the
//! FUSE wire values), so a port to a host with other numbers must translate them.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
pub use other::*;

pub use std::os::fd::OwnedFd as Fd;

/// A Linux errno value (positive), as sent to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// Result of a system call wrapper.
pub type Result<T> = std::result::Result<T, Errno>;

/// Which optional capabilities a server thread keeps (see `limit_thread_caps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepCaps {
    /// `CAP_FSETID`: writes and chmods by the server keep setuid/setgid bits.
    pub fsetid: bool,
    /// `CAP_SETFCAP`: the server may set `security.capability`.
    pub setfcap: bool,
}

/// What the server needs of `struct stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: i64,
    pub atime_nsec: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
}

/// What the server needs of `struct statvfs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u64,
    pub namelen: u64,
    pub frsize: u64,
}

/// One timestamp of a `utimensat` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    /// Leave unchanged.
    Omit,
    /// Set to the current time.
    Now,
    /// Set to seconds + nanoseconds.
    Set(i64, u32),
}

/// A POSIX byte-range lock (Linux lock type values, inclusive `end`, `end ==
/// OFFSET_MAX` meaning "to end of file").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: u32,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
}

/// One directory entry from [`read_dir`].
#[derive(Debug)]
pub struct DirEntry<'a> {
    /// Inode number.
    pub ino: u64,
    /// Cookie for the next entry (seek position).
    pub next: u64,
    /// `DT_*` type.
    pub typ: u32,
    /// Name (one component, no NUL).
    pub name: &'a [u8],
}
