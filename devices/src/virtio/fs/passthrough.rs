//! The filesystem logic: inode and handle tables, and one method per FUSE operation.
//!
//! Every method takes the parsed header and a [`Reader`] over its arguments and returns the
//! reply payload (without `fuse_out_header`) or a Linux errno. Arguments are parsed here, next
//! to their use; a short or malformed argument block is `EINVAL`.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::abi::{
    self, errno::*, fattr, mode::*, oflags, opcode, Attr, InHeader, Malformed, Reader, Writer,
    ROOT_ID,
};
use super::sys::{self, Errno, Fd, Stat, Time};
use super::{Config, FdToken, Ownership, SharePolicy};

/// Largest READ / WRITE payload.
pub const MAX_IO: usize = 1 << 20;
/// Largest READDIR / READDIRPLUS reply payload.
pub const MAX_READDIR: usize = 128 * 1024;
/// Largest xattr value or list.
pub const MAX_XATTR: usize = 64 * 1024;
/// Most open file and directory handles at once.
pub const MAX_HANDLES: usize = 1 << 16;
/// Entry and attribute cache timeout given to the guest (seconds).
const TIMEOUT: u64 = 1;
/// The xattr holding guest-visible ownership in [`Ownership::Xattr`] mode.
pub const OVERRIDE_XATTR: &str = "user.containers.override_stat";
const OVERRIDE_XATTR_C: &CStr = c"user.containers.override_stat";
/// The only xattr outside `user.*` a [`SharePolicy::Rootfs`] share passes through.
const SECURITY_CAPABILITY: &[u8] = b"security.capability";
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o010;
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;

impl From<Malformed> for Errno {
    fn from(_: Malformed) -> Errno {
        Errno(EINVAL)
    }
}

type Res = Result<Vec<u8>, Errno>;

/// An inode the guest knows: an `O_PATH` fd and its identity.
#[derive(Debug)]
pub(crate) struct Inode {
    fd: Fd,
    /// `S_IFMT` bits of the host inode (never changes).
    typ: u32,
    /// The fd's share of the VM's [`super::FdBudget`] (none for the root and for transient
    /// inodes that never enter the table).
    _budget: Option<FdToken>,
}

#[derive(Debug)]
struct InodeEntry {
    inode: Arc<Inode>,
    key: (u64, u64),
    refs: u64,
}

#[derive(Debug)]
struct InodeTable {
    by_id: HashMap<u64, InodeEntry>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

#[derive(Debug)]
enum HandleKind {
    File,
    /// Directory: seek + getdents must not interleave.
    Dir(Mutex<()>),
}

#[derive(Debug)]
struct Handle {
    fd: Fd,
    kind: HandleKind,
    _budget: FdToken,
}

/// Guest-visible ownership from the override xattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Override {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
}

impl Override {
    /// Parses `uid:gid:0MODE[:rdev]`.
    pub(crate) fn parse(b: &[u8]) -> Option<Override> {
        let s = std::str::from_utf8(b).ok()?;
        let s = s.trim_end_matches('\0');
        let mut it = s.split(':');
        let uid = it.next()?.parse().ok()?;
        let gid = it.next()?.parse().ok()?;
        let mode = u32::from_str_radix(it.next()?, 8).ok()?;
        let rdev = match it.next() {
            Some(r) => r.parse().ok()?,
            None => 0,
        };
        if it.next().is_some() {
            return None;
        }
        Some(Override {
            uid,
            gid,
            mode,
            rdev,
        })
    }

    pub(crate) fn encode(&self) -> String {
        if self.rdev != 0 {
            format!("{}:{}:0{:o}:{}", self.uid, self.gid, self.mode, self.rdev)
        } else {
            format!("{}:{}:0{:o}", self.uid, self.gid, self.mode)
        }
    }
}

/// The passthrough filesystem.
#[derive(Debug)]
pub(crate) struct Fs {
    cfg: Config,
    proc_fd: Fd,
    root: Arc<Inode>,
    root_key: (u64, u64),
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    euid: u32,
    egid: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the tables inconsistent in a way that
    // matters more than refusing service; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A guest name must be one path component: non-empty, not `.`/`..`, no `/` (NUL cannot occur:
/// the name ends at the first NUL), at most 255 bytes.
fn check_name(s: &[u8]) -> Result<(), Errno> {
    if s.is_empty() || s == b"." || s == b".." || s.contains(&b'/') {
        return Err(Errno(EINVAL));
    }
    if s.len() > NAME_MAX {
        return Err(Errno(ENAMETOOLONG));
    }
    Ok(())
}

/// Reads a guest name (validated) as an owned C string.
fn name_owned(r: &mut Reader<'_>) -> Result<CString, Errno> {
    let s = r.cstr()?;
    check_name(s)?;
    CString::new(s).map_err(|_| Errno(EINVAL))
}

/// Reads an xattr name (non-empty, at most 255 bytes).
fn xattr_name(r: &mut Reader<'_>) -> Result<CString, Errno> {
    let s = r.cstr()?;
    if s.is_empty() {
        return Err(Errno(EINVAL));
    }
    if s.len() > NAME_MAX {
        return Err(Errno(ERANGE));
    }
    CString::new(s).map_err(|_| Errno(EINVAL))
}

fn time_arg(set: bool, now: bool, sec: u64, nsec: u32) -> Time {
    if now {
        Time::Now
    } else if set {
        Time::Set(i64::try_from(sec).unwrap_or(i64::MAX), nsec)
    } else {
        Time::Omit
    }
}

impl Fs {
    pub(crate) fn new(cfg: Config) -> Result<Fs, super::Error> {
        let root_fd = sys::open_root(&cfg.root).map_err(|e| match e.0 {
            ENOENT => super::Error::Missing(cfg.root.clone()),
            ENOTDIR => super::Error::NotADirectory(cfg.root.clone()),
            _ => super::Error::Open(cfg.root.clone(), std::io::Error::from_raw_os_error(e.0)),
        })?;
        let st = sys::fstat(&root_fd).map_err(|e| {
            super::Error::Open(cfg.root.clone(), std::io::Error::from_raw_os_error(e.0))
        })?;
        if st.mode & S_IFMT != S_IFDIR {
            return Err(super::Error::NotADirectory(cfg.root.clone()));
        }
        let proc_fd = sys::open_proc_self_fd()
            .map_err(|e| super::Error::Proc(std::io::Error::from_raw_os_error(e.0)))?;
        let root = Arc::new(Inode {
            fd: root_fd,
            typ: S_IFDIR,
            _budget: None,
        });
        let root_key = (st.dev, st.ino);
        let fs = Fs {
            cfg,
            proc_fd,
            root,
            root_key,
            inodes: Mutex::new(InodeTable {
                by_id: HashMap::new(),
                by_key: HashMap::new(),
                next: ROOT_ID + 1,
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            euid: sys::geteuid(),
            egid: sys::getegid(),
        };
        fs.reset();
        Ok(fs)
    }

    /// Drops every inode but the root and every handle (INIT after DESTROY starts afresh).
    pub(crate) fn reset(&self) {
        let mut t = lock(&self.inodes);
        t.by_id.clear();
        t.by_key.clear();
        t.by_id.insert(
            ROOT_ID,
            InodeEntry {
                inode: self.root.clone(),
                key: self.root_key,
                refs: 1,
            },
        );
        t.by_key.insert(self.root_key, ROOT_ID);
        drop(t);
        lock(&self.handles).clear();
    }

    /// Live inodes (including the root).
    pub(crate) fn inode_count(&self) -> usize {
        lock(&self.inodes).by_id.len()
    }

    /// Open handles.
    pub(crate) fn handle_count(&self) -> usize {
        lock(&self.handles).len()
    }

    /// The share's policy.
    pub(crate) fn policy(&self) -> SharePolicy {
        self.cfg.policy
    }

    /// The permission bits of a mode the guest sets, after the share policy: a
    /// [`SharePolicy::Volume`] gets no setuid bit and no setgid bit on non-directories.
    fn allowed_mode(&self, mode: u32, dir: bool) -> u32 {
        let m = mode & 0o7777;
        match self.cfg.policy {
            SharePolicy::Rootfs => m,
            SharePolicy::Volume if dir => m & !S_ISUID,
            SharePolicy::Volume => m & !(S_ISUID | S_ISGID),
        }
    }

    /// Whether the guest may see and change the xattr `name`: `user.*` but the ownership
    /// xattr, and `security.capability` on a [`SharePolicy::Rootfs`] share. `trusted.*`,
    /// other `security.*` and `system.*` (POSIX ACLs) act on the host's kernel and users, not
    /// just on file contents.
    fn xattr_allowed(&self, name: &[u8]) -> bool {
        if name == OVERRIDE_XATTR.as_bytes() {
            return false;
        }
        name.starts_with(b"user.")
            || (self.cfg.policy == SharePolicy::Rootfs && name == SECURITY_CAPABILITY)
    }

    /// FUSE's "kill suid/sgid" (`HANDLE_KILLPRIV_V2`): clears the setuid bit, and the setgid
    /// bit when group-executable, of the non-directory `fd` (in the override xattr when it has
    /// one). The server may hold `CAP_FSETID`, so the host kernel does not do it by itself.
    fn kill_suidgid(&self, fd: &Fd) -> Result<(), Errno> {
        let st = sys::fstat(fd)?;
        let typ = st.mode & S_IFMT;
        if typ == S_IFDIR || typ == S_IFLNK {
            return Ok(());
        }
        let killed = |m: u32| {
            let mut k = m & !S_ISUID;
            if m & (S_ISGID | S_IXGRP) == S_ISGID | S_IXGRP {
                k &= !S_ISGID;
            }
            k
        };
        if let Some(mut o) = self.read_override(fd, typ) {
            let m = killed(o.mode);
            if m != o.mode {
                o.mode = m;
                self.write_override(fd, &o)?;
            }
            return Ok(());
        }
        let m = killed(st.mode);
        if m != st.mode {
            sys::chmod_fd(&self.proc_fd, fd, m & 0o7777)?;
        }
        Ok(())
    }

    fn inode(&self, id: u64) -> Result<Arc<Inode>, Errno> {
        lock(&self.inodes)
            .by_id
            .get(&id)
            .map(|e| e.inode.clone())
            .ok_or(Errno(ENOENT))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh).cloned().ok_or(Errno(EBADF))
    }

    fn file_handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        let h = self.handle(fh)?;
        match h.kind {
            HandleKind::File => Ok(h),
            HandleKind::Dir(_) => Err(Errno(EISDIR)),
        }
    }

    fn add_handle(&self, fd: Fd, kind: HandleKind) -> Result<u64, Errno> {
        let mut hs = lock(&self.handles);
        if hs.len() >= MAX_HANDLES {
            return Err(Errno(EMFILE));
        }
        let budget = self.cfg.fd_budget.take().ok_or(Errno(ENFILE))?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        hs.insert(
            fh,
            Arc::new(Handle {
                fd,
                kind,
                _budget: budget,
            }),
        );
        Ok(fh)
    }

    /// Adds (or re-references) the inode `fd` with stat `st`; returns its node id.
    fn insert(&self, fd: Fd, st: &Stat) -> Result<u64, Errno> {
        let key = (st.dev, st.ino);
        let mut t = lock(&self.inodes);
        if let Some(&id) = t.by_key.get(&key) {
            if let Some(e) = t.by_id.get_mut(&id) {
                e.refs = e.refs.saturating_add(1);
                return Ok(id);
            }
        }
        if t.by_id.len() >= self.cfg.max_inodes.max(1) {
            return Err(Errno(ENFILE));
        }
        let budget = self.cfg.fd_budget.take().ok_or(Errno(ENFILE))?;
        let id = t.next;
        t.next += 1;
        t.by_id.insert(
            id,
            InodeEntry {
                inode: Arc::new(Inode {
                    fd,
                    typ: st.mode & S_IFMT,
                    _budget: Some(budget),
                }),
                key,
                refs: 1,
            },
        );
        t.by_key.insert(key, id);
        Ok(id)
    }

    pub(crate) fn forget_one(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut t = lock(&self.inodes);
        let remove = match t.by_id.get_mut(&id) {
            Some(e) => {
                e.refs = e.refs.saturating_sub(n);
                e.refs == 0
            }
            None => false,
        };
        if remove {
            if let Some(e) = t.by_id.remove(&id) {
                if t.by_key.get(&e.key) == Some(&id) {
                    t.by_key.remove(&e.key);
                }
            }
        }
    }

    fn read_override(&self, fd: &Fd, typ: u32) -> Option<Override> {
        if self.cfg.ownership != Ownership::Xattr || typ == S_IFLNK {
            return None;
        }
        let mut buf = [0u8; 64];
        let n = sys::getxattr(fd, OVERRIDE_XATTR_C, &mut buf).ok()?;
        Override::parse(buf.get(..n)?)
    }

    fn write_override(&self, fd: &Fd, o: &Override) -> Result<(), Errno> {
        sys::setxattr(fd, OVERRIDE_XATTR_C, o.encode().as_bytes(), 0)
    }

    fn attr_of(&self, fd: &Fd, st: &Stat) -> Attr {
        let mut a = Attr {
            ino: st.ino,
            size: st.size,
            blocks: st.blocks,
            atime: st.atime as u64,
            mtime: st.mtime as u64,
            ctime: st.ctime as u64,
            atimensec: st.atime_nsec,
            mtimensec: st.mtime_nsec,
            ctimensec: st.ctime_nsec,
            mode: st.mode,
            nlink: u32::try_from(st.nlink).unwrap_or(u32::MAX),
            uid: st.uid,
            gid: st.gid,
            rdev: u32::try_from(st.rdev).unwrap_or(0),
            blksize: u32::try_from(st.blksize).unwrap_or(4096),
        };
        let host_typ = st.mode & S_IFMT;
        if let Some(o) = self.read_override(fd, host_typ) {
            a.uid = o.uid;
            a.gid = o.gid;
            let otyp = o.mode & S_IFMT;
            // Only a host regular file may pretend to be a special file; directories stay
            // directories, and nothing may pretend to be a directory or symlink.
            let typ = if host_typ == S_IFREG
                && matches!(otyp, S_IFREG | S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK)
            {
                otyp
            } else {
                host_typ
            };
            a.mode = typ | (o.mode & 0o7777);
            a.rdev = if typ == S_IFCHR || typ == S_IFBLK {
                u32::try_from(o.rdev).unwrap_or(0)
            } else {
                0
            };
        } else if self.cfg.ownership == Ownership::Xattr {
            // No override: what the VMM's user owns on the host belongs to root in the guest
            // (as in a rootless user namespace), so an image unpacked by an unprivileged user
            // looks like it belongs to root.
            if a.uid == self.euid {
                a.uid = 0;
            }
            if a.gid == self.egid {
                a.gid = 0;
            }
        }
        a
    }

    fn attr(&self, inode: &Inode) -> Result<Attr, Errno> {
        let st = sys::fstat(&inode.fd)?;
        Ok(self.attr_of(&inode.fd, &st))
    }

    /// Looks `name` up in `dir` and returns its (referenced) node id and attributes.
    fn lookup_in(&self, dir: &Fd, name: &CStr) -> Result<(u64, Attr), Errno> {
        let fd = sys::lookup_at(dir, name)?;
        let st = sys::fstat(&fd)?;
        let attr = self.attr_of(&fd, &st);
        let id = self.insert(fd, &st)?;
        Ok((id, attr))
    }

    fn entry_reply(&self, id: u64, attr: &Attr) -> Vec<u8> {
        let mut w = Writer::new();
        abi::encode_entry(&mut w, id, attr, TIMEOUT);
        w.buf
    }

    fn ro(&self) -> Result<(), Errno> {
        if self.cfg.read_only {
            Err(Errno(EROFS))
        } else {
            Ok(())
        }
    }

    /// Gives a freshly created node its owner and exact mode (the process umask must not
    /// apply), or records both in the override xattr.
    fn settle_new(&self, fd: &Fd, h: &InHeader, guest_mode: u32, rdev: u64) -> Result<(), Errno> {
        let st = sys::fstat(fd)?;
        let typ = st.mode & S_IFMT;
        match self.cfg.ownership {
            Ownership::Passthrough => {
                if self.euid == 0 {
                    sys::chown_fd(fd, Some(h.uid), Some(h.gid))?;
                }
                if typ != S_IFLNK {
                    sys::chmod_fd(&self.proc_fd, fd, guest_mode & 0o7777)?;
                }
            }
            Ownership::Xattr => {
                if typ != S_IFLNK {
                    let o = Override {
                        uid: h.uid,
                        gid: h.gid,
                        mode: guest_mode,
                        rdev,
                    };
                    self.write_override(fd, &o)?;
                }
            }
        }
        Ok(())
    }

    /// Host permission bits for a guest mode in xattr mode: the host user keeps rw (rwx for
    /// directories) so it can always manage the files.
    fn host_mode_xattr(guest_mode: u32, dir: bool) -> u32 {
        let owner = if dir { 0o700 } else { 0o600 };
        (guest_mode & 0o777) | owner
    }

    // ---- operations ----

    /// INIT; the flag says whether the session is now initialized (false when the guest's
    /// major is newer and it must retry with ours).
    pub(crate) fn init(&self, r: &mut Reader<'_>) -> Result<(Vec<u8>, bool), Errno> {
        let major = r.u32()?;
        let minor = r.u32()?;
        let max_readahead = r.u32()?;
        let flags = r.u32()?;
        let mut w = Writer::new();
        if major < abi::KERNEL_VERSION {
            return Err(Errno(EINVAL));
        }
        if major > abi::KERNEL_VERSION {
            // The kernel re-sends INIT with our major.
            w.u32(abi::KERNEL_VERSION).u32(abi::KERNEL_MINOR_VERSION);
            w.bytes(&[0u8; 56]);
            return Ok((w.buf, false));
        }
        let out_flags = flags & abi::init_flags::SUPPORTED;
        w.u32(abi::KERNEL_VERSION)
            .u32(abi::KERNEL_MINOR_VERSION)
            .u32(max_readahead)
            .u32(out_flags)
            .u16(16) // max_background
            .u16(12) // congestion_threshold
            .u32(MAX_IO as u32) // max_write
            .u32(1) // time_gran (ns)
            .u16(256) // max_pages
            .u16(0) // map_alignment
            .u32(0) // flags2
            .u32(0) // max_stack_depth
            .bytes(&[0u8; 24]);
        if minor < 23 {
            w.buf.truncate(24);
        }
        Ok((w.buf, true))
    }

    pub(crate) fn lookup(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let name = name_owned(r)?;
        let dir = self.inode(h.nodeid)?;
        let (id, attr) = self.lookup_in(&dir.fd, &name)?;
        Ok(self.entry_reply(id, &attr))
    }

    pub(crate) fn forget(&self, h: &InHeader, r: &mut Reader<'_>) {
        if let Ok(n) = r.u64() {
            self.forget_one(h.nodeid, n);
        }
    }

    pub(crate) fn batch_forget(&self, r: &mut Reader<'_>) {
        let Ok(count) = r.u32() else { return };
        if r.u32().is_err() {
            return;
        }
        for _ in 0..count {
            let (Ok(id), Ok(n)) = (r.u64(), r.u64()) else {
                return;
            };
            self.forget_one(id, n);
        }
    }

    pub(crate) fn getattr(&self, h: &InHeader, _r: &mut Reader<'_>) -> Res {
        let inode = self.inode(h.nodeid)?;
        let attr = self.attr(&inode)?;
        let mut w = Writer::new();
        abi::encode_attr_out(&mut w, &attr, TIMEOUT);
        Ok(w.buf)
    }

    pub(crate) fn setattr(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let valid = r.u32()?;
        r.u32()?;
        let fh = r.u64()?;
        let size = r.u64()?;
        let _lock_owner = r.u64()?;
        let atime = r.u64()?;
        let mtime = r.u64()?;
        let _ctime = r.u64()?;
        let atimensec = r.u32()?;
        let mtimensec = r.u32()?;
        let _ctimensec = r.u32()?;
        let mode = r.u32()?;
        r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        r.u32()?;
        self.ro()?;
        let inode = self.inode(h.nodeid)?;
        let is_link = inode.typ == S_IFLNK;

        if valid & (fattr::MODE | fattr::UID | fattr::GID) != 0 {
            let uid = (valid & fattr::UID != 0).then_some(uid);
            let gid = (valid & fattr::GID != 0).then_some(gid);
            let mode =
                (valid & fattr::MODE != 0).then(|| self.allowed_mode(mode, inode.typ == S_IFDIR));
            match self.cfg.ownership {
                Ownership::Passthrough => {
                    if uid.is_some() || gid.is_some() {
                        sys::chown_fd(&inode.fd, uid, gid)?;
                    }
                    if let Some(m) = mode {
                        if is_link {
                            return Err(Errno(EOPNOTSUPP));
                        }
                        sys::chmod_fd(&self.proc_fd, &inode.fd, m & 0o7777)?;
                    }
                }
                Ownership::Xattr if is_link => {
                    // user.* xattrs cannot live on symlinks: symlinks keep host values.
                }
                Ownership::Xattr => {
                    let cur = self.attr(&inode)?;
                    let mut o = self
                        .read_override(&inode.fd, inode.typ)
                        .unwrap_or(Override {
                            uid: cur.uid,
                            gid: cur.gid,
                            mode: cur.mode,
                            rdev: u64::from(cur.rdev),
                        });
                    if let Some(u) = uid {
                        o.uid = u;
                    }
                    if let Some(g) = gid {
                        o.gid = g;
                    }
                    if let Some(m) = mode {
                        o.mode = (o.mode & S_IFMT) | (m & 0o7777);
                        let hm = Self::host_mode_xattr(m, inode.typ == S_IFDIR);
                        sys::chmod_fd(&self.proc_fd, &inode.fd, hm)?;
                    }
                    self.write_override(&inode.fd, &o)?;
                }
            }
        }

        if valid & fattr::SIZE != 0 {
            let by_fh = if valid & fattr::FH != 0 {
                Some(self.file_handle(fh)?)
            } else {
                None
            };
            match by_fh {
                Some(hd) => sys::truncate(&hd.fd, size)?,
                None => {
                    if inode.typ == S_IFDIR {
                        return Err(Errno(EISDIR));
                    }
                    if inode.typ != S_IFREG {
                        return Err(Errno(EINVAL));
                    }
                    let fd = sys::reopen(&self.proc_fd, &inode.fd, oflags::WRONLY)?;
                    sys::truncate(&fd, size)?;
                }
            }
        }

        if valid & fattr::KILL_SUIDGID != 0 {
            self.kill_suidgid(&inode.fd)?;
        }

        if valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            let at = time_arg(
                valid & fattr::ATIME != 0,
                valid & fattr::ATIME_NOW != 0,
                atime,
                atimensec,
            );
            let mt = time_arg(
                valid & fattr::MTIME != 0,
                valid & fattr::MTIME_NOW != 0,
                mtime,
                mtimensec,
            );
            sys::utimens(&self.proc_fd, &inode.fd, is_link, at, mt)?;
        }

        let attr = self.attr(&inode)?;
        let mut w = Writer::new();
        abi::encode_attr_out(&mut w, &attr, TIMEOUT);
        Ok(w.buf)
    }

    pub(crate) fn readlink(&self, h: &InHeader) -> Res {
        let inode = self.inode(h.nodeid)?;
        if inode.typ != S_IFLNK {
            return Err(Errno(EINVAL));
        }
        sys::readlink(&inode.fd)
    }

    pub(crate) fn symlink(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let name = name_owned(r)?;
        let target = r.cstr()?;
        if target.is_empty() {
            return Err(Errno(ENOENT));
        }
        if target.len() >= PATH_MAX {
            return Err(Errno(ENAMETOOLONG));
        }
        let target = CString::new(target).map_err(|_| Errno(EINVAL))?;
        self.ro()?;
        let dir = self.inode(h.nodeid)?;
        sys::symlink_at(&target, &dir.fd, &name)?;
        self.finish_create(h, &dir.fd, &name, S_IFLNK | 0o777, 0)
    }

    /// Looks up a node just created as `name` and settles its ownership.
    fn finish_create(&self, h: &InHeader, dir: &Fd, name: &CStr, mode: u32, rdev: u64) -> Res {
        let fd = sys::lookup_at(dir, name)?;
        self.settle_new(&fd, h, mode, rdev)?;
        let st = sys::fstat(&fd)?;
        let attr = self.attr_of(&fd, &st);
        let id = self.insert(fd, &st)?;
        Ok(self.entry_reply(id, &attr))
    }

    pub(crate) fn mknod(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let mode = r.u32()?;
        let rdev = r.u32()?;
        let _umask = r.u32()?;
        r.u32()?;
        let name = name_owned(r)?;
        self.ro()?;
        let typ = match mode & S_IFMT {
            0 => S_IFREG,
            t @ (S_IFREG | S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK) => t,
            _ => return Err(Errno(EINVAL)),
        };
        let mode = typ | self.allowed_mode(mode, false);
        let dir = self.inode(h.nodeid)?;
        match self.cfg.ownership {
            // A host device node would give whoever can open it on the host (or in another
            // guest sharing the directory) the device itself. Only the overlayfs whiteout
            // (char 0:0, which opens nothing) is allowed.
            Ownership::Passthrough if (typ == S_IFCHR && rdev != 0) || typ == S_IFBLK => {
                Err(Errno(EPERM))
            }
            Ownership::Passthrough => {
                sys::mknod_at(&dir.fd, &name, mode, u64::from(rdev))?;
                self.finish_create(h, &dir.fd, &name, mode, u64::from(rdev))
            }
            Ownership::Xattr => {
                // Special files are regular 0600 host files; type and rdev live in the xattr.
                let host = S_IFREG | Self::host_mode_xattr(mode, false);
                let host = if typ == S_IFREG {
                    host
                } else {
                    S_IFREG | 0o600
                };
                sys::mknod_at(&dir.fd, &name, host, 0)?;
                let rdev = if typ == S_IFCHR || typ == S_IFBLK {
                    u64::from(rdev)
                } else {
                    0
                };
                self.finish_create(h, &dir.fd, &name, mode, rdev)
            }
        }
    }

    pub(crate) fn mkdir(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let mode = r.u32()?;
        let _umask = r.u32()?;
        let name = name_owned(r)?;
        self.ro()?;
        let dir = self.inode(h.nodeid)?;
        let mode = self.allowed_mode(mode, true);
        let guest_mode = S_IFDIR | mode;
        let host = match self.cfg.ownership {
            Ownership::Passthrough => mode,
            Ownership::Xattr => Self::host_mode_xattr(mode, true),
        };
        sys::mkdir_at(&dir.fd, &name, host)?;
        self.finish_create(h, &dir.fd, &name, guest_mode, 0)
    }

    pub(crate) fn unlink(&self, h: &InHeader, r: &mut Reader<'_>, is_dir: bool) -> Res {
        let name = name_owned(r)?;
        self.ro()?;
        let dir = self.inode(h.nodeid)?;
        sys::unlink_at(&dir.fd, &name, is_dir)?;
        Ok(Vec::new())
    }

    pub(crate) fn rename(&self, h: &InHeader, r: &mut Reader<'_>, v2: bool) -> Res {
        let newdir = r.u64()?;
        let flags = if v2 {
            let f = r.u32()?;
            r.u32()?;
            f
        } else {
            0
        };
        let oldname = name_owned(r)?;
        let newname = name_owned(r)?;
        if flags & !(abi::rename_flags::NOREPLACE | abi::rename_flags::EXCHANGE) != 0 {
            return Err(Errno(EINVAL));
        }
        self.ro()?;
        let od = self.inode(h.nodeid)?;
        let nd = self.inode(newdir)?;
        sys::rename_at(&od.fd, &oldname, &nd.fd, &newname, flags)?;
        Ok(Vec::new())
    }

    pub(crate) fn link(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let old = r.u64()?;
        let name = name_owned(r)?;
        self.ro()?;
        let target = self.inode(old)?;
        if target.typ == S_IFDIR {
            return Err(Errno(EPERM));
        }
        let dir = self.inode(h.nodeid)?;
        sys::link_at(&self.proc_fd, &target.fd, &dir.fd, &name)?;
        let (id, attr) = self.lookup_in(&dir.fd, &name)?;
        Ok(self.entry_reply(id, &attr))
    }

    fn open_reply(fh: u64) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(fh).u32(0).u32(0);
        w.buf
    }

    fn check_open_flags(&self, flags: u32) -> Result<u32, Errno> {
        let acc = flags & oflags::ACCMODE;
        if acc == oflags::ACCMODE {
            return Err(Errno(EINVAL));
        }
        if self.cfg.read_only
            && (acc != oflags::RDONLY || flags & (oflags::TRUNC | oflags::APPEND) != 0)
        {
            return Err(Errno(EROFS));
        }
        Ok(flags & oflags::PASSED)
    }

    /// Reopens the regular-file inode for I/O: never a symlink, never a device or FIFO.
    fn open_inode(&self, inode: &Inode, flags: u32) -> Result<Fd, Errno> {
        match inode.typ {
            S_IFREG => sys::reopen(&self.proc_fd, &inode.fd, flags),
            S_IFDIR => Err(Errno(EISDIR)),
            S_IFLNK => Err(Errno(ELOOP)),
            _ => Err(Errno(ENXIO)),
        }
    }

    /// OPEN/CREATE truncating a file for a caller without `CAP_FSETID` (the guest kernel
    /// then sets `FUSE_OPEN_KILL_SUIDGID`).
    fn kills_on_open(flags: u32, open_flags: u32) -> bool {
        flags & oflags::TRUNC != 0 && open_flags & abi::OPEN_KILL_SUIDGID != 0
    }

    pub(crate) fn open(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let guest_flags = r.u32()?;
        let open_flags = r.u32()?;
        let flags = self.check_open_flags(guest_flags)?;
        let inode = self.inode(h.nodeid)?;
        let fd = self.open_inode(&inode, flags)?;
        if Self::kills_on_open(guest_flags, open_flags) {
            self.kill_suidgid(&fd)?;
        }
        let fh = self.add_handle(fd, HandleKind::File)?;
        Ok(Self::open_reply(fh))
    }

    pub(crate) fn create(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let flags = r.u32()?;
        let mode = r.u32()?;
        let _umask = r.u32()?;
        let open_flags = r.u32()?;
        let name = name_owned(r)?;
        self.ro()?;
        let pflags = self.check_open_flags(flags)?;
        let dir = self.inode(h.nodeid)?;
        let mode = self.allowed_mode(mode, false);
        let guest_mode = S_IFREG | mode;
        let host = match self.cfg.ownership {
            Ownership::Passthrough => mode,
            Ownership::Xattr => Self::host_mode_xattr(mode, false),
        };
        let (fd, created) = match sys::create_at(&dir.fd, &name, pflags, host) {
            Ok(fd) => (fd, true),
            Err(Errno(EEXIST)) if flags & oflags::EXCL == 0 => {
                let p = sys::lookup_at(&dir.fd, &name)?;
                let st = sys::fstat(&p)?;
                let inode = Inode {
                    fd: p,
                    typ: st.mode & S_IFMT,
                    _budget: None,
                };
                (self.open_inode(&inode, pflags)?, false)
            }
            Err(e) => return Err(e),
        };
        let pfd = sys::path_fd(&self.proc_fd, &fd)?;
        if created {
            self.settle_new(&pfd, h, guest_mode, 0)?;
        } else if Self::kills_on_open(flags, open_flags) {
            self.kill_suidgid(&pfd)?;
        }
        let st = sys::fstat(&pfd)?;
        let attr = self.attr_of(&pfd, &st);
        let id = self.insert(pfd, &st)?;
        let fh = match self.add_handle(fd, HandleKind::File) {
            Ok(fh) => fh,
            Err(e) => {
                self.forget_one(id, 1);
                return Err(e);
            }
        };
        let mut out = self.entry_reply(id, &attr);
        out.extend_from_slice(&Self::open_reply(fh));
        Ok(out)
    }

    pub(crate) fn read(&self, r: &mut Reader<'_>, max_out: usize) -> Res {
        let mut buf = Vec::new();
        self.read_with(r, max_out, &mut |fd, offset, n| {
            buf = vec![0u8; n];
            let got = sys::pread(fd, &mut buf, offset).map_err(|e| e.0)?;
            buf.truncate(got);
            Ok(got)
        })?;
        Ok(buf)
    }

    /// READ with the data placed by `sink(file, offset, count)` (count already capped at
    /// [`MAX_IO`] and at the reply room), which returns how many bytes it placed: fewer than
    /// asked only at end of file.
    pub(crate) fn read_with(
        &self,
        r: &mut Reader<'_>,
        max_out: usize,
        sink: &mut super::ReadSink<'_>,
    ) -> Result<usize, Errno> {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()? as usize;
        let hd = self.file_handle(fh)?;
        let n = size
            .min(MAX_IO)
            .min(max_out.saturating_sub(abi::OUT_HEADER_SIZE));
        sink(&hd.fd, offset, n).map_err(Errno)
    }

    pub(crate) fn write(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()? as usize;
        let write_flags = r.u32()?;
        let _lock_owner = r.u64()?;
        let _flags = r.u32()?;
        r.u32()?;
        if size > MAX_IO {
            return Err(Errno(EINVAL));
        }
        let data = r.take(size)?;
        self.ro()?;
        let hd = self.file_handle(fh)?;
        // Before the data lands, as the VFS does: nobody may run the changed file setuid.
        if write_flags & abi::WRITE_KILL_SUIDGID != 0 {
            self.kill_suidgid(&hd.fd)?;
        }
        let n = sys::pwrite(&hd.fd, data, offset)?;
        let mut w = Writer::new();
        w.u32(u32::try_from(n).unwrap_or(0)).u32(0);
        Ok(w.buf)
    }

    pub(crate) fn statfs(&self, h: &InHeader) -> Res {
        let inode = self.inode(h.nodeid)?;
        let s = sys::statfs(&inode.fd)?;
        let mut w = Writer::new();
        w.u64(s.blocks)
            .u64(s.bfree)
            .u64(s.bavail)
            .u64(s.files)
            .u64(s.ffree)
            .u32(u32::try_from(s.bsize).unwrap_or(4096))
            .u32(u32::try_from(s.namelen).unwrap_or(255))
            .u32(u32::try_from(s.frsize).unwrap_or(4096))
            .u32(0)
            .bytes(&[0u8; 24]);
        Ok(w.buf)
    }

    pub(crate) fn release(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        lock(&self.handles).remove(&fh).ok_or(Errno(EBADF))?;
        Ok(Vec::new())
    }

    pub(crate) fn flush(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        self.handle(fh)?;
        Ok(Vec::new())
    }

    pub(crate) fn fsync(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        let flags = r.u32()?;
        let hd = self.handle(fh)?;
        sys::fsync(&hd.fd, flags & abi::FSYNC_FDATASYNC != 0)?;
        Ok(Vec::new())
    }

    pub(crate) fn opendir(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let _flags = r.u32()?;
        let inode = self.inode(h.nodeid)?;
        if inode.typ != S_IFDIR {
            return Err(Errno(ENOTDIR));
        }
        let fd = sys::open_dir(&inode.fd)?;
        let fh = self.add_handle(fd, HandleKind::Dir(Mutex::new(())))?;
        Ok(Self::open_reply(fh))
    }

    pub(crate) fn readdir(&self, r: &mut Reader<'_>, max_out: usize, plus: bool) -> Res {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()? as usize;
        let hd = self.handle(fh)?;
        let HandleKind::Dir(m) = &hd.kind else {
            return Err(Errno(ENOTDIR));
        };
        let cap = size
            .min(MAX_READDIR)
            .min(max_out.saturating_sub(abi::OUT_HEADER_SIZE));
        let _g = lock(m);
        let mut w = Writer::new();
        sys::read_dir(&hd.fd, offset, |de| {
            let need = abi::dirent_size(de.name.len()) + if plus { abi::ENTRY_OUT_SIZE } else { 0 };
            if w.buf.len() + need > cap {
                return Ok(false);
            }
            if plus {
                let dot = de.name == b"." || de.name == b"..";
                let looked = if dot {
                    None
                } else {
                    CString::new(de.name)
                        .ok()
                        .and_then(|n| self.lookup_in(&hd.fd, &n).ok())
                };
                match looked {
                    Some((id, attr)) => abi::encode_entry(&mut w, id, &attr, TIMEOUT),
                    None => {
                        let attr = Attr {
                            ino: de.ino,
                            mode: de.typ << 12,
                            ..Attr::default()
                        };
                        abi::encode_entry(&mut w, 0, &attr, 0)
                    }
                }
            }
            abi::encode_dirent(&mut w, de.ino, de.next, de.typ, de.name);
            Ok(true)
        })?;
        Ok(w.buf)
    }

    pub(crate) fn releasedir(&self, r: &mut Reader<'_>) -> Res {
        self.release(r)
    }

    pub(crate) fn access(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let mask = r.u32()? & 7;
        let inode = self.inode(h.nodeid)?;
        let a = self.attr(&inode)?;
        if mask == 0 {
            return Ok(Vec::new());
        }
        let typ = a.mode & S_IFMT;
        if mask & 2 != 0 && self.cfg.read_only && matches!(typ, S_IFREG | S_IFDIR | S_IFLNK) {
            return Err(Errno(EROFS));
        }
        if h.uid == 0 {
            if mask & 1 != 0 && typ != S_IFDIR && a.mode & 0o111 == 0 {
                return Err(Errno(EACCES));
            }
            return Ok(Vec::new());
        }
        let bits = if h.uid == a.uid {
            (a.mode >> 6) & 7
        } else if h.gid == a.gid {
            (a.mode >> 3) & 7
        } else {
            a.mode & 7
        };
        if bits & mask == mask {
            Ok(Vec::new())
        } else {
            Err(Errno(EACCES))
        }
    }

    pub(crate) fn setxattr(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let size = r.u32()? as usize;
        let flags = r.u32()?;
        let name = xattr_name(r)?;
        if size > MAX_XATTR {
            return Err(Errno(E2BIG));
        }
        let value = r.take(size)?;
        self.ro()?;
        if !self.xattr_allowed(name.to_bytes()) {
            return Err(Errno(EPERM));
        }
        if flags & !3 != 0 {
            return Err(Errno(EINVAL));
        }
        let inode = self.inode(h.nodeid)?;
        if inode.typ == S_IFLNK {
            return Err(Errno(EPERM));
        }
        sys::setxattr(&inode.fd, &name, value, flags)?;
        Ok(Vec::new())
    }

    pub(crate) fn getxattr(&self, h: &InHeader, r: &mut Reader<'_>, max_out: usize) -> Res {
        let size = r.u32()? as usize;
        r.u32()?;
        let name = xattr_name(r)?;
        if !self.xattr_allowed(name.to_bytes()) {
            return Err(Errno(ENODATA));
        }
        let inode = self.inode(h.nodeid)?;
        if inode.typ == S_IFLNK {
            return Err(Errno(ENODATA));
        }
        if size == 0 {
            let n = sys::getxattr(&inode.fd, &name, &mut [])?;
            if n > MAX_XATTR {
                return Err(Errno(E2BIG));
            }
            let mut w = Writer::new();
            w.u32(u32::try_from(n.min(MAX_XATTR)).unwrap_or(0)).u32(0);
            return Ok(w.buf);
        }
        let cap = size.min(MAX_XATTR);
        let mut buf = vec![0u8; cap];
        let n = sys::getxattr(&inode.fd, &name, &mut buf)?;
        if n > max_out.saturating_sub(abi::OUT_HEADER_SIZE) {
            return Err(Errno(ERANGE));
        }
        buf.truncate(n);
        Ok(buf)
    }

    pub(crate) fn listxattr(&self, h: &InHeader, r: &mut Reader<'_>, max_out: usize) -> Res {
        let size = r.u32()? as usize;
        r.u32()?;
        let inode = self.inode(h.nodeid)?;
        let list = if inode.typ == S_IFLNK {
            Vec::new()
        } else {
            let mut buf = vec![0u8; MAX_XATTR];
            let n = match sys::listxattr(&inode.fd, &mut buf) {
                Err(Errno(ERANGE)) => return Err(Errno(E2BIG)),
                r => r?,
            };
            buf.truncate(n);
            let mut out = Vec::with_capacity(n);
            for name in buf.split_inclusive(|&b| b == 0) {
                let bare = name.strip_suffix(b"\0").unwrap_or(name);
                if bare.is_empty() {
                    continue;
                }
                if !self.xattr_allowed(bare) {
                    continue;
                }
                out.extend_from_slice(bare);
                out.push(0);
            }
            out
        };
        if size == 0 {
            let mut w = Writer::new();
            w.u32(u32::try_from(list.len()).unwrap_or(0)).u32(0);
            return Ok(w.buf);
        }
        if list.len() > size || list.len() > max_out.saturating_sub(abi::OUT_HEADER_SIZE) {
            return Err(Errno(ERANGE));
        }
        Ok(list)
    }

    pub(crate) fn removexattr(&self, h: &InHeader, r: &mut Reader<'_>) -> Res {
        let name = xattr_name(r)?;
        self.ro()?;
        if !self.xattr_allowed(name.to_bytes()) {
            return Err(Errno(EPERM));
        }
        let inode = self.inode(h.nodeid)?;
        if inode.typ == S_IFLNK {
            return Err(Errno(ENODATA));
        }
        sys::removexattr(&inode.fd, &name)?;
        Ok(Vec::new())
    }

    pub(crate) fn fallocate(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let length = r.u64()?;
        let mode = r.u32()?;
        self.ro()?;
        let hd = self.file_handle(fh)?;
        sys::fallocate(&hd.fd, mode, offset, length)?;
        Ok(Vec::new())
    }

    pub(crate) fn lseek(&self, r: &mut Reader<'_>) -> Res {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let whence = r.u32()?;
        let hd = self.file_handle(fh)?;
        let pos = sys::lseek(&hd.fd, offset, whence)?;
        let mut w = Writer::new();
        w.u64(pos);
        Ok(w.buf)
    }

    /// GETLK / SETLK / SETLKW. SETLKW is answered like SETLK: a conflicting lock gives
    /// `EAGAIN` instead of blocking a server thread on behalf of the guest (dpkg/apt retry or
    /// report the lock as held, which is the behaviour they expect from a busy lock).
    pub(crate) fn lk(&self, r: &mut Reader<'_>, op: u32) -> Res {
        let fh = r.u64()?;
        let _owner = r.u64()?;
        let start = r.u64()?;
        let end = r.u64()?;
        let typ = r.u32()?;
        let _pid = r.u32()?;
        let lk_flags = r.u32()?;
        if lk_flags & abi::LK_FLOCK != 0 {
            return Err(Errno(ENOSYS));
        }
        if typ > abi::lock::F_UNLCK || start > end {
            return Err(Errno(EINVAL));
        }
        let hd = self.file_handle(fh)?;
        let l = sys::Lock { typ, start, end };
        if op == opcode::GETLK {
            let got = sys::get_lock(&hd.fd, &l)?;
            let mut w = Writer::new();
            w.u64(got.start).u64(got.end).u32(got.typ).u32(0);
            return Ok(w.buf);
        }
        match sys::set_lock(&hd.fd, &l) {
            Err(Errno(EACCES)) => Err(Errno(EAGAIN)),
            r => r.map(|_| Vec::new()),
        }
    }
}
