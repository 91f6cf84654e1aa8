//! The FUSE server behind Skiff's virtio-fs device: it shares one host directory with the
//! guest. It is byte-level: [`Server::handle`] takes the bytes of one request (everything the
//! guest put in the readable descriptors) and returns the bytes of the reply. The virtio
//! device wrapper (queues, descriptor chains) is a separate piece.
//!
//! # Threat model
//!
//! The guest is hostile. It controls every byte of every request: header fields (opcode,
//! node ids, lengths, uid/gid), argument structs, names, xattr names and values, write data,
//! file handles and offsets, and the order and number of requests (including never sending
//! FORGET). It can also race its own requests against each other from several queues. It does
//! **not** control the host side of the shared directory, the server's configuration, or
//! anything outside the shared directory, and must never reach it.
//!
//! # Confinement
//!
//! - The shared root is opened once (`O_PATH`). Every other inode is reached from a parent's
//!   `O_PATH` fd with `openat(parent, name, O_PATH | O_NOFOLLOW)`, where `name` is checked to be
//!   one path component (non-empty, not `.` or `..`, no `/`, no NUL, at most 255 bytes;
//!   otherwise `EINVAL`/`ENAMETOOLONG`). Paths are never built or resolved on the host.
//! - Symlinks are never followed on the host: a symlink is an inode like any other that can be
//!   READLINK'ed, renamed, unlinked, linked; OPEN of a symlink node is `ELOOP`. Only regular
//!   files are (re)opened for I/O (devices, FIFOs and sockets are `ENXIO`: the guest kernel
//!   handles those itself), through `/proc/self/fd/N` which names exactly the inode held.
//! - Creation, removal, rename and link are `*at()` calls on parent fds.
//! - A read-only share answers every mutating request with `EROFS`.
//! - Node ids and file handles are server-chosen, never reused, and looked up in tables:
//!   an unknown node id is `ENOENT`, an unknown handle `EBADF`.
//!
//! A host process that moves a directory the guest holds out of the share is outside this
//! model (as with virtiofsd): the server keeps the fd it has.
//!
//! # Share policy
//!
//! With [`Ownership::Passthrough`] and a root server, what the guest does inside the share
//! happens to real host files that host users (and other guests sharing the directory) can
//! use. [`Config::policy`] bounds it:
//!
//! - Both policies:
//!   - **Device nodes**: MKNOD of a block or character device is `EPERM` in passthrough mode,
//!     except the overlayfs whiteout (character 0:0, which opens nothing and needs no
//!     `CAP_MKNOD` since Linux 5.8). FIFOs, sockets and regular files are fine. (In
//!     [`Ownership::Xattr`] mode device nodes are regular 0600 host files anyway.)
//!   - **Xattrs**: only `user.*` passes, except `user.containers.override_stat`, the
//!     ownership xattr, in both ownership modes. Everything else (`trusted.*`, `security.*`,
//!     `system.*` with the POSIX ACLs, unknown namespaces) is refused: SETXATTR and
//!     REMOVEXATTR `EPERM`, GETXATTR `ENODATA`, left out of LISTXATTR, whether the guest or the
//!     host put it there. Unlike virtiofsd's `xattrmap` nothing is remapped into `user.*`: a
//!     guest overlayfs on a share needs its `userxattr` option.
//!   - **chown** is allowed (containers chown their data directories); the host kernel clears
//!     setuid/setgid on chown of a non-directory.
//!   - **`HANDLE_KILLPRIV_V2`** is offered when the guest asks: WRITE with
//!     `FUSE_WRITE_KILL_SUIDGID` (before the data is written), SETATTR with
//!     `FATTR_KILL_SUIDGID` (after the truncate or chown), and OPEN/CREATE of an existing file
//!     with `O_TRUNC` and `FUSE_OPEN_KILL_SUIDGID` clear the setuid bit and, when the file is
//!     group-executable, the setgid bit (in the override xattr in xattr mode). The host kernel
//!     itself removes `security.capability` on write, truncate and chown.
//!   - **Capabilities**: [`Server::limit_thread_capabilities`] (called on every device worker
//!     thread) keeps `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` and `CAP_FOWNER`
//!     in the thread's effective, permitted and inheritable sets and drops every other one
//!     (`CAP_MKNOD`, `CAP_SYS_ADMIN`, `CAP_SYS_RESOURCE`: no root-reserved blocks for the
//!     guest, ...). An unprivileged server has nothing to drop.
//! - [`SharePolicy::Volume`] (the default; a host directory bind-mounted into the container):
//!   the setuid bit is cleared from every mode the guest sets (CREATE, MKNOD, MKDIR, SETATTR),
//!   and the setgid bit too on non-directories (directories keep it for group inheritance), in
//!   both ownership modes; no `security.capability`. The worker threads also drop
//!   `CAP_FSETID`, so the host kernel clears setuid/setgid whenever the guest writes or
//!   truncates a setuid file the host put in the volume, whether or not the guest kernel asks.
//!   The price: the host kernel drops the setgid bit of a directory chmod'ed (or made) by the
//!   guest when its group is not one of the server's groups.
//! - [`SharePolicy::Rootfs`] (the container's own root filesystem, a snapshot made for it):
//!   setuid and setgid bits and `security.capability` are kept (dpkg installs setuid
//!   binaries, postinst scripts run `setcap`); setuid files there are as exposed to host users
//!   as `security.capability` ones, so both or neither. The threads keep `CAP_FSETID` and
//!   `CAP_SETFCAP`.
//!
//! Host hygiene the integrator still owns: a rootfs share can hold setuid-root files. The
//! server never opens device nodes or FIFOs itself, but host users could: put shares on a
//! `nosuid,nodev` mount or below a directory only the VMM user can enter.
//!
//! # Bounds
//!
//! At most [`Config::max_inodes`] live inodes (LOOKUP and friends then fail with `ENFILE`, so a
//! guest that never forgets cannot grow memory without bound); at most
//! [`MAX_HANDLES`] open handles (`EMFILE`); READ and WRITE at most 1 MiB and READ
//! never more than `max_out`; READDIR replies at most 128 KiB; xattr values and lists at most
//! 64 KiB. Each inode (but the root) and each handle holds one host fd, taken from
//! [`Config::fd_budget`], which all shares of one VM share ([`DEFAULT_FD_BUDGET`] fds by
//! default): once it is spent, new inodes and handles in any of them are `ENFILE` until the
//! guest sends FORGET or RELEASE. The process's `RLIMIT_NOFILE` must allow the budget (or the
//! guest sees `EMFILE` earlier).
//!
//! # Ownership
//!
//! [`Ownership::Passthrough`] shows host uid/gid/mode; when the server runs as root, new
//! nodes are chowned to the requesting guest uid/gid. [`Ownership::Xattr`] (rootless) keeps
//! guest-visible `uid:gid:mode[:rdev]` in the `user.containers.override_stat` xattr (libkrun's
//! format, `uid:gid:0MODE` with an octal mode including the type bits, plus our optional
//! `:rdev`); special files are regular 0600 host files. The xattr is hidden from the guest.
//! Symlinks cannot carry `user.*` xattrs on Linux, so they always show host values.
//!
//! # Protocol
//!
//! INIT must come first (anything else before it is `EIO`); DESTROY resets the tables and
//! expects a new INIT. FORGET, BATCH_FORGET and INTERRUPT get no reply. The server is
//! `Send + Sync`: requests may be handled concurrently from several threads.

pub mod abi;
mod passthrough;
mod sys;

pub use passthrough::{MAX_HANDLES, MAX_IO, MAX_READDIR, MAX_XATTR, OVERRIDE_XATTR};

#[cfg(all(test, target_os = "linux"))]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use abi::{errno, opcode, InHeader, Reader, Writer};
use passthrough::Fs;
use sys::Errno;

/// How guest-visible ownership and modes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ownership {
    /// Host uid/gid/mode are the guest's (chown to the guest's uid/gid when running as root).
    #[default]
    Passthrough,
    /// Guest uid/gid/mode/rdev live in the `user.containers.override_stat` xattr.
    Xattr,
}

/// What the guest may do to the host files of a share beyond ordinary reads and writes (see
/// the module docs, "Share policy").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharePolicy {
    /// The container's own root filesystem (a snapshot made for this container): setuid and
    /// setgid bits and `security.capability` are kept, as package managers install them.
    Rootfs,
    /// A host directory bind-mounted into the container: no setuid bit, no setgid bit on
    /// non-directories, no `security.capability`. The safe choice, hence the default.
    #[default]
    Volume,
}

/// Host fds one VM's shares may hold together: one per live inode (the roots excepted) and one
/// per open handle. Clones share the count; give every share of a VM the same budget.
/// Running out answers the guest `ENFILE`.
#[derive(Debug, Clone)]
pub struct FdBudget(Arc<BudgetInner>);

#[derive(Debug)]
struct BudgetInner {
    limit: usize,
    used: AtomicUsize,
}

/// Default [`FdBudget`] of a VM (all its shares together): 131 072 fds, about 130 MiB of host
/// kernel memory (file, dentry and inode) at worst. A guest keeps an inode referenced until its
/// own cache evicts it, so a build or `npm install` tree of tens of thousands of files must
/// still fit.
pub const DEFAULT_FD_BUDGET: usize = 1 << 17;

impl FdBudget {
    /// A budget of `limit` fds.
    pub fn new(limit: usize) -> FdBudget {
        FdBudget(Arc::new(BudgetInner {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// The most fds the budget allows.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Fds held now.
    pub fn in_use(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Takes one fd from the budget; `None` when it is spent. The token gives it back when
    /// dropped.
    pub(crate) fn take(&self) -> Option<FdToken> {
        self.0
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.0.limit).then_some(u + 1)
            })
            .ok()
            .map(|_| FdToken(self.clone()))
    }
}

impl Default for FdBudget {
    fn default() -> FdBudget {
        FdBudget::new(DEFAULT_FD_BUDGET)
    }
}

/// One fd taken from an [`FdBudget`], given back on drop.
#[derive(Debug)]
pub(crate) struct FdToken(FdBudget);

impl Drop for FdToken {
    fn drop(&mut self) {
        self.0 .0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared host directory.
    pub root: PathBuf,
    /// Refuse every change (`EROFS`).
    pub read_only: bool,
    /// Ownership scheme.
    pub ownership: Ownership,
    /// What the guest may do to host files (setuid, `security.capability`).
    pub policy: SharePolicy,
    /// Most live inodes (the root included).
    pub max_inodes: usize,
    /// Host fds for inodes and handles, shared by all shares of one VM.
    pub fd_budget: FdBudget,
}

/// Default [`Config::max_inodes`].
pub const DEFAULT_MAX_INODES: usize = 1 << 20;

impl Config {
    /// A writable passthrough [`SharePolicy::Volume`] share of `root` with default bounds and
    /// a budget of its own.
    pub fn new(root: impl Into<PathBuf>) -> Config {
        Config {
            root: root.into(),
            read_only: false,
            ownership: Ownership::Passthrough,
            policy: SharePolicy::default(),
            max_inodes: DEFAULT_MAX_INODES,
            fd_budget: FdBudget::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::new(PathBuf::new())
    }
}

/// Errors creating a [`Server`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory does not exist.
    #[error("shared directory {0} does not exist")]
    Missing(PathBuf),
    /// The shared path is not a directory.
    #[error("shared path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The shared directory could not be opened.
    #[error("cannot open shared directory {0}: {1}")]
    Open(PathBuf, std::io::Error),
    /// `/proc/self/fd` could not be opened (needed to reopen files safely).
    #[error("cannot open /proc/self/fd: {0}")]
    Proc(std::io::Error),
}

/// The FUSE server for one shared directory.
#[derive(Debug)]
pub struct Server {
    fs: Fs,
    initialized: AtomicBool,
}

/// Where a READ's data goes: called with the open file, the offset and the byte count; returns
/// how many bytes it placed (fewer only at end of file) or an errno.
pub type ReadSink<'a> = dyn FnMut(&std::os::fd::OwnedFd, u64, usize) -> Result<usize, i32> + 'a;

/// Reads `fd` from `off` straight into guest buffers until they are full or the file ends
/// (the zero-copy READ path); returns the bytes read or an errno.
pub fn pread_guest(
    fd: &std::os::fd::OwnedFd,
    bufs: &[vm_memory::VolatileSlice<'_>],
    off: u64,
) -> Result<usize, i32> {
    sys::pread_guest(fd, bufs, off).map_err(|e| e.0)
}

fn error_reply(unique: u64, err: i32) -> Vec<u8> {
    let mut w = Writer::new();
    w.u32(abi::OUT_HEADER_SIZE as u32).i32(-err).u64(unique);
    w.buf
}

impl Server {
    /// Opens the shared directory `cfg.root`.
    pub fn new(cfg: Config) -> Result<Server, Error> {
        Ok(Server {
            fs: Fs::new(cfg)?,
            initialized: AtomicBool::new(false),
        })
    }

    /// Drops the calling thread's capabilities to what serving this share needs (call it on
    /// each thread that handles requests, before the first one). Linux capabilities are per
    /// thread: `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` and `CAP_FOWNER` stay;
    /// `CAP_FSETID` and `CAP_SETFCAP` only for [`SharePolicy::Rootfs`]; everything else
    /// (`CAP_MKNOD`, `CAP_SYS_ADMIN` for `trusted.*`, `CAP_SYS_RESOURCE` for reserved blocks,
    /// ...) goes. Returns the effective set left, or `None` when the call failed (an
    /// unprivileged server has nothing to drop; that is not an error).
    pub fn limit_thread_capabilities(&self) -> Option<u64> {
        let rootfs = self.fs.policy() == SharePolicy::Rootfs;
        let keep = sys::KeepCaps {
            fsetid: rootfs,
            setfcap: rootfs,
        };
        match sys::limit_thread_caps(keep) {
            Ok(left) => Some(left),
            Err(e) => {
                tracing::debug!("virtio-fs: cannot limit thread capabilities: errno {}", e.0);
                None
            }
        }
    }

    /// Live inodes, the root included (for tests and metrics).
    pub fn inode_count(&self) -> usize {
        self.fs.inode_count()
    }

    /// Open file and directory handles (for tests and metrics).
    pub fn handle_count(&self) -> usize {
        self.fs.handle_count()
    }

    /// Handles one request.
    ///
    /// `req` is everything the guest put in the readable descriptors (`fuse_in_header`,
    /// arguments, write data); `max_out` is the total size of the writable descriptors.
    /// Returns the full reply (`fuse_out_header` + payload, whose `len` equals the returned
    /// length, at most `max_out`), or `None` for requests that get no reply (FORGET,
    /// BATCH_FORGET, INTERRUPT) and when `max_out` cannot even hold a reply header.
    ///
    /// FORGET and BATCH_FORGET are processed whatever `max_out` is (they come without
    /// writable descriptors); any other request with `max_out` below 16 is dropped unexecuted.
    pub fn handle(&self, req: &[u8], max_out: usize) -> Option<Vec<u8>> {
        let can_reply = max_out >= abi::OUT_HEADER_SIZE;
        let mut r = Reader::new(req);
        let h = match InHeader::parse(&mut r) {
            Ok(h) => h,
            Err(_) if !can_reply => return None,
            Err(_) => {
                let unique = req
                    .get(8..16)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0);
                return Some(error_reply(unique, errno::EINVAL));
            }
        };
        let no_reply = matches!(
            h.opcode,
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
        );
        if h.len as usize != req.len() {
            return (!no_reply && can_reply).then(|| error_reply(h.unique, errno::EINVAL));
        }
        tracing::trace!(
            opcode = h.opcode,
            unique = h.unique,
            nodeid = h.nodeid,
            len = h.len,
            "fuse request"
        );
        let init = self.initialized.load(Ordering::Acquire);
        if no_reply {
            if init {
                match h.opcode {
                    opcode::FORGET => self.fs.forget(&h, &mut r),
                    opcode::BATCH_FORGET => self.fs.batch_forget(&mut r),
                    _ => {}
                }
            }
            return None;
        }
        if !can_reply {
            return None;
        }
        if !init && h.opcode != opcode::INIT {
            return Some(error_reply(h.unique, errno::EIO));
        }
        let res = self.dispatch(&h, &mut r, max_out);
        let reply = match res {
            Ok(payload) => {
                let len = abi::OUT_HEADER_SIZE + payload.len();
                if len > max_out {
                    return Some(error_reply(h.unique, errno::ERANGE));
                }
                let mut w = Writer::new();
                w.u32(len as u32).i32(0).u64(h.unique).bytes(&payload);
                w.buf
            }
            Err(Errno(e)) => error_reply(h.unique, e),
        };
        Some(reply)
    }

    /// A READ answered without copying its data through the VMM's heap: `sink` places the
    /// data right after the reply header (the device reads the file straight into the guest's
    /// buffers). Returns the reply header, or a whole error reply, and the number of data bytes
    /// placed; `None` when `req` is not a well-formed READ of an initialized session (the
    /// caller then uses [`Server::handle`], which answers everything else).
    pub fn handle_read_direct(
        &self,
        req: &[u8],
        max_out: usize,
        sink: &mut ReadSink<'_>,
    ) -> Option<(Vec<u8>, usize)> {
        if max_out < abi::OUT_HEADER_SIZE || !self.initialized.load(Ordering::Acquire) {
            return None;
        }
        let mut r = Reader::new(req);
        let h = InHeader::parse(&mut r).ok()?;
        if h.opcode != opcode::READ || h.len as usize != req.len() {
            return None;
        }
        Some(match self.fs.read_with(&mut r, max_out, sink) {
            Ok(n) => {
                let mut w = Writer::new();
                w.u32((abi::OUT_HEADER_SIZE + n) as u32)
                    .i32(0)
                    .u64(h.unique);
                (w.buf, n)
            }
            Err(Errno(e)) => (error_reply(h.unique, e), 0),
        })
    }

    fn dispatch(&self, h: &InHeader, r: &mut Reader<'_>, max_out: usize) -> Result<Vec<u8>, Errno> {
        let fs = &self.fs;
        match h.opcode {
            opcode::INIT => {
                let (out, done) = fs.init(r)?;
                if done {
                    self.initialized.store(true, Ordering::Release);
                }
                Ok(out)
            }
            opcode::DESTROY => {
                self.initialized.store(false, Ordering::Release);
                fs.reset();
                Ok(Vec::new())
            }
            opcode::LOOKUP => fs.lookup(h, r),
            opcode::GETATTR => fs.getattr(h, r),
            opcode::SETATTR => fs.setattr(h, r),
            opcode::READLINK => fs.readlink(h),
            opcode::SYMLINK => fs.symlink(h, r),
            opcode::MKNOD => fs.mknod(h, r),
            opcode::MKDIR => fs.mkdir(h, r),
            opcode::UNLINK => fs.unlink(h, r, false),
            opcode::RMDIR => fs.unlink(h, r, true),
            opcode::RENAME => fs.rename(h, r, false),
            opcode::RENAME2 => fs.rename(h, r, true),
            opcode::LINK => fs.link(h, r),
            opcode::OPEN => fs.open(h, r),
            opcode::READ => fs.read(r, max_out),
            opcode::WRITE => fs.write(r),
            opcode::STATFS => fs.statfs(h),
            opcode::RELEASE => fs.release(r),
            opcode::FSYNC | opcode::FSYNCDIR => fs.fsync(r),
            opcode::SETXATTR => fs.setxattr(h, r),
            opcode::GETXATTR => fs.getxattr(h, r, max_out),
            opcode::LISTXATTR => fs.listxattr(h, r, max_out),
            opcode::REMOVEXATTR => fs.removexattr(h, r),
            opcode::FLUSH => fs.flush(r),
            opcode::OPENDIR => fs.opendir(h, r),
            opcode::READDIR => fs.readdir(r, max_out, false),
            opcode::READDIRPLUS => fs.readdir(r, max_out, true),
            opcode::RELEASEDIR => fs.releasedir(r),
            opcode::GETLK | opcode::SETLK | opcode::SETLKW => fs.lk(r, h.opcode),
            opcode::ACCESS => fs.access(h, r),
            opcode::CREATE => fs.create(h, r),
            opcode::FALLOCATE => fs.fallocate(r),
            opcode::LSEEK => fs.lseek(r),
            opcode::IOCTL => Err(Errno(errno::ENOTTY)),
            _ => Err(Errno(errno::ENOSYS)),
        }
    }
}
