//! Tests driving [`Server::handle`] with hand-built request bytes. They run as root on CI, so
//! confinement checks never rely on permission bits: they check what the server returns and
//! what happens to files outside the share.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::abi::{errno::*, mode::*, opcode::*, Attr, InHeader, Reader, Writer, ROOT_ID};
use super::*;

const MAX_OUT: usize = 1 << 21;

struct T {
    srv: Server,
    dir: tempfile::TempDir,
    unique: Cell<u64>,
    uid: Cell<u32>,
    gid: Cell<u32>,
}

fn cfg_for(dir: &Path) -> Config {
    Config::new(dir)
}

impl T {
    fn with(f: impl FnOnce(&mut Config)) -> T {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg_for(dir.path());
        f(&mut cfg);
        let t = T {
            srv: Server::new(cfg).unwrap(),
            dir,
            unique: Cell::new(1),
            uid: Cell::new(0),
            gid: Cell::new(0),
        };
        t.init();
        t
    }
    fn new() -> T {
        T::with(|_| {})
    }
    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    fn raw(&self, op: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let u = self.unique.get();
        self.unique.set(u + 1);
        let h = InHeader {
            len: (40 + args.len()) as u32,
            opcode: op,
            unique: u,
            nodeid,
            uid: self.uid.get(),
            gid: self.gid.get(),
            pid: 42,
            total_extlen: 0,
        };
        let mut v = Vec::new();
        h.encode(&mut v);
        v.extend_from_slice(args);
        v
    }

    /// Sends a request; returns Ok(payload) or Err(errno). Checks the reply header.
    fn call_max(&self, op: u32, nodeid: u64, args: &[u8], max_out: usize) -> Result<Vec<u8>, i32> {
        let req = self.raw(op, nodeid, args);
        let unique = u64::from_le_bytes(req[8..16].try_into().unwrap());
        let rep = self.srv.handle(&req, max_out).expect("reply");
        check_reply(&rep, max_out);
        let mut r = Reader::new(&rep);
        let _len = r.u32().unwrap();
        let err = r.u32().unwrap() as i32;
        assert_eq!(r.u64().unwrap(), unique);
        if err != 0 {
            assert_eq!(rep.len(), 16);
            assert!(err < 0);
            return Err(-err);
        }
        Ok(rep[16..].to_vec())
    }
    fn call(&self, op: u32, nodeid: u64, args: &[u8]) -> Result<Vec<u8>, i32> {
        self.call_max(op, nodeid, args, MAX_OUT)
    }

    fn init(&self) {
        let mut w = Writer::new();
        w.u32(7)
            .u32(38)
            .u32(128 * 1024)
            .u32(u32::MAX)
            .u32(0)
            .bytes(&[0; 44]);
        self.call(INIT, 0, &w.buf).unwrap();
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<(u64, Attr), i32> {
        let rep = self.call(LOOKUP, parent, &cs(name))?;
        Ok(entry(&rep))
    }
    fn getattr(&self, node: u64) -> Result<Attr, i32> {
        let rep = self.call(GETATTR, node, &[0; 16])?;
        let mut r = Reader::new(&rep[16..]);
        Ok(Attr::parse(&mut r).unwrap())
    }
    fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<(u64, Attr), i32> {
        let mut w = Writer::new();
        w.u32(mode).u32(0).bytes(&cs(name));
        Ok(entry(&self.call(MKDIR, parent, &w.buf)?))
    }
    fn create(
        &self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
    ) -> Result<(u64, Attr, u64), i32> {
        let mut w = Writer::new();
        w.u32(flags).u32(mode).u32(0).u32(0).bytes(&cs(name));
        let rep = self.call(CREATE, parent, &w.buf)?;
        let (id, a) = entry(&rep);
        let fh = u64::from_le_bytes(rep[128..136].try_into().unwrap());
        Ok((id, a, fh))
    }
    fn open(&self, node: u64, flags: u32) -> Result<u64, i32> {
        let mut w = Writer::new();
        w.u32(flags).u32(0);
        let rep = self.call(OPEN, node, &w.buf)?;
        Ok(u64::from_le_bytes(rep[0..8].try_into().unwrap()))
    }
    fn opendir(&self, node: u64) -> Result<u64, i32> {
        let mut w = Writer::new();
        w.u32(0).u32(0);
        let rep = self.call(OPENDIR, node, &w.buf)?;
        Ok(u64::from_le_bytes(rep[0..8].try_into().unwrap()))
    }
    fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.call(READ, 0, &read_in(fh, off, size))
    }
    fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<u32, i32> {
        let mut w = Writer::new();
        w.u64(fh)
            .u64(off)
            .u32(data.len() as u32)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .bytes(data);
        let rep = self.call(WRITE, 0, &w.buf)?;
        Ok(u32::from_le_bytes(rep[0..4].try_into().unwrap()))
    }
    /// WRITE with `fuse_write_in.write_flags`.
    fn write_flagged(&self, fh: u64, off: u64, data: &[u8], flags: u32) -> Result<u32, i32> {
        let mut w = Writer::new();
        w.u64(fh)
            .u64(off)
            .u32(data.len() as u32)
            .u32(flags)
            .u64(0)
            .u32(0)
            .u32(0)
            .bytes(data);
        let rep = self.call(WRITE, 0, &w.buf)?;
        Ok(u32::from_le_bytes(rep[0..4].try_into().unwrap()))
    }
    /// OPEN with `fuse_open_in.open_flags`.
    fn open_flagged(&self, node: u64, flags: u32, open_flags: u32) -> Result<u64, i32> {
        let mut w = Writer::new();
        w.u32(flags).u32(open_flags);
        let rep = self.call(OPEN, node, &w.buf)?;
        Ok(u64::from_le_bytes(rep[0..8].try_into().unwrap()))
    }
    /// CREATE with `fuse_create_in.open_flags`; returns the node and the handle.
    fn create_flagged(
        &self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
        open_flags: u32,
    ) -> Result<(u64, u64), i32> {
        let mut w = Writer::new();
        w.u32(flags)
            .u32(mode)
            .u32(0)
            .u32(open_flags)
            .bytes(&cs(name));
        let rep = self.call(CREATE, parent, &w.buf)?;
        let fh = u64::from_le_bytes(rep[128..136].try_into().unwrap());
        Ok((entry(&rep).0, fh))
    }
    fn mknod(&self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<(u64, Attr), i32> {
        let mut w = Writer::new();
        w.u32(mode).u32(rdev).u32(0).u32(0).bytes(&cs(name));
        Ok(entry(&self.call(MKNOD, parent, &w.buf)?))
    }
    fn release(&self, op: u32, fh: u64) -> Result<Vec<u8>, i32> {
        let mut w = Writer::new();
        w.u64(fh).u32(0).u32(0).u64(0);
        self.call(op, 0, &w.buf)
    }
    /// FORGET as the device sends it: no writable descriptors, `max_out` 0.
    fn forget(&self, node: u64, n: u64) {
        let req = self.raw(FORGET, node, &n.to_le_bytes());
        assert!(self.srv.handle(&req, 0).is_none());
    }
    /// All entries of a directory via READDIR(PLUS) with a small buffer (several calls).
    fn readdir(&self, node: u64, plus: bool) -> Vec<(String, u64)> {
        let fh = self.opendir(node).unwrap();
        let mut off = 0;
        let mut out = Vec::new();
        loop {
            let rep = self
                .call(
                    if plus { READDIRPLUS } else { READDIR },
                    node,
                    &read_in(fh, off, 512),
                )
                .unwrap();
            if rep.is_empty() {
                break;
            }
            let mut r = Reader::new(&rep);
            while !r.remaining().is_empty() {
                let mut nodeid = 0;
                if plus {
                    let e = r.take(128).unwrap();
                    nodeid = u64::from_le_bytes(e[0..8].try_into().unwrap());
                }
                let _ino = r.u64().unwrap();
                off = r.u64().unwrap();
                let namelen = r.u32().unwrap() as usize;
                let _typ = r.u32().unwrap();
                let name = r.take(namelen).unwrap();
                r.take(abi::dirent_size(namelen) - 24 - namelen).unwrap();
                out.push((String::from_utf8(name.to_vec()).unwrap(), nodeid));
            }
        }
        self.release(RELEASEDIR, fh).unwrap();
        out.sort();
        out
    }
    fn setattr(&self, node: u64, f: impl FnOnce(&mut SetAttr)) -> Result<Attr, i32> {
        let mut s = SetAttr::default();
        f(&mut s);
        let mut w = Writer::new();
        w.u32(s.valid)
            .u32(0)
            .u64(s.fh)
            .u64(s.size)
            .u64(0)
            .u64(s.atime)
            .u64(s.mtime)
            .u64(0);
        w.u32(s.atimensec)
            .u32(s.mtimensec)
            .u32(0)
            .u32(s.mode)
            .u32(0)
            .u32(s.uid)
            .u32(s.gid)
            .u32(0);
        let rep = self.call(SETATTR, node, &w.buf)?;
        Ok(Attr::parse(&mut Reader::new(&rep[16..])).unwrap())
    }
    fn xattr_get(&self, node: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let mut w = Writer::new();
        w.u32(size).u32(0).bytes(&cs(name));
        self.call(GETXATTR, node, &w.buf)
    }
    fn xattr_set(&self, node: u64, name: &str, value: &[u8]) -> Result<Vec<u8>, i32> {
        let mut w = Writer::new();
        w.u32(value.len() as u32)
            .u32(0)
            .bytes(&cs(name))
            .bytes(value);
        self.call(SETXATTR, node, &w.buf)
    }
    fn xattr_list(&self, node: u64, size: u32) -> Result<Vec<u8>, i32> {
        let mut w = Writer::new();
        w.u32(size).u32(0);
        self.call(LISTXATTR, node, &w.buf)
    }
    fn lk(&self, op: u32, fh: u64, typ: u32, start: u64, end: u64) -> Result<Vec<u8>, i32> {
        let mut w = Writer::new();
        w.u64(fh)
            .u64(7)
            .u64(start)
            .u64(end)
            .u32(typ)
            .u32(1)
            .u32(0)
            .u32(0);
        self.call(op, 0, &w.buf)
    }
}

#[derive(Default)]
struct SetAttr {
    valid: u32,
    fh: u64,
    size: u64,
    atime: u64,
    mtime: u64,
    atimensec: u32,
    mtimensec: u32,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn check_reply(rep: &[u8], max_out: usize) {
    assert!(rep.len() >= 16 && rep.len() <= max_out);
    let len = u32::from_le_bytes(rep[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, rep.len());
    let err = i32::from_le_bytes(rep[4..8].try_into().unwrap());
    assert!(err <= 0 && err > -4096);
    if err != 0 {
        assert_eq!(rep.len(), 16);
    }
}

fn cs(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn entry(rep: &[u8]) -> (u64, Attr) {
    assert!(rep.len() >= 128);
    let id = u64::from_le_bytes(rep[0..8].try_into().unwrap());
    let a = Attr::parse(&mut Reader::new(&rep[40..128])).unwrap();
    (id, a)
}

fn read_in(fh: u64, off: u64, size: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(fh).u64(off).u32(size).u32(0).u64(0).u32(0).u32(0);
    w.buf
}

fn two_names(a: &str, b: &str) -> Vec<u8> {
    let mut v = cs(a);
    v.extend_from_slice(&cs(b));
    v
}

#[test]
fn server_is_send_sync() {
    fn f<X: Send + Sync>() {}
    f::<Server>();
}

#[test]
fn new_rejects_missing_and_non_dir() {
    let d = tempfile::tempdir().unwrap();
    let e = Server::new(Config::new(d.path().join("nope"))).unwrap_err();
    assert!(matches!(e, Error::Missing(_)), "{e}");
    std::fs::write(d.path().join("f"), b"x").unwrap();
    let e = Server::new(Config::new(d.path().join("f"))).unwrap_err();
    assert!(matches!(e, Error::NotADirectory(_)), "{e}");
}

#[test]
fn init_negotiation_and_requests_before_init() {
    let d = tempfile::tempdir().unwrap();
    let t = T {
        srv: Server::new(Config::new(d.path())).unwrap(),
        dir: d,
        unique: Cell::new(1),
        uid: Cell::new(0),
        gid: Cell::new(0),
    };
    assert_eq!(t.call(GETATTR, ROOT_ID, &[0; 16]), Err(EIO));
    assert_eq!(t.lookup(ROOT_ID, "x"), Err(EIO));
    // A newer major: answer with ours, stay uninitialized.
    let mut w = Writer::new();
    w.u32(8).u32(0).u32(0).u32(0);
    let rep = t.call(INIT, 0, &w.buf).unwrap();
    assert_eq!(&rep[0..4], &7u32.to_le_bytes());
    assert_eq!(t.call(GETATTR, ROOT_ID, &[0; 16]), Err(EIO));
    // An older major is refused.
    let mut w = Writer::new();
    w.u32(6).u32(0).u32(0).u32(0);
    assert_eq!(t.call(INIT, 0, &w.buf), Err(EINVAL));
    // Truncated INIT.
    assert_eq!(t.call(INIT, 0, &[7, 0, 0, 0]), Err(EINVAL));
    // Real INIT.
    let mut w = Writer::new();
    let offered = abi::init_flags::SUPPORTED | abi::init_flags::EXPORT_SUPPORT | (1 << 16);
    w.u32(7)
        .u32(38)
        .u32(65536)
        .u32(offered)
        .u32(0)
        .bytes(&[0; 44]);
    let rep = t.call(INIT, 0, &w.buf).unwrap();
    assert_eq!(rep.len(), 64);
    let mut r = Reader::new(&rep);
    assert_eq!(r.u32().unwrap(), 7);
    assert_eq!(r.u32().unwrap(), 31);
    assert_eq!(r.u32().unwrap(), 65536);
    let flags = r.u32().unwrap();
    assert_eq!(flags, abi::init_flags::SUPPORTED);
    assert_eq!(flags & abi::init_flags::EXPORT_SUPPORT, 0);
    r.u16().unwrap();
    r.u16().unwrap();
    assert_eq!(r.u32().unwrap(), 1 << 20);
    r.u32().unwrap();
    assert_eq!(r.u16().unwrap(), 256);
    t.getattr(ROOT_ID).unwrap();
    // An old minor gets the short reply.
    let mut w = Writer::new();
    w.u32(7).u32(22).u32(0).u32(0);
    assert_eq!(t.call(INIT, 0, &w.buf).unwrap().len(), 24);
}

#[test]
fn destroy_resets_and_needs_init() {
    let t = T::new();
    std::fs::create_dir(t.p("d")).unwrap();
    t.lookup(ROOT_ID, "d").unwrap();
    assert_eq!(t.srv.inode_count(), 2);
    assert_eq!(t.call(DESTROY, 0, &[]), Ok(vec![]));
    assert_eq!(t.srv.inode_count(), 1);
    assert_eq!(t.getattr(ROOT_ID), Err(EIO));
    t.init();
    t.getattr(ROOT_ID).unwrap();
}

#[test]
fn malformed_requests() {
    let t = T::new();
    // Short header: EINVAL, unique taken from the bytes when present.
    let rep = t.srv.handle(&[1, 2, 3], MAX_OUT).unwrap();
    check_reply(&rep, MAX_OUT);
    assert_eq!(i32::from_le_bytes(rep[4..8].try_into().unwrap()), -EINVAL);
    // len disagrees with the buffer.
    let mut req = t.raw(GETATTR, ROOT_ID, &[0; 16]);
    req[0] = 200;
    let rep = t.srv.handle(&req, MAX_OUT).unwrap();
    assert_eq!(i32::from_le_bytes(rep[4..8].try_into().unwrap()), -EINVAL);
    let mut req = t.raw(GETATTR, ROOT_ID, &[0; 16]);
    req.push(0);
    let rep = t.srv.handle(&req, MAX_OUT).unwrap();
    assert_eq!(i32::from_le_bytes(rep[4..8].try_into().unwrap()), -EINVAL);
    // No room for a reply header: dropped, not executed.
    let req = t.raw(GETATTR, ROOT_ID, &[0; 16]);
    assert!(t.srv.handle(&req, 15).is_none());
    let mut w = Writer::new();
    w.u32(0o755).u32(0).bytes(&cs("unseen"));
    let req = t.raw(MKDIR, ROOT_ID, &w.buf);
    assert!(t.srv.handle(&req, 0).is_none());
    assert!(!t.p("unseen").exists());
    assert!(t.srv.handle(&[1, 2], 0).is_none());
    // Unknown opcodes, IOCTL.
    assert_eq!(t.call(9999, ROOT_ID, &[]), Err(ENOSYS));
    assert_eq!(t.call(abi::opcode::BMAP, ROOT_ID, &[0; 16]), Err(ENOSYS));
    assert_eq!(t.call(abi::opcode::IOCTL, ROOT_ID, &[0; 32]), Err(ENOTTY));
    // Truncated arguments.
    assert_eq!(t.call(LOOKUP, ROOT_ID, b"abc"), Err(EINVAL)); // no NUL
    assert_eq!(t.call(SETATTR, ROOT_ID, &[0; 40]), Err(EINVAL));
    assert_eq!(t.call(READ, 0, &[0; 12]), Err(EINVAL));
    assert_eq!(t.call(MKDIR, ROOT_ID, &[0; 4]), Err(EINVAL));
    assert_eq!(
        t.call(RENAME, ROOT_ID, &[1, 0, 0, 0, 0, 0, 0, 0, b'a', 0]),
        Err(EINVAL)
    );
    let mut w = Writer::new();
    w.u64(1)
        .u64(0)
        .u32(100)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .bytes(b"short");
    assert_eq!(t.call(WRITE, 0, &w.buf), Err(EINVAL));
    // Unknown node ids.
    assert_eq!(t.getattr(12345), Err(ENOENT));
    // INTERRUPT and malformed FORGETs never get a reply.
    let req = t.raw(INTERRUPT, 0, &5u64.to_le_bytes());
    assert!(t.srv.handle(&req, MAX_OUT).is_none());
    let req = t.raw(FORGET, 2, &[1]);
    assert!(t.srv.handle(&req, MAX_OUT).is_none());
    let mut req = t.raw(BATCH_FORGET, 0, &[0xff; 8]);
    assert!(t.srv.handle(&req, MAX_OUT).is_none());
    req[0] = 1;
    assert!(t.srv.handle(&req, MAX_OUT).is_none());
}

#[test]
fn bad_names_are_refused() {
    let t = T::new();
    std::fs::create_dir(t.p("d")).unwrap();
    for n in ["", ".", "..", "a/b", "/etc", "d/..", "../x"] {
        assert_eq!(
            t.lookup(ROOT_ID, n).map(|_| ()),
            Err(EINVAL),
            "lookup {n:?}"
        );
        assert_eq!(
            t.mkdir(ROOT_ID, n, 0o755).map(|_| ()),
            Err(EINVAL),
            "mkdir {n:?}"
        );
        assert_eq!(t.call(UNLINK, ROOT_ID, &cs(n)), Err(EINVAL), "unlink {n:?}");
        assert_eq!(t.create(ROOT_ID, n, 2, 0o644).map(|_| ()), Err(EINVAL));
        assert_eq!(
            t.call(
                RENAME,
                ROOT_ID,
                &[&1u64.to_le_bytes()[..], &two_names("d", n)].concat()
            ),
            Err(EINVAL)
        );
    }
    let long = "x".repeat(256);
    assert_eq!(t.lookup(ROOT_ID, &long).map(|_| ()), Err(ENAMETOOLONG));
    assert_eq!(t.lookup(ROOT_ID, "missing").map(|_| ()), Err(ENOENT));
    assert!(t.p("d").is_dir());
}

#[test]
fn files_read_write_and_attrs() {
    let t = T::new();
    t.uid.set(1234);
    t.gid.set(5678);
    let (id, a, fh) = t.create(ROOT_ID, "f", 2, 0o640).unwrap();
    t.uid.set(0);
    t.gid.set(0);
    assert_eq!(a.mode, S_IFREG | 0o640);
    let md = std::fs::metadata(t.p("f")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    if rustix::process::geteuid().is_root() {
        assert_eq!((a.uid, a.gid), (1234, 5678));
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
    }
    assert_eq!(t.write(fh, 0, b"hello world").unwrap(), 11);
    assert_eq!(t.read(fh, 6, 100).unwrap(), b"world");
    // READ is capped by max_out.
    let rep = t.call_max(READ, 0, &read_in(fh, 0, 100), 16 + 4).unwrap();
    assert_eq!(rep, b"hell");
    assert_eq!(t.release(FLUSH, fh), Ok(vec![]));
    let mut w = Writer::new();
    w.u64(fh).u32(1).u32(0);
    assert_eq!(t.call(FSYNC, id, &w.buf), Ok(vec![]));
    assert_eq!(t.release(RELEASE, fh), Ok(vec![]));
    assert_eq!(t.read(fh, 0, 10), Err(EBADF));
    assert_eq!(t.write(fh, 0, b"x"), Err(EBADF));
    assert_eq!(t.release(RELEASE, fh), Err(EBADF));
    assert_eq!(t.release(FLUSH, 999), Err(EBADF));
    assert_eq!(t.srv.handle_count(), 0);

    // CREATE of an existing file with O_EXCL / without.
    assert_eq!(
        t.create(ROOT_ID, "f", 2 | 0o200, 0o644).map(|_| ()),
        Err(EEXIST)
    );
    let (id2, _, fh2) = t.create(ROOT_ID, "f", 2, 0o644).unwrap();
    assert_eq!(id2, id);
    t.release(RELEASE, fh2).unwrap();

    // OPEN + READ with O_RDONLY; O_TRUNC.
    let fh = t.open(id, 0).unwrap();
    assert_eq!(t.read(fh, 0, 5).unwrap(), b"hello");
    t.release(RELEASE, fh).unwrap();

    // SETATTR: size through the path and through FH, mode, uid/gid, times.
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::SIZE;
            s.size = 5;
        })
        .unwrap();
    assert_eq!(a.size, 5);
    let fh = t.open(id, 2).unwrap();
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::SIZE | abi::fattr::FH;
            s.size = 3;
            s.fh = fh;
        })
        .unwrap();
    assert_eq!(a.size, 3);
    assert_eq!(
        t.setattr(id, |s| {
            s.valid = abi::fattr::SIZE | abi::fattr::FH;
            s.fh = 4242;
        }),
        Err(EBADF)
    );
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o4711;
        })
        .unwrap();
    // The default policy (Volume) drops the setuid bit; see `volume_policy_*`.
    assert_eq!(a.mode, S_IFREG | 0o711);
    let a = t.setattr(id, |s| {
        s.valid = abi::fattr::UID | abi::fattr::GID;
        s.uid = 42;
        s.gid = 43;
    });
    if rustix::process::geteuid().is_root() {
        let a = a.unwrap();
        assert_eq!((a.uid, a.gid), (42, 43));
    }
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::ATIME | abi::fattr::MTIME;
            s.atime = 1_000_000;
            s.atimensec = 5;
            s.mtime = 2_000_000;
            s.mtimensec = 7;
        })
        .unwrap();
    assert_eq!(
        (a.atime, a.atimensec, a.mtime, a.mtimensec),
        (1_000_000, 5, 2_000_000, 7)
    );
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::ATIME_NOW
                | abi::fattr::MTIME_NOW
                | abi::fattr::ATIME
                | abi::fattr::MTIME
        })
        .unwrap();
    assert!(a.mtime > 1_600_000_000);

    // FALLOCATE + LSEEK SEEK_DATA / SEEK_HOLE.
    let mut w = Writer::new();
    w.u64(fh).u64(0).u64(1 << 20).u32(0).u32(0);
    assert_eq!(t.call(FALLOCATE, id, &w.buf), Ok(vec![]));
    assert_eq!(t.getattr(id).unwrap().size, 1 << 20);
    let mut w = Writer::new();
    w.u64(fh).u64(0).u32(3).u32(0);
    let rep = t.call(LSEEK, id, &w.buf).unwrap();
    assert_eq!(u64::from_le_bytes(rep[..8].try_into().unwrap()), 0);
    let mut w = Writer::new();
    w.u64(fh).u64(0).u32(4).u32(0);
    let rep = t.call(LSEEK, id, &w.buf).unwrap();
    assert!(u64::from_le_bytes(rep[..8].try_into().unwrap()) <= 1 << 20);
    let mut w = Writer::new();
    w.u64(fh).u64(0).u32(9).u32(0);
    assert_eq!(t.call(LSEEK, id, &w.buf), Err(EINVAL));
    t.release(RELEASE, fh).unwrap();

    // STATFS.
    let rep = t.call(STATFS, ROOT_ID, &[]).unwrap();
    assert_eq!(rep.len(), 80);
    assert!(u64::from_le_bytes(rep[0..8].try_into().unwrap()) > 0);

    // ACCESS as a non-owner on a 0600 file; F_OK; root.
    std::fs::write(t.p("secret"), b"s").unwrap();
    std::fs::set_permissions(t.p("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (sid, _) = t.lookup(ROOT_ID, "secret").unwrap();
    let acc = |m: u32| {
        let mut w = Writer::new();
        w.u32(m).u32(0);
        t.call(ACCESS, sid, &w.buf)
    };
    assert_eq!(acc(0), Ok(vec![]));
    assert_eq!(acc(4), Ok(vec![]));
    assert_eq!(acc(1), Err(EACCES));
    t.uid.set(1000);
    t.gid.set(1000);
    assert_eq!(acc(4), Err(EACCES));
    assert_eq!(acc(0), Ok(vec![]));
}

#[test]
fn directories_and_names() {
    let t = T::new();
    let (d, a) = t.mkdir(ROOT_ID, "d", 0o2775).unwrap();
    assert_eq!(a.mode, S_IFDIR | 0o2775);
    assert_eq!(
        std::fs::metadata(t.p("d")).unwrap().permissions().mode() & 0o7777,
        0o2775
    );
    assert_eq!(t.mkdir(ROOT_ID, "d", 0o755).map(|_| ()), Err(EEXIST));
    for i in 0..40 {
        let (_, _, fh) = t
            .create(d, &format!("file-with-a-longish-name-{i:03}"), 2, 0o644)
            .unwrap();
        t.release(RELEASE, fh).unwrap();
    }
    let names = t.readdir(d, false);
    assert_eq!(names.len(), 42);
    assert!(names.iter().any(|(n, _)| n == "."));
    assert!(names
        .iter()
        .any(|(n, _)| n == "file-with-a-longish-name-039"));
    // READDIRPLUS looks entries up: they hold references until forgotten.
    let before = t.srv.inode_count();
    let plus = t.readdir(d, true);
    assert_eq!(plus.len(), 42);
    for (n, id) in &plus {
        if n == "." || n == ".." {
            assert_eq!(*id, 0);
        } else {
            assert_ne!(*id, 0);
            assert_eq!(t.lookup(d, n).unwrap().0, *id);
            t.forget(*id, 2);
        }
    }
    assert_eq!(t.srv.inode_count(), before);
    // FSYNCDIR.
    let fh = t.opendir(d).unwrap();
    let mut w = Writer::new();
    w.u64(fh).u32(0).u32(0);
    assert_eq!(t.call(FSYNCDIR, d, &w.buf), Ok(vec![]));
    // READ on a directory handle; READDIR on a file handle.
    assert_eq!(t.read(fh, 0, 10), Err(EISDIR));
    t.release(RELEASEDIR, fh).unwrap();
    assert_eq!(
        t.opendir(t.lookup(d, "file-with-a-longish-name-000").unwrap().0),
        Err(ENOTDIR)
    );
    assert_eq!(t.call(READDIR, d, &read_in(777, 0, 100)), Err(EBADF));
    // RMDIR non-empty, UNLINK, RMDIR.
    assert_eq!(t.call(RMDIR, ROOT_ID, &cs("d")), Err(ENOTEMPTY));
    for i in 0..40 {
        t.call(UNLINK, d, &cs(&format!("file-with-a-longish-name-{i:03}")))
            .unwrap();
    }
    assert_eq!(t.call(UNLINK, d, &cs("nope")), Err(ENOENT));
    assert_eq!(t.call(RMDIR, ROOT_ID, &cs("d")), Ok(vec![]));
    assert!(!t.p("d").exists());
}

#[test]
fn rename_link_symlink_mknod() {
    let t = T::new();
    std::fs::write(t.p("a"), b"A").unwrap();
    std::fs::write(t.p("b"), b"B").unwrap();
    let (sub, _) = t.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    let ren = |op: u32, newdir: u64, flags: Option<u32>, a: &str, b: &str| {
        let mut w = Writer::new();
        w.u64(newdir);
        if let Some(f) = flags {
            w.u32(f).u32(0);
        }
        w.bytes(&two_names(a, b));
        t.call(op, ROOT_ID, &w.buf)
    };
    assert_eq!(ren(RENAME, sub, None, "a", "a2"), Ok(vec![]));
    assert_eq!(std::fs::read(t.p("sub/a2")).unwrap(), b"A");
    std::fs::write(t.p("c"), b"C").unwrap();
    assert_eq!(ren(RENAME2, ROOT_ID, Some(1), "b", "c"), Err(EEXIST));
    assert_eq!(ren(RENAME2, ROOT_ID, Some(2), "b", "c"), Ok(vec![]));
    assert_eq!(std::fs::read(t.p("b")).unwrap(), b"C");
    assert_eq!(std::fs::read(t.p("c")).unwrap(), b"B");
    assert_eq!(ren(RENAME2, ROOT_ID, Some(4), "b", "c"), Err(EINVAL));
    assert_eq!(ren(RENAME2, ROOT_ID, Some(1), "b", "new"), Ok(vec![]));
    assert_eq!(ren(RENAME, ROOT_ID, None, "missing", "x"), Err(ENOENT));

    // LINK.
    let (c, _) = t.lookup(ROOT_ID, "c").unwrap();
    let mut w = Writer::new();
    w.u64(c).bytes(&cs("c-link"));
    let (lid, la) = entry(&t.call(LINK, sub, &w.buf).unwrap());
    assert_eq!(lid, c);
    assert_eq!(la.nlink, 2);
    assert_eq!(std::fs::read(t.p("sub/c-link")).unwrap(), b"B");

    // SYMLINK + READLINK.
    let (s, sa) = entry(
        &t.call(SYMLINK, ROOT_ID, &two_names("sl", "../../target"))
            .unwrap(),
    );
    assert_eq!(sa.mode & S_IFMT, S_IFLNK);
    assert_eq!(t.call(READLINK, s, &[]).unwrap(), b"../../target");
    assert_eq!(
        std::fs::read_link(t.p("sl")).unwrap(),
        Path::new("../../target")
    );
    assert_eq!(t.call(READLINK, c, &[]), Err(EINVAL));
    assert_eq!(t.call(SYMLINK, ROOT_ID, &two_names("sl", "x")), Err(EEXIST));

    // MKNOD: FIFO and regular (passthrough).
    let mut w = Writer::new();
    w.u32(S_IFIFO | 0o644)
        .u32(0)
        .u32(0)
        .u32(0)
        .bytes(&cs("fifo"));
    let (fid, fa) = entry(&t.call(MKNOD, ROOT_ID, &w.buf).unwrap());
    assert_eq!(fa.mode, S_IFIFO | 0o644);
    assert!(std::fs::symlink_metadata(t.p("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // A FIFO is never opened by the server (it would block a thread).
    assert_eq!(t.open(fid, 0), Err(ENXIO));
    let mut w = Writer::new();
    w.u32(S_IFDIR | 0o644)
        .u32(0)
        .u32(0)
        .u32(0)
        .bytes(&cs("bad"));
    assert_eq!(t.call(MKNOD, ROOT_ID, &w.buf), Err(EINVAL));
}

#[test]
fn xattrs() {
    let t = T::new();
    let (_, _, fh) = t.create(ROOT_ID, "f", 2, 0o644).unwrap();
    t.release(RELEASE, fh).unwrap();
    let (id, _) = t.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(t.xattr_set(id, "user.k", b"value"), Ok(vec![]));
    let mut hb = [0u8; 64];
    let hn = rustix::fs::getxattr(t.p("f"), "user.k", &mut hb[..]).unwrap();
    assert_eq!(&hb[..hn], b"value");
    // Size-0 probing.
    let rep = t.xattr_get(id, "user.k", 0).unwrap();
    assert_eq!(u32::from_le_bytes(rep[0..4].try_into().unwrap()), 5);
    assert_eq!(t.xattr_get(id, "user.k", 5).unwrap(), b"value");
    assert_eq!(t.xattr_get(id, "user.k", 2), Err(ERANGE));
    assert_eq!(t.xattr_get(id, "user.none", 10), Err(ENODATA));
    let rep = t.xattr_list(id, 0).unwrap();
    let n = u32::from_le_bytes(rep[0..4].try_into().unwrap());
    assert!(n >= 7);
    let list = t.xattr_list(id, n).unwrap();
    assert!(list.split(|&b| b == 0).any(|x| x == b"user.k"));
    assert_eq!(t.xattr_list(id, 1), Err(ERANGE));
    // XATTR_CREATE on an existing one.
    let mut w = Writer::new();
    w.u32(1).u32(1).bytes(&cs("user.k")).bytes(b"x");
    assert_eq!(t.call(SETXATTR, id, &w.buf), Err(EEXIST));
    // Oversized values, bad names.
    let mut w = Writer::new();
    w.u32(70_000)
        .u32(0)
        .bytes(&cs("user.big"))
        .bytes(&vec![0; 70_000]);
    assert_eq!(t.call(SETXATTR, id, &w.buf), Err(E2BIG));
    assert_eq!(t.xattr_get(id, "", 10), Err(EINVAL));
    assert_eq!(t.call(REMOVEXATTR, id, &cs("user.k")), Ok(vec![]));
    assert_eq!(t.call(REMOVEXATTR, id, &cs("user.k")), Err(ENODATA));
    // Directories carry xattrs too.
    assert_eq!(t.xattr_set(ROOT_ID, "user.d", b"1"), Ok(vec![]));
    assert_eq!(t.xattr_get(ROOT_ID, "user.d", 10).unwrap(), b"1");
}

#[test]
fn posix_locks() {
    let t = T::new();
    let (id, _, fh1) = t.create(ROOT_ID, "lock", 2, 0o644).unwrap();
    let fh2 = t.open(id, 2).unwrap();
    use abi::lock::*;
    assert_eq!(t.lk(SETLK, fh1, F_WRLCK, 0, OFFSET_MAX), Ok(vec![]));
    let rep = t.lk(GETLK, fh2, F_WRLCK, 0, 10).unwrap();
    let mut r = Reader::new(&rep);
    assert_eq!(
        (r.u64().unwrap(), r.u64().unwrap(), r.u32().unwrap()),
        (0, OFFSET_MAX, F_WRLCK)
    );
    assert_eq!(t.lk(SETLK, fh2, F_RDLCK, 0, 10), Err(EAGAIN));
    assert_eq!(t.lk(SETLKW, fh2, F_WRLCK, 5, 5), Err(EAGAIN));
    assert_eq!(t.lk(SETLK, fh1, F_UNLCK, 0, OFFSET_MAX), Ok(vec![]));
    let rep = t.lk(GETLK, fh2, F_WRLCK, 0, 10).unwrap();
    assert_eq!(u32::from_le_bytes(rep[16..20].try_into().unwrap()), F_UNLCK);
    assert_eq!(t.lk(SETLKW, fh2, F_WRLCK, 0, 100), Ok(vec![]));
    assert_eq!(t.lk(SETLK, fh1, F_WRLCK, 50, 60), Err(EAGAIN));
    // Closing the holder's handle drops its locks.
    t.release(RELEASE, fh2).unwrap();
    assert_eq!(t.lk(SETLK, fh1, F_WRLCK, 50, 60), Ok(vec![]));
    assert_eq!(t.lk(SETLK, fh1, 7, 0, 1), Err(EINVAL));
    assert_eq!(t.lk(SETLK, fh1, F_WRLCK, 10, 1), Err(EINVAL));
    assert_eq!(t.lk(SETLK, 999, F_WRLCK, 0, 1), Err(EBADF));
}

#[test]
fn read_only_share_refuses_every_change() {
    let t = T::with(|c| c.read_only = true);
    std::fs::write(t.p("f"), b"data").unwrap();
    std::fs::create_dir(t.p("d")).unwrap();
    std::fs::create_dir(t.p("full")).unwrap();
    std::fs::write(t.p("full/x"), b"").unwrap();
    let (f, _) = t.lookup(ROOT_ID, "f").unwrap();
    let fh = t.open(f, 0).unwrap();
    assert_eq!(t.read(fh, 0, 10).unwrap(), b"data");
    assert_eq!(t.write(fh, 0, b"x"), Err(EROFS));
    for flags in [1, 2, 0o1000, 0o2000] {
        assert_eq!(t.open(f, flags), Err(EROFS), "open {flags:o}");
    }
    assert_eq!(t.create(ROOT_ID, "n", 2, 0o644).map(|_| ()), Err(EROFS));
    let mut w = Writer::new();
    w.u32(S_IFREG | 0o644).u32(0).u32(0).u32(0).bytes(&cs("n"));
    assert_eq!(t.call(MKNOD, ROOT_ID, &w.buf), Err(EROFS));
    assert_eq!(t.mkdir(ROOT_ID, "n", 0o755).map(|_| ()), Err(EROFS));
    assert_eq!(t.call(UNLINK, ROOT_ID, &cs("f")), Err(EROFS));
    assert_eq!(t.call(RMDIR, ROOT_ID, &cs("d")), Err(EROFS));
    assert_eq!(
        t.call(
            RENAME,
            ROOT_ID,
            &[&1u64.to_le_bytes()[..], &two_names("f", "g")].concat()
        ),
        Err(EROFS)
    );
    assert_eq!(
        t.call(
            RENAME2,
            ROOT_ID,
            &[&1u64.to_le_bytes()[..], &[0; 8], &two_names("f", "g")].concat()
        ),
        Err(EROFS)
    );
    let mut w = Writer::new();
    w.u64(f).bytes(&cs("l"));
    assert_eq!(t.call(LINK, ROOT_ID, &w.buf), Err(EROFS));
    assert_eq!(t.call(SYMLINK, ROOT_ID, &two_names("s", "f")), Err(EROFS));
    for valid in [
        abi::fattr::MODE,
        abi::fattr::UID,
        abi::fattr::SIZE,
        abi::fattr::MTIME_NOW,
    ] {
        assert_eq!(t.setattr(f, |s| s.valid = valid).map(|_| ()), Err(EROFS));
    }
    assert_eq!(t.xattr_set(f, "user.x", b"1"), Err(EROFS));
    assert_eq!(t.call(REMOVEXATTR, f, &cs("user.x")), Err(EROFS));
    let mut w = Writer::new();
    w.u64(fh).u64(0).u64(10).u32(0).u32(0);
    assert_eq!(t.call(FALLOCATE, f, &w.buf), Err(EROFS));
    let mut w = Writer::new();
    w.u32(2).u32(0);
    assert_eq!(t.call(ACCESS, f, &w.buf), Err(EROFS));
    // Nothing changed.
    assert_eq!(std::fs::read(t.p("f")).unwrap(), b"data");
    assert!(t.p("d").is_dir() && !t.p("n").exists() && !t.p("g").exists());
    // Reads still work.
    assert_eq!(t.readdir(ROOT_ID, false).len(), 5);
    t.release(RELEASE, fh).unwrap();
}

#[test]
fn symlinks_are_never_followed() {
    let t = T::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"precious").unwrap();
    std::os::unix::fs::symlink("/etc", t.p("etc")).unwrap();
    std::os::unix::fs::symlink("../../..", t.p("up")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), t.p("v")).unwrap();

    // LOOKUP returns the link itself.
    let (etc, a) = t.lookup(ROOT_ID, "etc").unwrap();
    assert_eq!(a.mode & S_IFMT, S_IFLNK);
    assert_eq!(t.call(READLINK, etc, &[]).unwrap(), b"/etc");
    assert_eq!(t.open(etc, 0), Err(ELOOP));
    assert_eq!(t.opendir(etc), Err(ENOTDIR));
    // Looking a name up "inside" the link does not reach /etc.
    assert!(t.lookup(etc, "passwd").is_err());
    assert!(t.lookup(etc, "hostname").is_err());
    assert_eq!(t.xattr_get(etc, "user.x", 10), Err(ENODATA));
    assert_eq!(t.xattr_list(etc, 100), Ok(vec![]));
    assert_eq!(t.xattr_set(etc, "user.x", b"1"), Err(EPERM));
    assert_eq!(
        t.setattr(etc, |s| {
            s.valid = abi::fattr::SIZE;
        })
        .map(|_| ()),
        Err(EINVAL)
    );
    assert_eq!(
        t.setattr(etc, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o777;
        })
        .map(|_| ()),
        Err(EOPNOTSUPP)
    );
    let mut w = Writer::new();
    w.u32(0).u32(0);
    assert!(t.call(OPEN, etc, &w.buf).is_err());

    let (up, _) = t.lookup(ROOT_ID, "up").unwrap();
    assert_eq!(t.opendir(up), Err(ENOTDIR));
    assert!(t.lookup(up, "etc").is_err());

    // The victim behind `v` is never written, truncated, chmod'ed or linked.
    let (v, _) = t.lookup(ROOT_ID, "v").unwrap();
    assert_eq!(t.open(v, 2), Err(ELOOP));
    assert_eq!(t.open(v, 0o1001), Err(ELOOP));
    assert_eq!(
        t.create(ROOT_ID, "v", 0o1001, 0o644).map(|_| ()),
        Err(ELOOP)
    );
    let mut w = Writer::new();
    w.u64(v).bytes(&cs("v2"));
    let (v2, v2a) = entry(&t.call(LINK, ROOT_ID, &w.buf).unwrap());
    assert_eq!(v2, v);
    assert_eq!(v2a.mode & S_IFMT, S_IFLNK);
    assert!(std::fs::symlink_metadata(t.p("v2"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Times on a symlink apply to the link (or fail), never to the target.
    let before = std::fs::metadata(outside.path().join("victim"))
        .unwrap()
        .mtime();
    let _ = t.setattr(v, |s| {
        s.valid = abi::fattr::MTIME;
        s.mtime = 12345;
    });
    assert_eq!(
        std::fs::metadata(outside.path().join("victim"))
            .unwrap()
            .mtime(),
        before
    );
    // Rename a regular file over the link: the link is replaced, the target untouched.
    std::fs::write(t.p("f"), b"mine").unwrap();
    let mut w = Writer::new();
    w.u64(ROOT_ID).bytes(&two_names("f", "v"));
    assert_eq!(t.call(RENAME, ROOT_ID, &w.buf), Ok(vec![]));
    assert_eq!(std::fs::read(t.p("v")).unwrap(), b"mine");
    assert!(!std::fs::symlink_metadata(t.p("v"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Unlinking the other link removes the link only.
    assert_eq!(t.call(UNLINK, ROOT_ID, &cs("v2")), Ok(vec![]));
    assert_eq!(
        std::fs::read(outside.path().join("victim")).unwrap(),
        b"precious"
    );
    assert!(Path::new("/etc").is_dir());
}

#[test]
fn max_inodes_and_forget() {
    let t = T::with(|c| c.max_inodes = 3);
    for n in ["a", "b", "c"] {
        std::fs::write(t.p(n), n).unwrap();
    }
    let (a, _) = t.lookup(ROOT_ID, "a").unwrap();
    let (b, _) = t.lookup(ROOT_ID, "b").unwrap();
    assert_eq!(t.lookup(ROOT_ID, "a").unwrap().0, a);
    assert_eq!(t.srv.inode_count(), 3);
    assert_eq!(t.lookup(ROOT_ID, "c").map(|_| ()), Err(ENFILE));
    assert_eq!(t.create(ROOT_ID, "d", 2, 0o644).map(|_| ()), Err(ENFILE));
    // `a` has two references: one FORGET is not enough.
    t.forget(a, 1);
    assert_eq!(t.srv.inode_count(), 3);
    t.forget(a, 1);
    assert_eq!(t.srv.inode_count(), 2);
    assert_eq!(t.getattr(a), Err(ENOENT));
    let (c, _) = t.lookup(ROOT_ID, "c").unwrap();
    assert_ne!(c, a); // ids are never reused
                      // BATCH_FORGET of b and c (and an unknown id, and the root which is kept).
    let mut w = Writer::new();
    w.u32(4)
        .u32(0)
        .u64(b)
        .u64(1)
        .u64(c)
        .u64(5)
        .u64(9999)
        .u64(1)
        .u64(ROOT_ID)
        .u64(100);
    let req = t.raw(BATCH_FORGET, 0, &w.buf);
    assert!(t.srv.handle(&req, 0).is_none());
    assert_eq!(t.srv.inode_count(), 1);
    t.getattr(ROOT_ID).unwrap();
}

#[test]
fn xattr_ownership_mode() {
    let t = T::with(|c| {
        c.ownership = Ownership::Xattr;
        c.policy = SharePolicy::Rootfs;
    });
    let me = rustix::process::geteuid().as_raw();
    t.uid.set(0);
    t.gid.set(0);
    let (d, da) = t.mkdir(ROOT_ID, "d", 0o750).unwrap();
    assert_eq!((da.uid, da.gid, da.mode), (0, 0, S_IFDIR | 0o750));
    t.uid.set(4321);
    t.gid.set(8765);
    let (f, fa, fh) = t.create(d, "f", 2, 0o400).unwrap();
    assert_eq!((fa.uid, fa.gid, fa.mode), (4321, 8765, S_IFREG | 0o400));
    t.release(RELEASE, fh).unwrap();
    let md = std::fs::metadata(t.p("d/f")).unwrap();
    assert_eq!(md.uid(), me);
    assert_eq!(
        md.permissions().mode() & 0o600,
        0o600,
        "host owner keeps rw"
    );
    // mknod of a char device as guest root: a regular 0600 host file.
    t.uid.set(0);
    t.gid.set(0);
    let rdev = (1 << 8) | 3;
    let mut w = Writer::new();
    w.u32(S_IFCHR | 0o666)
        .u32(rdev)
        .u32(0)
        .u32(0)
        .bytes(&cs("null"));
    let (n, na) = entry(&t.call(MKNOD, d, &w.buf).unwrap());
    assert_eq!(
        (na.uid, na.gid, na.mode, na.rdev),
        (0, 0, S_IFCHR | 0o666, rdev)
    );
    let na = t.getattr(n).unwrap();
    assert_eq!((na.mode, na.rdev), (S_IFCHR | 0o666, rdev));
    let md = std::fs::symlink_metadata(t.p("d/null")).unwrap();
    assert!(md.file_type().is_file());
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md.uid(), me);
    let raw = xattr_raw(&t.p("d/null"));
    assert_eq!(raw, b"0:0:020666:259");
    // chown / chmod change the xattr only.
    let a = t
        .setattr(f, |s| {
            s.valid = abi::fattr::UID | abi::fattr::GID | abi::fattr::MODE;
            s.uid = 7;
            s.gid = 8;
            s.mode = 0o4755;
        })
        .unwrap();
    assert_eq!((a.uid, a.gid, a.mode), (7, 8, S_IFREG | 0o4755));
    let md = std::fs::metadata(t.p("d/f")).unwrap();
    assert_eq!(md.uid(), me);
    assert_eq!(md.permissions().mode() & 0o7000, 0, "no host setuid");
    assert_eq!(xattr_raw(&t.p("d/f")), b"7:8:0104755");
    // The key is hidden.
    let list = t.xattr_list(f, 1000).unwrap();
    assert!(!list.windows(9).any(|w| w == b"override_"));
    let rep = t.xattr_list(f, 0).unwrap();
    assert_eq!(
        u32::from_le_bytes(rep[0..4].try_into().unwrap()) as usize,
        list.len()
    );
    assert_eq!(
        t.xattr_get(f, passthrough::OVERRIDE_XATTR, 100),
        Err(ENODATA)
    );
    assert_eq!(
        t.xattr_set(f, passthrough::OVERRIDE_XATTR, b"0:0:0104755"),
        Err(EPERM)
    );
    assert_eq!(
        t.call(REMOVEXATTR, f, &cs(passthrough::OVERRIDE_XATTR)),
        Err(EPERM)
    );
    t.xattr_set(f, "user.other", b"ok").unwrap();
    assert_eq!(t.xattr_list(f, 1000).unwrap(), b"user.other\0");
    // Files created on the host show host values.
    std::fs::write(t.p("host"), b"").unwrap();
    let (_, ha) = t.lookup(ROOT_ID, "host").unwrap();
    assert_eq!(ha.uid, me);
    // Symlinks show host values.
    let (_, sa) = entry(&t.call(SYMLINK, d, &two_names("s", "f")).unwrap());
    assert_eq!(sa.mode & S_IFMT, S_IFLNK);
    assert_eq!(sa.uid, me);
    // A corrupt override is ignored.
    assert!(passthrough::Override::parse(b"1:2").is_none());
    assert!(passthrough::Override::parse(b"1:2:0x1:4:5").is_none());
    assert_eq!(
        passthrough::Override::parse(b"1:2:0100644"),
        Some(passthrough::Override {
            uid: 1,
            gid: 2,
            mode: 0o100644,
            rdev: 0
        })
    );
}

fn xattr_raw(p: &Path) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let n = rustix::fs::getxattr(p, passthrough::OVERRIDE_XATTR, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// Xorshift PRNG for the garbage test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
#[allow(clippy::vec_init_then_push)]
fn garbage_never_panics() {
    let t = T::new();
    std::fs::create_dir(t.p("d")).unwrap();
    std::fs::write(t.p("d/f"), b"content").unwrap();
    std::os::unix::fs::symlink("/etc", t.p("d/l")).unwrap();
    let (d, _) = t.lookup(ROOT_ID, "d").unwrap();
    // A few valid requests to mutate.
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    seeds.push(t.raw(LOOKUP, d, &cs("f")));
    seeds.push(t.raw(LOOKUP, d, &cs("l")));
    seeds.push(t.raw(GETATTR, d, &[0; 16]));
    seeds.push(t.raw(OPENDIR, d, &[0; 8]));
    seeds.push(t.raw(READDIRPLUS, d, &read_in(1, 0, 4096)));
    seeds.push(t.raw(READ, 2, &read_in(1, 0, 4096)));
    let mut w = Writer::new();
    w.u32(0o755).u32(0).bytes(&cs("new"));
    seeds.push(t.raw(MKDIR, d, &w.buf));
    seeds.push(t.raw(
        SETXATTR,
        d,
        &[&[3, 0, 0, 0, 0, 0, 0, 0][..], &cs("user.a"), b"xyz"].concat(),
    ));
    seeds.push(t.raw(BATCH_FORGET, 0, &[2, 0, 0, 0, 0, 0, 0, 0]));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let outside = std::fs::read_dir("/etc").map(|r| r.count()).unwrap_or(0);
    for i in 0..10_000 {
        let mut req = if i % 3 == 0 {
            let n = rng.below(200) as usize;
            (0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            let mut s = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..=rng.below(4) {
                if s.is_empty() {
                    break;
                }
                let pos = rng.below(s.len() as u64) as usize;
                match rng.below(4) {
                    0 => s[pos] = rng.next() as u8,
                    1 => s.truncate(pos),
                    2 => s.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
                    _ => {
                        // Keep the header consistent so the arguments are what gets fuzzed.
                        if rng.below(2) == 0 && s.len() >= 8 {
                            let op = rng.below(60) as u32;
                            s[4..8].copy_from_slice(&op.to_le_bytes());
                        }
                    }
                }
            }
            if s.len() >= 4 && rng.below(4) != 0 {
                let l = s.len() as u32;
                s[0..4].copy_from_slice(&l.to_le_bytes());
            }
            s
        };
        // Never DESTROY or re-INIT: keep the session alive so deep paths are reached.
        if req.len() >= 8 {
            let op = u32::from_le_bytes(req[4..8].try_into().unwrap());
            if op == DESTROY {
                req[4] = 0;
            }
        }
        let max_out = [15usize, 16, 40, 200, 4096, MAX_OUT][rng.below(6) as usize];
        if let Some(rep) = t.srv.handle(&req, max_out) {
            check_reply(&rep, max_out);
        }
    }
    // Nothing outside the share was touched.
    assert_eq!(
        std::fs::read_dir("/etc").map(|r| r.count()).unwrap_or(0),
        outside
    );
    assert!(t.srv.inode_count() <= DEFAULT_MAX_INODES);
}

#[test]
fn concurrent_requests() {
    let t = T::new();
    std::fs::write(t.p("f"), b"x").unwrap();
    let srv = &t.srv;
    std::thread::scope(|s| {
        for i in 0..4u64 {
            s.spawn(move || {
                let mk = |op: u32, node: u64, args: &[u8]| {
                    let mut v = Vec::new();
                    InHeader {
                        len: (40 + args.len()) as u32,
                        opcode: op,
                        unique: i,
                        nodeid: node,
                        ..InHeader::default()
                    }
                    .encode(&mut v);
                    v.extend_from_slice(args);
                    v
                };
                for _ in 0..200 {
                    let rep = srv.handle(&mk(LOOKUP, ROOT_ID, &cs("f")), MAX_OUT).unwrap();
                    let (id, _) = entry(&rep[16..]);
                    srv.handle(&mk(GETATTR, id, &[0; 16]), MAX_OUT).unwrap();
                    assert!(srv
                        .handle(&mk(FORGET, id, &1u64.to_le_bytes()), MAX_OUT)
                        .is_none());
                }
            });
        }
    });
    assert_eq!(t.srv.inode_count(), 1);
}

#[test]
fn minus_one_ids_leave_ownership_alone() {
    // uid/gid -1 in a request (found by fuzzing: rustix asserts on -1 ids).
    let t = T::new();
    t.uid.set(u32::MAX);
    t.gid.set(u32::MAX);
    let (id, _, fh) = t.create(ROOT_ID, "f", 2, 0o644).unwrap();
    t.release(RELEASE, fh).unwrap();
    t.mkdir(ROOT_ID, "d", 0o755).unwrap();
    let before = std::fs::metadata(t.p("f")).unwrap();
    let a = t
        .setattr(id, |s| {
            s.valid = abi::fattr::UID | abi::fattr::GID;
            s.uid = u32::MAX;
            s.gid = u32::MAX;
        })
        .unwrap();
    assert_eq!((a.uid, a.gid), (before.uid(), before.gid()));
}

/// A symlink to a directory outside the share used as the *parent* of every creating or
/// moving operation: the server must never create anything outside.
fn symlink_parent_attacks(t: &T, outside: &Path) {
    let (out, a) = t.lookup(ROOT_ID, "out").unwrap();
    assert_eq!(a.mode & S_IFMT, S_IFLNK);
    assert!(t.mkdir(out, "pwned", 0o755).is_err());
    assert!(t.create(out, "pwned", 2, 0o644).is_err());
    let mut w = Writer::new();
    w.u32(S_IFREG | 0o644)
        .u32(0)
        .u32(0)
        .u32(0)
        .bytes(&cs("pwned"));
    assert!(t.call(MKNOD, out, &w.buf).is_err());
    assert!(t.call(SYMLINK, out, &two_names("pwned", "x")).is_err());
    assert!(t.lookup(out, "victim").is_err());
    assert!(t.call(UNLINK, out, &cs("victim")).is_err());
    std::fs::write(t.p("mine"), b"m").unwrap();
    let mut w = Writer::new();
    w.u64(out).bytes(&two_names("mine", "pwned"));
    assert!(t.call(RENAME, ROOT_ID, &w.buf).is_err());
    let (mine, _) = t.lookup(ROOT_ID, "mine").unwrap();
    let mut w = Writer::new();
    w.u64(mine).bytes(&cs("pwned"));
    assert!(t.call(LINK, out, &w.buf).is_err());
    assert!(t.opendir(out).is_err());
    assert!(!outside.join("pwned").exists());
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
}

#[test]
fn symlink_parents_never_lead_outside() {
    let t = T::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"precious").unwrap();
    std::os::unix::fs::symlink(outside.path(), t.p("out")).unwrap();
    symlink_parent_attacks(&t, outside.path());
}

#[test]
fn confinement_without_openat2() {
    // The plain openat fallback (kernels before 5.6, seccomp filters) must confine as well.
    sys::disable_openat2();
    let t = T::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"precious").unwrap();
    std::os::unix::fs::symlink(outside.path(), t.p("out")).unwrap();
    symlink_parent_attacks(&t, outside.path());
    std::os::unix::fs::symlink("/etc", t.p("etc")).unwrap();
    let (etc, a) = t.lookup(ROOT_ID, "etc").unwrap();
    assert_eq!(a.mode & S_IFMT, S_IFLNK);
    assert_eq!(t.open(etc, 0), Err(ELOOP));
    assert!(t.lookup(etc, "passwd").is_err());
    assert_eq!(t.lookup(ROOT_ID, "..").map(|_| ()), Err(EINVAL));
}

/// The zero-copy READ path (`handle_read_direct`, used by the device) answers exactly what the
/// copying path answers: same header, same data, same caps and errors.
#[test]
fn direct_read_matches_the_copying_path() {
    let t = T::new();
    t.init();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(t.p("big"), &data).unwrap();
    let (id, _) = t.lookup(ROOT_ID, "big").unwrap();
    let fh = t.open(id, 0).unwrap();
    let direct = |req: &[u8], max_out: usize| -> Option<Vec<u8>> {
        let mut placed = Vec::new();
        let mut sink = |fd: &std::os::fd::OwnedFd, off: u64, n: usize| {
            let mut b = vec![0u8; n];
            let got = rustix::io::pread(fd, &mut b, off).map_err(|e| e.raw_os_error())?;
            b.truncate(got);
            placed = b;
            Ok(got)
        };
        let (mut header, n) = t.srv.handle_read_direct(req, max_out, &mut sink)?;
        assert_eq!(n, placed.len());
        header.extend_from_slice(&placed);
        Some(header)
    };
    for (off, size, max_out) in [
        (0u64, 4096u32, MAX_OUT),
        (1234, 131_072, MAX_OUT),
        (299_990, 4096, MAX_OUT), // short at end of file
        (400_000, 10, MAX_OUT),   // past the end: empty
        (0, 100, 16 + 7),         // capped by the reply room
        (0, u32::MAX, MAX_OUT),   // capped at MAX_IO
    ] {
        let req = t.raw(READ, 0, &read_in(fh, off, size));
        let copied = t.srv.handle(&req, max_out).unwrap();
        assert_eq!(
            direct(&req, max_out).unwrap(),
            copied,
            "off {off} size {size}"
        );
    }
    // An unknown handle: the same EBADF reply.
    let req = t.raw(READ, 0, &read_in(999, 0, 10));
    assert_eq!(direct(&req, MAX_OUT), t.srv.handle(&req, MAX_OUT));
    // Anything but a well-formed READ is left to `handle`.
    let req = t.raw(GETATTR, id, &[0; 16]);
    assert_eq!(direct(&req, MAX_OUT), None);
    let mut bad = t.raw(READ, 0, &read_in(fh, 0, 10));
    bad.push(0);
    assert_eq!(direct(&bad, MAX_OUT), None);
    assert_eq!(direct(&t.raw(READ, 0, &read_in(fh, 0, 10)), 15), None);
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn host_mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn list_names(t: &T, node: u64) -> Vec<Vec<u8>> {
    t.xattr_list(node, 65536)
        .unwrap()
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// A `vfs_cap_data` (revision 2) granting CAP_NET_RAW, effective.
const FILE_CAP_NET_RAW: [u8; 20] = [
    0x01, 0, 0, 0x02, // magic_etc: VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    0, 0x20, 0, 0, // permitted[0]: 1 << 13
    0, 0, 0, 0, // inheritable[0]
    0, 0, 0, 0, // permitted[1]
    0, 0, 0, 0, // inheritable[1]
];

#[test]
fn volume_policy_strips_setuid_and_setgid_from_guest_modes() {
    let t = T::new();
    assert_eq!(Config::new("/x").policy, SharePolicy::Volume, "the default");
    t.uid.set(1000);
    t.gid.set(1000);
    let (f, a, fh) = t.create(ROOT_ID, "f", 2, 0o6755).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(a.mode, S_IFREG | 0o755);
    assert_eq!(host_mode(&t.p("f")), 0o755);
    let (_, a) = t.mknod(ROOT_ID, "n", S_IFREG | 0o4755, 0).unwrap();
    assert_eq!(a.mode, S_IFREG | 0o755);
    // Directories keep setgid (group inheritance), never setuid.
    let (d, a) = t.mkdir(ROOT_ID, "d", 0o6775).unwrap();
    assert_eq!(a.mode, S_IFDIR | 0o2775);
    assert_eq!(host_mode(&t.p("d")), 0o2775);
    let a = t
        .setattr(d, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o4770;
        })
        .unwrap();
    assert_eq!(a.mode, S_IFDIR | 0o770);
    // chmod u+s / g+s on a file.
    let a = t
        .setattr(f, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o6711;
        })
        .unwrap();
    assert_eq!(a.mode, S_IFREG | 0o711);
    assert_eq!(host_mode(&t.p("f")), 0o711);
    // chown stays allowed (containers chown their data directories), to root too.
    if is_root() {
        let a = t
            .setattr(f, |s| {
                s.valid = abi::fattr::UID | abi::fattr::GID;
                s.uid = 0;
                s.gid = 0;
            })
            .unwrap();
        assert_eq!((a.uid, a.gid), (0, 0));
        let a = t
            .setattr(f, |s| {
                s.valid = abi::fattr::MODE;
                s.mode = 0o4755;
            })
            .unwrap();
        assert_eq!(a.mode, S_IFREG | 0o755, "no setuid-root file on the host");
    }
    // Same in xattr ownership mode (the guest-visible mode).
    let t = T::with(|c| c.ownership = Ownership::Xattr);
    let (f, a, fh) = t.create(ROOT_ID, "f", 2, 0o4755).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(a.mode, S_IFREG | 0o755);
    let a = t
        .setattr(f, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o6755;
        })
        .unwrap();
    assert_eq!(a.mode, S_IFREG | 0o755);
}

#[test]
fn rootfs_policy_keeps_setuid_and_file_capabilities() {
    let t = T::with(|c| c.policy = SharePolicy::Rootfs);
    let (f, a, fh) = t.create(ROOT_ID, "su", 2, 0o4755).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(a.mode, S_IFREG | 0o4755);
    assert_eq!(host_mode(&t.p("su")), 0o4755);
    let a = t
        .setattr(f, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = 0o6755;
        })
        .unwrap();
    assert_eq!(a.mode, S_IFREG | 0o6755);
    // security.capability passes (setcap in a package's postinst).
    if is_root() {
        assert_eq!(
            t.xattr_set(f, "security.capability", &FILE_CAP_NET_RAW),
            Ok(vec![])
        );
        assert_eq!(
            t.xattr_get(f, "security.capability", 100).unwrap(),
            FILE_CAP_NET_RAW
        );
        assert!(list_names(&t, f).contains(&b"security.capability".to_vec()));
    }
    // Other privileged namespaces and device nodes stay refused.
    assert_eq!(t.xattr_set(f, "trusted.x", b"1"), Err(EPERM));
    assert_eq!(t.xattr_set(f, "security.selinux", b"x"), Err(EPERM));
    assert_eq!(
        t.mknod(ROOT_ID, "mem", S_IFCHR | 0o600, (1 << 8) | 1),
        Err(EPERM)
    );
}

#[test]
fn device_nodes_are_refused_in_passthrough_mode() {
    for policy in [SharePolicy::Volume, SharePolicy::Rootfs] {
        let t = T::with(|c| c.policy = policy);
        // /dev/mem (1:1), /dev/sda (8:0).
        assert_eq!(
            t.mknod(ROOT_ID, "mem", S_IFCHR | 0o666, (1 << 8) | 1),
            Err(EPERM)
        );
        assert_eq!(t.mknod(ROOT_ID, "sda", S_IFBLK | 0o666, 8 << 8), Err(EPERM));
        assert!(!t.p("mem").exists() && !t.p("sda").exists());
        // FIFOs, sockets and the overlayfs whiteout (char 0:0) are fine.
        t.mknod(ROOT_ID, "fifo", S_IFIFO | 0o644, 0).unwrap();
        t.mknod(ROOT_ID, "sock", S_IFSOCK | 0o644, 0).unwrap();
        if is_root() {
            let (_, a) = t.mknod(ROOT_ID, "wh", S_IFCHR, 0).unwrap();
            assert_eq!((a.mode & S_IFMT, a.rdev), (S_IFCHR, 0));
        }
    }
}

#[test]
fn privileged_xattr_namespaces_are_filtered() {
    for policy in [SharePolicy::Volume, SharePolicy::Rootfs] {
        let t = T::with(|c| c.policy = policy);
        std::fs::write(t.p("f"), b"").unwrap();
        let (f, _) = t.lookup(ROOT_ID, "f").unwrap();
        for name in [
            "trusted.overlay.opaque",
            "security.selinux",
            "security.ima",
            "system.posix_acl_access",
            "system.posix_acl_default",
            "system.nfs4_acl",
            "userx.nope",
        ] {
            assert_eq!(t.xattr_set(f, name, b"y"), Err(EPERM), "{name}");
            assert_eq!(t.call(REMOVEXATTR, f, &cs(name)), Err(EPERM), "{name}");
            assert_eq!(t.xattr_get(f, name, 100), Err(ENODATA), "{name}");
        }
        if policy == SharePolicy::Volume {
            assert_eq!(
                t.xattr_set(f, "security.capability", &FILE_CAP_NET_RAW),
                Err(EPERM)
            );
        }
        // What the host put there is neither visible nor removable.
        if is_root() {
            rustix::fs::setxattr(
                t.p("f"),
                "trusted.secret",
                b"s",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
            rustix::fs::setxattr(
                t.p("f"),
                "security.capability",
                &FILE_CAP_NET_RAW,
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        t.xattr_set(f, "user.ok", b"1").unwrap();
        let names = list_names(&t, f);
        let want: Vec<Vec<u8>> = if policy == SharePolicy::Rootfs && is_root() {
            vec![b"security.capability".to_vec(), b"user.ok".to_vec()]
        } else {
            vec![b"user.ok".to_vec()]
        };
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, want, "{policy:?}");
        assert_eq!(t.xattr_get(f, "trusted.secret", 100), Err(ENODATA));
        assert_eq!(t.call(REMOVEXATTR, f, &cs("trusted.secret")), Err(EPERM));
        if is_root() {
            let mut b = [0u8; 8];
            assert_eq!(
                rustix::fs::getxattr(t.p("f"), "trusted.secret", &mut b[..]).unwrap(),
                1
            );
        }
    }
}

#[test]
fn ownership_xattr_is_hidden_in_passthrough_mode() {
    let t = T::new();
    std::fs::write(t.p("f"), b"").unwrap();
    rustix::fs::setxattr(
        t.p("f"),
        OVERRIDE_XATTR,
        b"0:0:0104755",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let (f, _) = t.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(t.xattr_get(f, OVERRIDE_XATTR, 100), Err(ENODATA));
    assert_eq!(t.xattr_set(f, OVERRIDE_XATTR, b"0:0:0104755"), Err(EPERM));
    assert_eq!(t.call(REMOVEXATTR, f, &cs(OVERRIDE_XATTR)), Err(EPERM));
    assert!(list_names(&t, f).is_empty());
    let rep = t.xattr_list(f, 0).unwrap();
    assert_eq!(u32::from_le_bytes(rep[0..4].try_into().unwrap()), 0);
    // A guest-created file cannot get one either.
    let (g, _, fh) = t.create(ROOT_ID, "g", 2, 0o644).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(t.xattr_set(g, OVERRIDE_XATTR, b"0:0:0104755"), Err(EPERM));
    assert!(rustix::fs::getxattr(t.p("g"), OVERRIDE_XATTR, &mut [0u8; 64][..]).is_err());
}

#[test]
fn kill_suidgid_on_write_truncate_and_open() {
    // INIT offers HANDLE_KILLPRIV_V2 when the guest asks for it.
    let t = T::with(|c| c.policy = SharePolicy::Rootfs);
    t.call(DESTROY, 0, &[]).unwrap();
    let mut w = Writer::new();
    w.u32(7)
        .u32(38)
        .u32(0)
        .u32(abi::init_flags::HANDLE_KILLPRIV_V2)
        .bytes(&[0; 48]);
    let rep = t.call(INIT, 0, &w.buf).unwrap();
    let out_flags = u32::from_le_bytes(rep[12..16].try_into().unwrap());
    assert_eq!(out_flags, abi::init_flags::HANDLE_KILLPRIV_V2);

    let kill = abi::WRITE_KILL_SUIDGID;
    let (f, _, fh) = t.create(ROOT_ID, "f", 2, 0o6755).unwrap();
    // A write by a guest process with CAP_FSETID (no flag) keeps the bits...
    t.write_flagged(fh, 0, b"a", 0).unwrap();
    if is_root() {
        assert_eq!(host_mode(&t.p("f")), 0o6755);
    }
    // ... one without clears setuid, and setgid because the file is group-executable.
    t.write_flagged(fh, 0, b"b", kill).unwrap();
    assert_eq!(host_mode(&t.p("f")), 0o755);
    assert_eq!(t.getattr(f).unwrap().mode, S_IFREG | 0o755);
    // Setgid without group execute (mandatory-locking marker) stays.
    t.setattr(f, |s| {
        s.valid = abi::fattr::MODE;
        s.mode = 0o6745;
    })
    .unwrap();
    t.write_flagged(fh, 0, b"c", kill).unwrap();
    assert_eq!(host_mode(&t.p("f")), 0o2745);
    t.release(RELEASE, fh).unwrap();
    // Truncate through SETATTR.
    let set = |m: u32| {
        t.setattr(f, |s| {
            s.valid = abi::fattr::MODE;
            s.mode = m;
        })
        .unwrap()
    };
    set(0o4755);
    let a = t
        .setattr(f, |s| {
            s.valid = abi::fattr::SIZE | abi::fattr::KILL_SUIDGID;
            s.size = 0;
        })
        .unwrap();
    assert_eq!(a.mode, S_IFREG | 0o755);
    // OPEN with O_TRUNC (only then: the flag alone does nothing).
    set(0o4755);
    let fh = t.open_flagged(f, 1, abi::OPEN_KILL_SUIDGID).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(host_mode(&t.p("f")), 0o4755);
    let fh = t
        .open_flagged(f, 1 | abi::oflags::TRUNC, abi::OPEN_KILL_SUIDGID)
        .unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(host_mode(&t.p("f")), 0o755);
    // CREATE of an existing file with O_TRUNC.
    set(0o4755);
    let (_, fh) = t
        .create_flagged(
            ROOT_ID,
            "f",
            1 | abi::oflags::TRUNC,
            0o644,
            abi::OPEN_KILL_SUIDGID,
        )
        .unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(host_mode(&t.p("f")), 0o755);

    // Xattr ownership mode: the guest-visible mode in the override is what gets killed.
    let t = T::with(|c| {
        c.policy = SharePolicy::Rootfs;
        c.ownership = Ownership::Xattr;
    });
    let (f, a, fh) = t.create(ROOT_ID, "f", 2, 0o4755).unwrap();
    assert_eq!(a.mode, S_IFREG | 0o4755);
    t.write_flagged(fh, 0, b"x", kill).unwrap();
    t.release(RELEASE, fh).unwrap();
    assert_eq!(t.getattr(f).unwrap().mode, S_IFREG | 0o755);
}

#[test]
fn fd_budget_is_shared_by_the_shares_of_a_vm() {
    let budget = FdBudget::new(3);
    let a = T::with(|c| c.fd_budget = budget.clone());
    let b = T::with(|c| c.fd_budget = budget.clone());
    for t in [&a, &b] {
        for n in ["x", "y"] {
            std::fs::write(t.p(n), n).unwrap();
        }
    }
    let (ax, _) = a.lookup(ROOT_ID, "x").unwrap();
    let (ay, _) = a.lookup(ROOT_ID, "y").unwrap();
    // Another reference to a known inode costs nothing.
    assert_eq!(a.lookup(ROOT_ID, "x").unwrap().0, ax);
    let (bx, _) = b.lookup(ROOT_ID, "x").unwrap();
    assert_eq!(budget.in_use(), 3);
    // Spent: inodes and handles of either share are ENFILE, the shares keep working.
    assert_eq!(b.lookup(ROOT_ID, "y").map(|_| ()), Err(ENFILE));
    assert_eq!(a.open(ax, 0), Err(ENFILE));
    assert_eq!(b.opendir(ROOT_ID), Err(ENFILE));
    assert_eq!(b.create(ROOT_ID, "z", 2, 0o644).map(|_| ()), Err(ENFILE));
    b.getattr(bx).unwrap();
    assert_eq!(budget.in_use(), 3);
    // FORGET in one share gives the fd back to the other.
    a.forget(ay, 1);
    assert_eq!(budget.in_use(), 2);
    let (by, _) = b.lookup(ROOT_ID, "y").unwrap();
    assert_eq!(a.open(ax, 0), Err(ENFILE));
    b.forget(by, 1);
    let fh = a.open(ax, 0).unwrap();
    assert_eq!(a.read(fh, 0, 10).unwrap(), b"x");
    assert_eq!(b.lookup(ROOT_ID, "y").map(|_| ()), Err(ENFILE));
    a.release(RELEASE, fh).unwrap();
    b.lookup(ROOT_ID, "y").unwrap();
    // DESTROY (and dropping a server) gives everything back.
    a.call(DESTROY, 0, &[]).unwrap();
    assert_eq!(budget.in_use(), 2);
    drop(b);
    assert_eq!(budget.in_use(), 0);
    assert_eq!(FdBudget::default().limit(), DEFAULT_FD_BUDGET);
}

#[test]
fn request_threads_keep_only_file_capabilities() {
    use rustix::thread::{capabilities, CapabilitySet as C};
    let base = C::CHOWN | C::DAC_OVERRIDE | C::DAC_READ_SEARCH | C::FOWNER;
    let main_before = capabilities(None).unwrap();
    for (policy, want) in [
        (SharePolicy::Volume, base),
        (SharePolicy::Rootfs, base | C::FSETID | C::SETFCAP),
    ] {
        // A thread of its own, as the device's workers (T is not Sync).
        std::thread::scope(|s| {
            s.spawn(|| {
                let t = T::with(|c| c.policy = policy);
                std::fs::write(t.p("host-suid"), b"#!/bin/sh\n").unwrap();
                std::fs::set_permissions(t.p("host-suid"), std::fs::Permissions::from_mode(0o4755))
                    .unwrap();
                let (f, _) = t.lookup(ROOT_ID, "host-suid").unwrap();
                let left = t.srv.limit_thread_capabilities();
                let now = capabilities(None).unwrap();
                let had = main_before.effective;
                assert_eq!(left, Some((had & want).bits()));
                assert_eq!(now.effective, had & want, "{policy:?}");
                assert_eq!(now.permitted, main_before.permitted & want);
                if !is_root() {
                    return;
                }
                assert!(!now.effective.contains(C::MKNOD | C::SYS_ADMIN));
                // On a volume the host kernel now also clears setuid on a plain write (no
                // CAP_FSETID), even if the guest kernel did not ask.
                let fh = t.open(f, 1).unwrap();
                t.write_flagged(fh, 0, b"#", 0).unwrap();
                t.release(RELEASE, fh).unwrap();
                let m = host_mode(&t.p("host-suid"));
                match policy {
                    SharePolicy::Volume => assert_eq!(m, 0o755),
                    SharePolicy::Rootfs => assert_eq!(m, 0o4755),
                }
                // Ordinary work still succeeds: create, chown, chmod, xattrs.
                t.uid.set(1000);
                let (g, _, fh) = t.create(ROOT_ID, "g", 2, 0o640).unwrap();
                t.release(RELEASE, fh).unwrap();
                t.uid.set(0);
                assert_eq!(std::fs::metadata(t.p("g")).unwrap().uid(), 1000);
                t.setattr(g, |s| {
                    s.valid = abi::fattr::MODE;
                    s.mode = 0o600;
                })
                .unwrap();
                t.xattr_set(g, "user.k", b"v").unwrap();
                // The price on a volume: without CAP_FSETID the host kernel drops the setgid
                // bit of a directory whose group the server is not in.
                t.uid.set(1000);
                t.gid.set(1000);
                t.mkdir(ROOT_ID, "shared", 0o2775).unwrap();
                let m = host_mode(&t.p("shared"));
                match policy {
                    SharePolicy::Volume => assert_eq!(m, 0o775),
                    SharePolicy::Rootfs => assert_eq!(m, 0o2775),
                }
            })
            .join()
            .unwrap();
        });
    }
    // Only the server threads lost anything.
    assert_eq!(capabilities(None).unwrap(), main_before);
}
