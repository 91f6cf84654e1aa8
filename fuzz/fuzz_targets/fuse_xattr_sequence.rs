//! FUSE server in rootless xattr-ownership mode (`Ownership::Xattr`): a SEQUENCE of requests
//! (after INIT) against a fresh writable share per input (a file, a directory with a file, a
//! symlink to `/etc`). Requests are built from the input op by op: opcode from a table, node
//! ids and file handles picked among those earlier replies returned (or raw), names and xattr
//! names from small tables (the hidden `user.containers.override_stat` among them) or raw,
//! argument structs from the input.
//!
//! Checked, besides "no panic": every reply is a well-formed `fuse_out_header` of at most
//! `max_out` bytes; the override xattr never shows in LISTXATTR and GETXATTR of it fails;
//! after the sequence nothing exists next to the share (nothing escaped it), and on the host
//! every node in the share belongs to the VMM's user, is a regular file, directory or symlink
//! (device nodes, FIFOs and sockets are regular files there) and has no setuid, setgid or
//! sticky bit (guest modes live in the xattr only).
//!
//! Input: operations, each `op sel uid args_len args... name_sel [name...]` (see `build`).
#![no_main]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use skiff_devices::virtio::fs::abi::{opcode, InHeader};
use skiff_devices::virtio::fs::{Config, Ownership, Server, OVERRIDE_XATTR};

const OPS: [u32; 33] = [
    opcode::LOOKUP,
    opcode::GETATTR,
    opcode::SETATTR,
    opcode::READLINK,
    opcode::SYMLINK,
    opcode::MKNOD,
    opcode::MKDIR,
    opcode::UNLINK,
    opcode::RMDIR,
    opcode::RENAME,
    opcode::LINK,
    opcode::OPEN,
    opcode::READ,
    opcode::WRITE,
    opcode::STATFS,
    opcode::RELEASE,
    opcode::FSYNC,
    opcode::SETXATTR,
    opcode::GETXATTR,
    opcode::LISTXATTR,
    opcode::REMOVEXATTR,
    opcode::FLUSH,
    opcode::OPENDIR,
    opcode::READDIR,
    opcode::READDIRPLUS,
    opcode::RELEASEDIR,
    opcode::ACCESS,
    opcode::CREATE,
    opcode::FORGET,
    opcode::BATCH_FORGET,
    opcode::RENAME2,
    opcode::LSEEK,
    opcode::FALLOCATE,
];

const NAMES: [&[u8]; 10] = [
    b"file", b"dir", b"etc", b"inner", b"a", b"b", b".", b"..", b"x/y", b"",
];
const XATTRS: [&[u8]; 7] = [
    OVERRIDE_XATTR.as_bytes(),
    b"user.a",
    b"user.b",
    b"security.capability",
    b"trusted.x",
    b"system.posix_acl_access",
    b"user.containers.override_sta",
];

/// Fixed argument bytes of each opcode (before its names or data), and where a file handle
/// sits in them.
fn layout(op: u32) -> (usize, Option<usize>) {
    match op {
        opcode::GETATTR => (16, Some(8)),
        opcode::SETATTR => (88, Some(8)),
        opcode::MKNOD => (16, None),
        opcode::MKDIR | opcode::ACCESS | opcode::OPEN | opcode::OPENDIR => (8, None),
        opcode::RENAME | opcode::LINK | opcode::FORGET => (8, None),
        opcode::RENAME2 => (16, None),
        opcode::READ | opcode::WRITE | opcode::READDIR | opcode::READDIRPLUS => (40, Some(0)),
        opcode::RELEASE | opcode::RELEASEDIR | opcode::FLUSH => (24, Some(0)),
        opcode::FSYNC => (16, Some(0)),
        opcode::SETXATTR | opcode::GETXATTR | opcode::LISTXATTR => (8, None),
        opcode::CREATE => (16, None),
        opcode::LSEEK => (24, Some(0)),
        opcode::FALLOCATE => (32, Some(0)),
        opcode::BATCH_FORGET => (8, None),
        _ => (0, None),
    }
}

fn take<'a>(u: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = u.split_at(n.min(u.len()));
    *u = b;
    a
}

fn byte(u: &mut &[u8]) -> u8 {
    take(u, 1).first().copied().unwrap_or(0)
}

/// A name: from the table, or raw from the input (`sel` >= 0xf0: length byte + bytes).
fn name(u: &mut &[u8], xattr: bool) -> Vec<u8> {
    let sel = byte(u);
    let mut n = if sel >= 0xf0 {
        let l = usize::from(byte(u));
        take(u, l).to_vec()
    } else if xattr {
        XATTRS[usize::from(sel) % XATTRS.len()].to_vec()
    } else {
        NAMES[usize::from(sel) % NAMES.len()].to_vec()
    };
    n.push(0);
    n
}

struct Session {
    nodes: Vec<u64>,
    fhs: Vec<u64>,
    unique: u64,
}

impl Session {
    /// One request from the input: `op sel uid` then the op's fixed arguments (from the input,
    /// with `sel`'s high bits choosing a known file handle), then its names or data.
    fn build(&mut self, u: &mut &[u8]) -> (u32, Vec<u8>, Vec<u8>, usize) {
        let op = OPS[usize::from(byte(u)) % OPS.len()];
        let sel = byte(u);
        let who = byte(u);
        let nodeid = if sel == 0xff {
            u64::from_le_bytes(take(u, 8).try_into().unwrap_or([0; 8]))
        } else {
            self.nodes[usize::from(sel & 0x0f) % self.nodes.len()]
        };
        let (fixed, fh_at) = layout(op);
        let mut args = take(u, fixed).to_vec();
        args.resize(fixed, 0);
        if let (Some(at), false) = (fh_at, self.fhs.is_empty()) {
            if sel & 0x80 == 0 {
                let fh = self.fhs[usize::from(sel >> 4) % self.fhs.len()];
                args[at..at + 8].copy_from_slice(&fh.to_le_bytes());
            }
        }
        let mut xname = Vec::new();
        match op {
            opcode::LOOKUP | opcode::MKNOD | opcode::MKDIR | opcode::UNLINK | opcode::RMDIR => {
                args.extend(name(u, false))
            }
            opcode::LINK | opcode::CREATE => args.extend(name(u, false)),
            opcode::SYMLINK | opcode::RENAME | opcode::RENAME2 => {
                args.extend(name(u, false));
                args.extend(name(u, false));
            }
            opcode::SETXATTR => {
                xname = name(u, true);
                args.extend(&xname);
                let size = u32::from_le_bytes(args[0..4].try_into().unwrap()) as usize;
                args.extend(take(u, size.min(64)));
            }
            opcode::GETXATTR | opcode::REMOVEXATTR => {
                xname = name(u, true);
                args.extend(&xname);
            }
            opcode::WRITE => {
                let n = usize::from(byte(u));
                args[16..20].copy_from_slice(&(n as u32).to_le_bytes());
                args.extend(take(u, n));
            }
            opcode::FALLOCATE => {
                // Keep the host safe from the fuzzer: no large real allocations.
                let len = u64::from_le_bytes(args[16..24].try_into().unwrap()) % (1 << 20);
                args[16..24].copy_from_slice(&len.to_le_bytes());
            }
            opcode::BATCH_FORGET => {
                let n = usize::from(args[0] % 4);
                args[0..4].copy_from_slice(&(n as u32).to_le_bytes());
                for i in 0..n {
                    let id = self.nodes[(usize::from(sel) + i) % self.nodes.len()];
                    args.extend(id.to_le_bytes());
                    args.extend(u64::from(byte(u) % 3).to_le_bytes());
                }
            }
            _ => {}
        }
        self.unique += 1;
        let mut req = Vec::new();
        InHeader {
            len: (40 + args.len()) as u32,
            opcode: op,
            unique: self.unique,
            nodeid,
            uid: [0, 1000, 65534, u32::from(who)][usize::from(who & 3)],
            gid: [0, 1000, 65534, u32::from(who)][usize::from(who >> 2 & 3)],
            pid: 1,
            ..InHeader::default()
        }
        .encode(&mut req);
        req.extend(args);
        let max_out = [4096usize, 200, 16, 1 << 17][usize::from(who >> 6)];
        (op, req, xname, max_out)
    }

    /// Learns node ids and file handles from a successful reply.
    fn learn(&mut self, op: u32, payload: &[u8]) {
        let u64_at = |o: usize| {
            payload
                .get(o..o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        match op {
            opcode::LOOKUP | opcode::MKNOD | opcode::MKDIR | opcode::SYMLINK | opcode::LINK => {
                self.nodes.extend(u64_at(0));
            }
            opcode::CREATE => {
                self.nodes.extend(u64_at(0));
                self.fhs.extend(u64_at(128));
            }
            opcode::OPEN | opcode::OPENDIR => self.fhs.extend(u64_at(0)),
            _ => {}
        }
        self.nodes.truncate(16);
        self.fhs.truncate(16);
    }
}

fn init(s: &Server) {
    let mut req = Vec::new();
    InHeader {
        len: 40 + 64,
        opcode: opcode::INIT,
        unique: 1,
        ..InHeader::default()
    }
    .encode(&mut req);
    for v in [7u32, 31, 131072, u32::MAX] {
        req.extend_from_slice(&v.to_le_bytes());
    }
    req.resize(40 + 64, 0);
    let rep = s.handle(&req, 4096).expect("INIT reply");
    assert_eq!(
        i32::from_le_bytes(rep[4..8].try_into().unwrap()),
        0,
        "INIT failed"
    );
}

/// The reply's error and payload, after checking its header.
fn check(rep: &[u8], max_out: usize) -> (i32, &[u8]) {
    assert!(rep.len() >= 16 && rep.len() <= max_out);
    let len = u32::from_le_bytes(rep[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, rep.len());
    let err = i32::from_le_bytes(rep[4..8].try_into().unwrap());
    assert!(err <= 0 && err > -4096);
    if err != 0 {
        assert_eq!(rep.len(), 16);
    }
    (err, &rep[16..])
}

fn check_host_tree(dir: &Path, uid: u32) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        let ft = m.file_type();
        assert!(
            ft.is_file() || ft.is_dir() || ft.is_symlink(),
            "special host node {:?}",
            e.path()
        );
        assert_eq!(m.uid(), uid, "host node {:?} chowned", e.path());
        if !ft.is_symlink() {
            assert_eq!(
                m.permissions().mode() & 0o7000,
                0,
                "host node {:?} has setuid/setgid/sticky",
                e.path()
            );
        }
        if ft.is_dir() {
            check_host_tree(&e.path(), uid);
        }
    }
}

/// Where the per-input shares go: `/dev/shm` when it takes `user.*` xattrs (tmpfs since Linux
/// 6.6; much faster than a disk), else the temp directory.
fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let probe = shm.join(format!("skiff-fuzz-xattr-probe-{}", std::process::id()));
        let ok = std::fs::write(&probe, b"").is_ok() && xattr_ok(&probe);
        let _ = std::fs::remove_file(&probe);
        if ok {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

fn xattr_ok(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path and name, a 1-byte value.
    unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.skiff-probe".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        ) == 0
    }
}

fuzz_target!(|data: &[u8]| {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = scratch().join(format!(
        "skiff-fuzz-xattr-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let share = base.join("share");
    std::fs::create_dir_all(share.join("dir")).expect("mkdir");
    std::fs::write(share.join("file"), b"hello fuzz").expect("write");
    std::fs::write(share.join("dir/inner"), b"inner").expect("write");
    std::os::unix::fs::symlink("/etc", share.join("etc")).expect("symlink");

    let mut cfg = Config::new(&share);
    cfg.ownership = Ownership::Xattr;
    cfg.max_inodes = 64;
    let server = Server::new(cfg).expect("server");
    init(&server);
    let mut s = Session {
        nodes: vec![1],
        fhs: Vec::new(),
        unique: 1,
    };
    let mut u = data;
    for _ in 0..48 {
        if u.is_empty() {
            break;
        }
        let (op, req, xname, max_out) = s.build(&mut u);
        let Some(rep) = server.handle(&req, max_out) else {
            continue;
        };
        let (err, payload) = check(&rep, max_out);
        if err == 0 {
            s.learn(op, payload);
            if op == opcode::LISTXATTR {
                assert!(
                    !payload
                        .split(|&b| b == 0)
                        .any(|n| n == OVERRIDE_XATTR.as_bytes()),
                    "LISTXATTR shows the override xattr"
                );
            }
            if op == opcode::GETXATTR {
                assert_ne!(
                    &xname[..xname.len() - 1],
                    OVERRIDE_XATTR.as_bytes(),
                    "override xattr readable"
                );
            }
        }
    }
    drop(server);
    let mut next_to_share: Vec<_> = std::fs::read_dir(&base)
        .expect("base")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    next_to_share.sort();
    assert_eq!(next_to_share, ["share"], "something escaped the share");
    let me = std::fs::metadata(&base).expect("base").uid();
    check_host_tree(&share, me);
    let _ = std::fs::remove_dir_all(&base);
});
