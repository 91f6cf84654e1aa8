#!/usr/bin/env python3
"""Writes hand-made seeds for every fuzz target into fuzz/corpus/<target>/ (seed-*.bin).

The committed corpus is these seeds plus what a short fuzz run from them found, minimized
with `cargo fuzz cmin` (see docs/ARCHITECTURE.md, "Fuzzing"). Re-run after changing an input
format:  python3 fuzz/make-seeds.py
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name + ".bin"), "wb") as f:
        f.write(bytes(data))


u16 = lambda v: struct.pack("<H", v)
u32 = lambda v: struct.pack("<I", v)
u64 = lambda v: struct.pack("<Q", v)

# ---- platform_devices: 2 bytes port, 1 byte size/direction, 4 bytes value ----
def port_access(port, size_idx, write, value, i8042=False):
    off = port - (0x50 if i8042 else 0x3E0)
    ctl = size_idx | (4 if write else 0) | (0x80 if i8042 else 0)
    return u16(off) + bytes([ctl]) + u32(value)

put("platform_devices", "serial-hello", b"".join(port_access(0x3F8, 0, True, c) for c in b"hi\n"))
put("platform_devices", "serial-lcr-dlab", port_access(0x3FB, 0, True, 0x80) + port_access(0x3F8, 0, True, 1)
    + port_access(0x3FB, 0, True, 3) + port_access(0x3FD, 0, False, 0))
put("platform_devices", "i8042-reset", port_access(0x64, 0, False, 0, True) + port_access(0x64, 0, True, 0xFE, True))
put("platform_devices", "boot-timer", port_access(0x3F0, 0, True, 1) + port_access(0x3F0, 0, True, 2))

# ---- kernel_image ----
elf64 = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
elf64 += u16(2) + u16(62) + u32(1) + u64(0x1000000) + u64(64) + u64(0) + u32(0)
elf64 += u16(64) + u16(56) + u16(1) + u16(64) + u16(0) + u16(0)
elf64 += u32(1) + u32(5) + u64(0) + u64(0x1000000) + u64(0x1000000) + u64(16) + u64(16) + u64(0x1000)
put("kernel_image", "elf64-one-load", elf64)
bz = bytearray(0x300)
bz[0x1F1] = 1
bz[0x202:0x206] = b"HdrS"
bz[0x206:0x208] = u16(0x20F)
bz[0x211] = 1
put("kernel_image", "bzimage-header", bz)
# After the fixed ELF32 identification the target prepends: e_version, entry, phoff, shoff,
# flags, ehsize, phentsize, phnum, ... then one PT_NOTE program header with a XEN PVH note.
note = u32(4) + u32(4) + u32(18) + b"Xen\0" + u32(0x100000)
e32 = u32(1) + u32(0x100000) + u32(52) + u32(0) + u32(0) + u16(52) + u16(32) + u16(2) + u16(40) + u16(0) + u16(0)
ph_load = u32(1) + u32(0x100) + u32(0x100000) + u32(0x100000) + u32(16) + u32(16) + u32(5) + u32(4)
ph_note = u32(4) + u32(0xC0) + u32(0) + u32(0) + u32(len(note)) + u32(len(note)) + u32(4) + u32(4)
img = bytearray(e32 + ph_load + ph_note)
img += bytes(0xC0 - 16 - len(img)) + note
img += bytes(0x100 - 16 - len(img)) + b"\xf4" * 16
put("kernel_image", "elf32-pvh-note", img)

# ---- aarch64_exits: esr, far, value, psci args ----
def esr(ec, iss):
    return (ec << 26) | (1 << 25) | iss
dabt = esr(0x24, (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6))  # ISV, 32-bit, x3, write
put("aarch64_exits", "data-abort-write", u64(dabt) + u64(0x0A000000) + u64(0x12345678) + u64(0x84000000) + u64(0) + u64(0) + u64(0))
put("aarch64_exits", "psci-cpu-on", u64(esr(0x16, 0)) + u64(0) + u64(0xC4000003) + u64(1) + u64(0x40080000) + u64(0))
put("aarch64_exits", "sysreg-trap", u64(esr(0x18, (3 << 20) | (3 << 14) | (14 << 10) | (2 << 1) | 1)) + u64(0) * 5)

# ---- agent_protocol and client_replies: 4-byte big-endian length + JSON ----
def frame(obj):
    b = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(b)) + b

hello = {"hello": {"protocol_version": 1, "agent_version": "0.1", "boot_stamps": [["agent_start", 5]]}}
put("agent_protocol", "hello", frame(hello))
put("agent_protocol", "request-start", frame({"request": {"id": 3, "request": {"start": {"id": "c", "exec_id": None}}}}))
put("agent_protocol", "response-pids", frame({"response": {"id": 7, "result": {"Ok": {"pids": {"pids": [1, 2]}}}}}))
put("agent_protocol", "event-exit", frame({"event": {"exit": {"id": "c", "exec_id": None, "pid": 9, "status": 0}}}))
put("agent_protocol", "stream-header", b"STREAM c/e stdout\n")

resp = lambda i, r: frame({"response": {"id": i, "result": r}})
# flags: bit 0 valid Hello, bits 1-2 callers, bit 3 writes fail, bits 4-5 which requests.
put("client_replies", "three-answers", bytes([1 | 6]) + resp(1, {"Ok": {"pids": {"pids": [1]}}})
    + resp(2, {"Err": {"code": 2, "message": "no such container"}}) + resp(3, {"Ok": "ok"}))
put("client_replies", "wrong-kinds", bytes([1 | 4 | 0x10]) + resp(2, {"Ok": {"exited": {"status": 0}}})
    + resp(1, {"Ok": {"started": {"pid": 4}}}) + resp(1, {"Ok": "ok"}))
put("client_replies", "events-and-junk", bytes([1 | 2]) + frame({"event": {"oom": {"id": "c"}}})
    + frame(hello) + resp(99, {"Ok": "ok"}) + b"\x00\x10\x00\x00{")
put("client_replies", "raw-hello", bytes([2]) + frame(hello) + resp(1, {"Ok": "ok"}))
put("client_replies", "writes-fail", bytes([1 | 6 | 8]) + resp(1, {"Ok": "ok"}))

# ---- vsock_packets: ctrl, len, payload, cuts ----
put("vsock_packets", "request-plausible", bytes([0x03, 0]) + bytes(44))
put("vsock_packets", "rx-buffers", bytes([0x60 | (2 << 2), 8]) + bytes(8) + bytes([16, 16]))

# ---- mmio_transport: the Linux probe sequence, a chain, a notify ----
def w(reg, v):
    return bytes([reg // 4]) + u32(v)
def r(reg):
    return bytes([0x40 | reg // 4])
def poke(addr, data):
    out = b""
    for i in range(0, len(data), 64):
        c = data[i:i + 64]
        out += bytes([0xC0 | (len(c) - 1)]) + u16(addr + i) + c
    return out
probe = w(0x70, 0) + w(0x70, 1) + w(0x70, 3) + w(0x14, 1) + r(0x10) + w(0x24, 1) + w(0x20, 1) \
    + w(0x24, 0) + w(0x20, 1) + w(0x70, 11) + r(0x70)
for q, (size, base) in enumerate([(16, 0x1000), (4, 0x3000)]):
    probe += w(0x30, q) + r(0x34) + w(0x38, size) + w(0x80, base) + w(0x84, 0) + w(0x90, base + 0x400) \
        + w(0x94, 0) + w(0xA0, base + 0x800) + w(0xA4, 0) + w(0x44, 1)
probe += w(0x70, 15)
desc = u64(0x8000) + u32(8) + u16(1) + u16(1) + u64(0x9000) + u32(16) + u16(2) + u16(0)
chain = poke(0x1000, desc) + poke(0x8000, b"abcdefgh") + poke(0x1400, u16(0) + u16(1) + u16(0))
put("mmio_transport", "probe-and-echo", probe + chain + w(0x50, 0) + r(0x60) + w(0x64, 1) + w(0x70, 0))
put("mmio_transport", "config-and-odd-sizes", bytes([0x80 | (1 << 1) | 1]) + u16(0x100) + u64(0x4142)
    + bytes([0x80 | (4 << 1)]) + u16(0x104) + u64(0) + bytes([0x80 | (3 << 1)]) + u16(0x72) + u64(0))
put("mmio_transport", "bad-queue", probe[:-5] + w(0x30, 0) + w(0x38, 3) + w(0x44, 1) + w(0x70, 15))

# ---- virtio_fs_device: qsize, then ops ----
def chain_op(q, segs):
    out = bytes([(len(segs) - 1) << 4 | q << 3 | 0])
    for flags, ln, data in segs:
        out += bytes([flags]) + u16(ln) + (data if not flags & 1 else b"")
    return out
req = b"\x20\x00" + b"x" * 30
put("virtio_fs_device", "request-reply", bytes([4]) + chain_op(1, [(0, len(req), req), (1, 64, b"")]) + bytes([2 | 1 << 3, 6]))
rd = b"R" + u32(5000) + b"\x02"
put("virtio_fs_device", "direct-read-scattered", bytes([6]) + chain_op(1, [(0, len(rd), rd), (1, 5, b""), (1, 11, b""), (1, 4093, b"")])
    + bytes([2 | 1 << 3, 7, 6]))
put("virtio_fs_device", "reset-in-flight", bytes([4]) + chain_op(1, [(0, len(req), req), (1, 16, b"")]) * 3
    + bytes([2 | 1 << 3, 3, 4]) + chain_op(0, [(0, 3, b"\xff\x01\x02")]) + bytes([2, 6]))
put("virtio_fs_device", "bad-addresses", bytes([3]) + chain_op(1, [(0, 8, b"12345678"), (1 | 2, 64, b""), (1 | 4, 32, b"")])
    + bytes([2 | 1 << 3, 6]))

# ---- fuse_xattr_sequence: op sel who args... names ----
OPS = ["LOOKUP", "GETATTR", "SETATTR", "READLINK", "SYMLINK", "MKNOD", "MKDIR", "UNLINK", "RMDIR", "RENAME",
       "LINK", "OPEN", "READ", "WRITE", "STATFS", "RELEASE", "FSYNC", "SETXATTR", "GETXATTR", "LISTXATTR",
       "REMOVEXATTR", "FLUSH", "OPENDIR", "READDIR", "READDIRPLUS", "RELEASEDIR", "ACCESS", "CREATE", "FORGET",
       "BATCH_FORGET", "RENAME2", "LSEEK", "FALLOCATE"]
op = lambda n: OPS.index(n)
NAME_FILE, NAME_DIR, NAME_ETC, NAME_A = 0, 1, 2, 4
X_OVERRIDE, X_USER_A = 0, 1
seq = b""
seq += bytes([op("CREATE"), 0x80, 1]) + u32(0o2 | 0o100) + u32(0o104755) + u32(0o22) + u32(0) + bytes([NAME_A])
seq += bytes([op("WRITE"), 0x00, 1]) + bytes(40) + bytes([5]) + b"hello"
seq += bytes([op("SETATTR"), 0x81, 2]) + u32(0x7) + bytes(64) + u32(0o6777) + u32(0) + u32(1000) + u32(1000) + u32(0)
seq += bytes([op("LISTXATTR"), 0x01, 0]) + u32(4096) + u32(0)
seq += bytes([op("GETXATTR"), 0x01, 0]) + u32(4096) + u32(0) + bytes([X_OVERRIDE])
seq += bytes([op("SETXATTR"), 0x01, 0]) + u32(3) + u32(0) + bytes([X_OVERRIDE]) + b"0:0"
seq += bytes([op("SETXATTR"), 0x01, 0]) + u32(3) + u32(0) + bytes([X_USER_A]) + b"abc"
seq += bytes([op("MKNOD"), 0x00, 0]) + u32(0o20644) + u32(0x0103) + u32(0) + u32(0) + bytes([5])
seq += bytes([op("GETATTR"), 0x02, 0]) + bytes(16)
put("fuse_xattr_sequence", "create-chmod-xattrs-mknod", seq)
seq = bytes([op("LOOKUP"), 0x00, 0, NAME_DIR]) + bytes([op("MKDIR"), 0x01, 1]) + u32(0o41777) + u32(0) + bytes([NAME_A])
seq += bytes([op("RENAME"), 0x00, 0]) + u64(1) + bytes([NAME_FILE, 5])
seq += bytes([op("LOOKUP"), 0x00, 0, NAME_ETC]) + bytes([op("READLINK"), 0x03, 0])
seq += bytes([op("OPENDIR"), 0x00, 0]) + u32(0) + u32(0) + bytes([op("READDIRPLUS"), 0x00, 0]) + u64(0) + u64(0) + u32(4096) + bytes(20)
seq += bytes([op("LINK"), 0x01, 0]) + u64(3) + bytes([6])
put("fuse_xattr_sequence", "dirs-rename-readdir", seq)

# ---- fuse_requests: ctl (bits 0-2 max_out choice, bit 3 fix up len), then one request ----
def fuse_req(opc, nodeid, args):
    return u32(40 + len(args)) + u32(opc) + u64(7) + u64(nodeid) + u32(0) + u32(0) + u32(1) + u16(0) + u16(0) + args
put("fuse_requests", "lookup-file", bytes([8 | 4]) + fuse_req(1, 1, b"file\0"))
put("fuse_requests", "getattr-root", bytes([8 | 4]) + fuse_req(3, 1, bytes(16)))
put("fuse_requests", "mkdir-ro-and-rw", bytes([8 | 4]) + fuse_req(9, 1, u32(0o755) + u32(0o22) + b"newdir\0"))
put("fuse_requests", "opendir-root", bytes([8 | 4]) + fuse_req(27, 1, u32(0) + u32(0)))
put("fuse_requests", "getxattr-small-out", bytes([8 | 1]) + fuse_req(22, 1, u32(64) + u32(0) + b"user.a\0"))

# ---- gdb_page_walk: CR0, CR3, CR4, EFER, virtual address, then guest memory from 0 ----
def walk_seed(cr0, cr3, cr4, efer, va, entries):
    mem = bytearray(0x6000)
    for addr, value in entries:
        mem[addr:addr + 8] = u64(value)
    return u64(cr0) + u64(cr3) + u64(cr4) + u64(efer) + u64(va) + bytes(mem)
LONG = (0x80000011, 0x1000, 0x20, 0x500)
# PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x5000; and a 2 MiB page.
tables = [(0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x4008, 0x5003), (0x3008, 0x200083)]
put("gdb_page_walk", "long-4k", walk_seed(*LONG, 0x1008, tables))
put("gdb_page_walk", "long-2m", walk_seed(*LONG, 0x200010, tables))
put("gdb_page_walk", "kernel-text-before-paging", walk_seed(0x11, 0, 0, 0, 0xffffffff81000000, []))
put("gdb_page_walk", "pae", walk_seed(0x80000011, 0x1000, 0x20, 0, 0x40000010, [(0x1008, 0x2001), (0x2000, 0x400081)]))
put("gdb_page_walk", "la57", walk_seed(0x80000011, 0x1000, 0x1020, 0x500, 0x1008, tables + [(0x1000, 0x1003)]))
