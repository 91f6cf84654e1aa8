#!/usr/bin/env python3
"""A GDB remote-protocol client that checks Ctrl-C on `vmm --gdb`: continue, wait, send the
interrupt byte, expect a stop, read RIP and the memory at RIP, then detach (or kill).

usage: gdb_interrupt.py HOST:PORT|SOCKET_PATH RUN OUT_JSON detach|kill [ELF]
RUN is how long the guest runs before the interrupt: seconds, or FILE~TEXT (until FILE
contains TEXT, at most 120 s).
Writes {"threads": [...], "stop": reply, "rip": int, "code": hex bytes read at rip,
"elf_code": the ELF's bytes at that virtual address (with ELF), "end": reply} to OUT_JSON.
Every wait is bounded.
"""
import json, socket, struct, sys, time

addr, run, out_json, end_with = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
elf = sys.argv[5] if len(sys.argv) > 5 else None

def elf_bytes(path, vaddr, n):
    """n bytes of a 64-bit ELF's PT_LOAD segment at virtual address vaddr (None if absent)."""
    with open(path, "rb") as f:
        data = f.read()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= vaddr and vaddr + n <= p_vaddr + p_filesz:
            o = p_offset + vaddr - p_vaddr
            return data[o:o + n].hex()
    return None
deadline = time.time() + 60
s = None
while s is None:
    try:
        if "/" in addr:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(addr)
        else:
            host, port = addr.rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=5)
    except OSError:
        s = None
        if time.time() > deadline:
            raise
        time.sleep(0.2)
s.settimeout(30)
buf = b""

def send(body):
    s.sendall(b"$%s#%02x" % (body, sum(body) & 0xff))

def reply():
    """The next packet's body (acks are skipped; each packet is acked)."""
    global buf
    while True:
        while buf.startswith(b"+"):
            buf = buf[1:]
        if buf.startswith(b"$") and b"#" in buf and len(buf) >= buf.index(b"#") + 3:
            i = buf.index(b"#")
            body, buf = buf[1:i], buf[i + 3:]
            s.sendall(b"+")
            return body
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("the stub closed the connection")
        buf += chunk

def unrle(body):
    """Undoes the protocol's run-length encoding: `X*n` repeats X (ord(n) - 29) more times."""
    out, i = [], 0
    while i < len(body):
        if body[i] == "*" and out:
            out.append(out[-1] * (ord(body[i + 1]) - 29))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)

def cmd(body):
    send(body)
    return reply()

result = {"first": cmd(b"?").decode()}
threads = cmd(b"qfThreadInfo").decode()
while threads.startswith("m"):
    result.setdefault("threads", []).extend(threads[1:].split(","))
    threads = cmd(b"qsThreadInfo").decode()
send(b"vCont;c")
if "~" in run:
    path, text = run.split("~", 1)
    until = time.time() + 120
    while time.time() < until:
        try:
            if text in open(path, errors="replace").read():
                break
        except OSError:
            pass
        time.sleep(0.1)
    result["waited_for"] = text
else:
    time.sleep(float(run))
s.sendall(b"\x03")
result["stop"] = reply().decode()
g = unrle(cmd(b"g").decode())
regs = bytes.fromhex(g[:272].replace("x", "0"))
# x86_64 register file: 16 x 8-byte GPRs, then RIP (8 bytes, little-endian).
rip = int.from_bytes(regs[128:136], "little")
result["rip"] = rip
result["code"] = unrle(cmd(b"m%x,10" % rip).decode())
if elf:
    result["elf_code"] = elf_bytes(elf, rip, 16)
if end_with == "kill":
    send(b"k")
    try:
        result["end"] = reply().decode()
    except (EOFError, OSError) as e:
        result["end"] = "closed: %s" % e
else:
    result["end"] = cmd(b"D").decode()
json.dump(result, open(out_json, "w"))
print(json.dumps(result))
