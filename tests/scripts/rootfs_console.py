#!/usr/bin/env python3
"""Boots `vmm --kernel K --rootfs DIR[:ro]` with /bin/sh as init and types one command line at
its console once the shell's prompt shows, as a person would.

usage: rootfs_console.py VMM KERNEL ROOTFS_ARG COMMAND OUT_JSON
Writes {"status": ..., "output": ...} to OUT_JSON. Every wait is bounded.
"""
import json, os, select, subprocess, sys, time

vmm, kernel, rootfs, command, out_json = sys.argv[1:6]
cmdline = ("console=ttyS0 reboot=k,panic_warm panic=-1 pci=off nomodules "
           "root=rootfs rootfstype=virtiofs %s init=/bin/sh"
           % ("ro" if rootfs.endswith(":ro") else "rw"))
p = subprocess.Popen([vmm, "--kernel", kernel, "--rootfs", rootfs, "--cmdline", cmdline],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
out = b""
def read_until(token, limit):
    global out
    end = time.time() + limit
    while token not in out and time.time() < end:
        r, _, _ = select.select([p.stdout], [], [], 0.5)
        if r:
            b = os.read(p.stdout.fileno(), 4096)
            if not b:
                break
            out += b
    return token in out
prompt = read_until(b"# ", 180)
if prompt:
    p.stdin.write(command.encode() + b"\n")
    p.stdin.flush()
try:
    status = p.wait(timeout=120)
except subprocess.TimeoutExpired:
    p.kill()
    status = "hung"
read_until(b"\x00", 1)
json.dump({"prompt": prompt, "status": status, "output": out.decode(errors="replace")},
          open(out_json, "w"))
