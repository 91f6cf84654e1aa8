#!/usr/bin/env python3
"""Writes a newc cpio archive (an initramfs) without needing root for device nodes.

usage: mkcpio.py OUT ENTRY...
  ENTRY is one of:  dir:PATH[:MODE]   file:PATH:HOSTFILE[:MODE]   chr:PATH:MAJOR:MINOR[:MODE]
                    sym:PATH:TARGET   @LISTFILE (one entry per line)
"""
import os
import sys


def header(ino, mode, size, name, rmaj=0, rmin=0, nlink=1):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08x" % f for f in fields)


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, entries = sys.argv[1], []
    for a in sys.argv[2:]:
        if a.startswith("@"):
            with open(a[1:]) as f:
                entries += [l.strip() for l in f if l.strip()]
        else:
            entries.append(a)
    data = bytearray()
    for ino, e in enumerate(entries, start=1):
        kind, rest = e.split(":", 1)
        parts = rest.split(":")
        path = parts[0].lstrip("/").encode()
        body, rmaj, rmin = b"", 0, 0
        if kind == "dir":
            mode = 0o040000 | int(parts[1] if len(parts) > 1 else "755", 8)
        elif kind == "file":
            with open(parts[1], "rb") as f:
                body = f.read()
            mode = 0o100000 | int(parts[2] if len(parts) > 2 else "755", 8)
        elif kind == "sym":
            body = parts[1].encode()
            mode = 0o120777
        elif kind == "chr":
            rmaj, rmin = int(parts[1]), int(parts[2])
            mode = 0o020000 | int(parts[3] if len(parts) > 3 else "600", 8)
        else:
            sys.exit(f"mkcpio.py: unknown entry kind '{kind}' in '{e}'")
        h = header(ino, mode, len(body), path, rmaj, rmin)
        data += h + path + b"\0" + pad(len(h) + len(path) + 1) + body + pad(len(body))
    t = header(0, 0, 0, b"TRAILER!!!")
    data += t + b"TRAILER!!!\0" + pad(len(t) + 11)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
