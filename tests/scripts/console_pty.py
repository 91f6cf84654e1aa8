#!/usr/bin/env python3
"""Drives `vmm --kernel GUEST` on a pseudo-terminal, as a person at a terminal would.

usage: console_pty.py MODE VMM GUEST
  echo   (tests/guests/echo.S) waits for "ready>", types "ab", expects "AB"; types Ctrl-C
         (raw mode: a byte for the guest, no SIGINT), expects it echoed; types Ctrl-A x,
         expects the VMM to end with status 0.
  panic  (a guest that ends with a panic-style reset) waits for the VMM to end.
Prints one JSON object: the exit status, whether the terminal was raw while the VM ran,
whether its settings after equal those before, and the output. Every wait is bounded.
"""
import json, os, pty, select, subprocess, sys, termios, time

mode, vmm, guest = sys.argv[1:4]
master, slave = pty.openpty()
before = termios.tcgetattr(slave)
p = subprocess.Popen([vmm, "--kernel", guest], stdin=slave, stdout=slave, stderr=slave,
                     close_fds=True, start_new_session=True)
out = b""
raw_seen = None

def read_until(token, limit=20.0):
    global out
    end = time.time() + limit
    while token not in out and time.time() < end:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                b = os.read(master, 4096)
            except OSError:
                return False
            if not b:
                return False
            out += b
    return token in out

def lflag():
    return termios.tcgetattr(slave)[3]

result = {"mode": mode}
if mode == "echo":
    ok = read_until(b"ready>")
    raw_seen = not (lflag() & (termios.ICANON | termios.ISIG | termios.ECHO))
    os.write(master, b"ab")
    ok = ok and read_until(b"AB")
    os.write(master, b"\x03")
    ok = ok and read_until(b"AB\x03")
    result["alive_after_ctrl_c"] = p.poll() is None
    os.write(master, b"\x01x")
    result["steps_ok"] = ok
try:
    status = p.wait(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    status = "hung"
read_until(b"\x00", 0.5)
result.update({
    "status": status,
    "raw_while_running": raw_seen,
    "restored": termios.tcgetattr(slave) == before,
    "output": out.decode(errors="replace"),
})
print(json.dumps(result))
