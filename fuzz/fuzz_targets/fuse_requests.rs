//! FUSE requests for the virtio-fs server: arbitrary bytes as one request (after INIT) against
//! a writable volume, a writable rootfs-policy and a read-only share of a small temp tree (a
//! file, a directory, a symlink to `/etc`), all three on one small fd budget as in a VM. Must never panic; every reply must have a well-formed `fuse_out_header` whose
//! `len` is the reply length and at most `max_out`.
//!
//! READs also go through `handle_read_direct` (the device's zero-copy path).
//!
//! Input layout: byte 0 selects `max_out` and whether the header `len` is fixed up to the
//! real length (so the fuzzer reaches the argument parsers); the rest is the request.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use skiff_devices::virtio::fs::abi::{opcode, InHeader};
use skiff_devices::virtio::fs::{Config, FdBudget, Server, SharePolicy};

struct Shares {
    rw: Server,
    rootfs: Server,
    ro: Server,
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
    let _ = s.handle(&req, 4096);
}

fn shares() -> &'static Shares {
    static S: OnceLock<Shares> = OnceLock::new();
    S.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("skiff-fuzz-fuse-{}", std::process::id()));
        let _ = std::fs::create_dir_all(d.join("dir"));
        let _ = std::fs::write(d.join("file"), b"hello fuzz");
        let _ = std::fs::write(d.join("dir/inner"), b"inner");
        let _ = std::os::unix::fs::symlink("/etc", d.join("etc"));
        let mut cfg = Config::new(&d);
        cfg.max_inodes = 4096;
        cfg.fd_budget = FdBudget::new(2048);
        let rw = Server::new(cfg.clone()).expect("server");
        cfg.policy = SharePolicy::Rootfs;
        let rootfs = Server::new(cfg.clone()).expect("server");
        cfg.policy = SharePolicy::Volume;
        cfg.read_only = true;
        let ro = Server::new(cfg).expect("server");
        init(&rw);
        init(&rootfs);
        init(&ro);
        Shares { rw, rootfs, ro }
    })
}

fn check(rep: Option<Vec<u8>>, max_out: usize) {
    if let Some(rep) = rep {
        assert!(rep.len() >= 16 && rep.len() <= max_out);
        let len = u32::from_le_bytes(rep[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, rep.len());
        let err = i32::from_le_bytes(rep[4..8].try_into().unwrap());
        assert!(err <= 0 && err > -4096);
        if err != 0 {
            assert_eq!(rep.len(), 16);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let max_out = [0usize, 16, 64, 200, 4096, 65536, 1 << 21][usize::from(ctl & 7) % 7];
    let mut req = rest.to_vec();
    if ctl & 8 != 0 && req.len() >= 4 {
        let l = req.len() as u32;
        req[0..4].copy_from_slice(&l.to_le_bytes());
    }
    let op = req
        .get(4..8)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0);
    let s = shares();
    // The zero-copy READ path the device uses: its header + data must be a valid reply too,
    // and the sink is never asked for more than the room after the header.
    let mut placed = 0usize;
    let mut sink = |_fd: &std::os::fd::OwnedFd, _off: u64, n: usize| {
        assert!(n + 16 <= max_out);
        placed = n;
        Ok(n)
    };
    if let Some((header, n)) = s.ro.handle_read_direct(&req, max_out, &mut sink) {
        assert!(n == placed || header.len() == 16);
        let mut rep = header;
        rep.resize(rep.len() + n, 0);
        check(Some(rep), max_out);
    }
    check(s.ro.handle(&req, max_out), max_out);
    // Keep the host safe from the fuzzer: no real allocation of large ranges.
    if op != opcode::FALLOCATE {
        check(s.rw.handle(&req, max_out), max_out);
        check(s.rootfs.handle(&req, max_out), max_out);
    }
    if op == opcode::DESTROY {
        init(&s.rw);
        init(&s.rootfs);
        init(&s.ro);
    }
});
