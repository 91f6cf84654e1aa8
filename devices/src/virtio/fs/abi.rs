//! The Linux FUSE wire ABI (`include/uapi/linux/fuse.h`), as far as the server speaks it.
//!
//! Everything is decoded with explicit little-endian reads from the request bytes: no struct
//! casts, no `unsafe`. Every read is bounds-checked by [`Reader`], which returns
//! [`Malformed`] instead of panicking.

/// Protocol major version spoken by the server.
pub const KERNEL_VERSION: u32 = 7;
/// Highest protocol minor version the server answers with.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The root node id.
pub const ROOT_ID: u64 = 1;

/// Size of `fuse_in_header`.
pub const IN_HEADER_SIZE: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_SIZE: usize = 16;
/// Size of `fuse_attr`.
pub const ATTR_SIZE: usize = 88;
/// Size of `fuse_entry_out`.
pub const ENTRY_OUT_SIZE: usize = 40 + ATTR_SIZE;
/// Size of `fuse_dirent` without its name.
pub const DIRENT_SIZE: usize = 24;

/// FUSE opcodes.
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` bits.
#[allow(missing_docs)]
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
    /// The server clears setuid/setgid on write, truncate and chown when the guest kernel
    /// asks (`*_KILL_SUIDGID` below). Protocol 7.33, but the kernel reads it at any minor.
    pub const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    /// Flags the server implements (offered when the guest offers them).
    pub const SUPPORTED: u32 = ASYNC_READ
        | HANDLE_KILLPRIV_V2
        | POSIX_LOCKS
        | ATOMIC_O_TRUNC
        | BIG_WRITES
        | DO_READDIRPLUS
        | READDIRPLUS_AUTO
        | PARALLEL_DIROPS
        | MAX_PAGES;
}

/// `fuse_setattr_in.valid` bits.
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    /// Clear setuid/setgid after the change (truncate or chown by a caller without
    /// `CAP_FSETID`, `HANDLE_KILLPRIV_V2`).
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1;
/// `fuse_fsync_in.fsync_flags`: only data.
pub const FSYNC_FDATASYNC: u32 = 1;
/// `fuse_lk_in.lk_flags`: a BSD `flock` request.
pub const LK_FLOCK: u32 = 1;
/// `fuse_write_in.write_flags`: clear setuid/setgid (`FUSE_WRITE_KILL_SUIDGID`).
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_open_in.open_flags` / `fuse_create_in.open_flags`: clear setuid/setgid when the
/// open truncates (`FUSE_OPEN_KILL_SUIDGID`).
pub const OPEN_KILL_SUIDGID: u32 = 1;
/// `fuse_open_out.open_flags`: cache may be kept.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// `renameat2` flags.
#[allow(missing_docs)]
pub mod rename_flags {
    pub const NOREPLACE: u32 = 1;
    pub const EXCHANGE: u32 = 2;
    pub const WHITEOUT: u32 = 4;
}

/// Linux `open(2)` flags that are the same on every Linux architecture (the guest sends its
/// own values; these are the only ones the server honours).
#[allow(missing_docs)]
pub mod oflags {
    pub const ACCMODE: u32 = 0o3;
    pub const RDONLY: u32 = 0o0;
    pub const WRONLY: u32 = 0o1;
    pub const RDWR: u32 = 0o2;
    pub const CREAT: u32 = 0o100;
    pub const EXCL: u32 = 0o200;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    pub const DSYNC: u32 = 0o10000;
    pub const SYNC: u32 = 0o4010000;
    /// The subset passed through when the server (re)opens a file.
    pub const PASSED: u32 = ACCMODE | TRUNC | APPEND | DSYNC | SYNC;
}

/// File type bits of `st_mode` (Linux values, as on the wire).
#[allow(missing_docs)]
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// POSIX lock types (Linux values).
#[allow(missing_docs)]
pub mod lock {
    pub const F_RDLCK: u32 = 0;
    pub const F_WRLCK: u32 = 1;
    pub const F_UNLCK: u32 = 2;
    /// `OFFSET_MAX`: "to end of file" in `fuse_file_lock.end`.
    pub const OFFSET_MAX: u64 = i64::MAX as u64;
}

/// Linux errno values as sent on the wire (negated in `fuse_out_header.error`).
#[allow(missing_docs)]
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENXIO: i32 = 6;
    pub const E2BIG: i32 = 7;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOTTY: i32 = 25;
    pub const EROFS: i32 = 30;
    pub const ERANGE: i32 = 34;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOSYS: i32 = 38;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
}

/// A request or its arguments are shorter than their structure, or a string is not
/// NUL-terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Bounds-checked little-endian cursor over request bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }
    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.buf.len() {
            return Err(Malformed);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// Reads a `u16`.
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), Malformed> {
        self.take(n).map(|_| ())
    }
    /// Reads a NUL-terminated string and returns it without the NUL.
    pub fn cstr(&mut self) -> Result<&'a [u8], Malformed> {
        let pos = self.buf.iter().position(|&b| b == 0).ok_or(Malformed)?;
        let s = self.take(pos + 1)?;
        Ok(&s[..pos])
    }
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InHeader {
    /// Total request length including this header.
    pub len: u32,
    /// Operation.
    pub opcode: u32,
    /// Request id, echoed in the reply.
    pub unique: u64,
    /// Node the request is about.
    pub nodeid: u64,
    /// Caller's uid (guest).
    pub uid: u32,
    /// Caller's gid (guest).
    pub gid: u32,
    /// Caller's pid (guest).
    pub pid: u32,
    /// Length of extensions after the arguments, in 8-byte units.
    pub total_extlen: u16,
}

impl InHeader {
    /// Decodes the header from the first [`IN_HEADER_SIZE`] bytes.
    pub fn parse(r: &mut Reader<'_>) -> Result<InHeader, Malformed> {
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
            total_extlen: r.u16()?,
        };
        r.u16()?;
        Ok(h)
    }

    /// Encodes the header (for tests and fuzzing).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.opcode.to_le_bytes());
        out.extend_from_slice(&self.unique.to_le_bytes());
        out.extend_from_slice(&self.nodeid.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&self.total_extlen.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
    }
}

/// Little-endian reply builder.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer::default()
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Pads with zeros to a multiple of 8.
    pub fn pad8(&mut self) -> &mut Self {
        while self.buf.len() & 7 != 0 {
            self.buf.push(0);
        }
        self
    }
}

/// `fuse_attr`: what the guest sees of an inode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    /// Encodes `fuse_attr` (88 bytes).
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.atime)
            .u64(self.mtime)
            .u64(self.ctime)
            .u32(self.atimensec)
            .u32(self.mtimensec)
            .u32(self.ctimensec)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.blksize)
            .u32(0);
    }

    /// Decodes `fuse_attr` (for tests).
    pub fn parse(r: &mut Reader<'_>) -> Result<Attr, Malformed> {
        let a = Attr {
            ino: r.u64()?,
            size: r.u64()?,
            blocks: r.u64()?,
            atime: r.u64()?,
            mtime: r.u64()?,
            ctime: r.u64()?,
            atimensec: r.u32()?,
            mtimensec: r.u32()?,
            ctimensec: r.u32()?,
            mode: r.u32()?,
            nlink: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            rdev: r.u32()?,
            blksize: r.u32()?,
        };
        r.u32()?;
        Ok(a)
    }
}

/// Encodes `fuse_entry_out` for `nodeid` (0 = "no entry returned", used in READDIRPLUS).
pub fn encode_entry(w: &mut Writer, nodeid: u64, attr: &Attr, timeout_secs: u64) {
    w.u64(nodeid)
        .u64(0) // generation: node ids are never reused
        .u64(timeout_secs)
        .u64(timeout_secs)
        .u32(0)
        .u32(0);
    attr.encode(w);
}

/// Encodes `fuse_attr_out`.
pub fn encode_attr_out(w: &mut Writer, attr: &Attr, timeout_secs: u64) {
    w.u64(timeout_secs).u32(0).u32(0);
    attr.encode(w);
}

/// Size of a `fuse_dirent` with an `name_len`-byte name, padded to 8.
pub fn dirent_size(name_len: usize) -> usize {
    (DIRENT_SIZE + name_len + 7) & !7
}

/// Encodes one `fuse_dirent`.
pub fn encode_dirent(w: &mut Writer, ino: u64, off: u64, typ: u32, name: &[u8]) {
    w.u64(ino)
        .u64(off)
        .u32(u32::try_from(name.len()).unwrap_or(0))
        .u32(typ)
        .bytes(name)
        .pad8();
}
