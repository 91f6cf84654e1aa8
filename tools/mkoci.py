#!/usr/bin/env python3
"""Write a one-layer OCI image layout tarball from a root filesystem directory, without a
registry or any tool beyond Python's standard library (for `ctr images import`).

  tools/mkoci.py ROOTFS_DIR OUT.tar NAME [--cmd ARG]... [--user U] [--env K=V]... [--workdir D]

NAME (e.g. docker.io/skiff/busybox:latest) goes into the index annotation
io.containerd.image.name, so `ctr images import OUT.tar` names the image by itself.
"""
import gzip, hashlib, io, json, os, sys, tarfile

def main():
    a = sys.argv[1:]
    if len(a) < 3:
        sys.exit(__doc__)
    root, out, name = a[0], a[1], a[2]
    cmd, env, user, workdir = [], ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "", "/"
    i = 3
    while i < len(a):
        k, v = a[i], a[i + 1]
        if k == "--cmd": cmd.append(v)
        elif k == "--env": env.append(v)
        elif k == "--user": user = v
        elif k == "--workdir": workdir = v
        else: sys.exit(f"mkoci: unknown option {k}")
        i += 2
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort(); files.sort()
            for n in dirs + files:
                p = os.path.join(dirpath, n)
                ti = t.gettarinfo(p, arcname=os.path.relpath(p, root))
                ti.mtime = 0
                if ti.isfile():
                    with open(p, "rb") as f:
                        t.addfile(ti, f)
                else:
                    t.addfile(ti)
    layer_raw = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_raw).hexdigest()
    layer = gzip.compress(layer_raw, mtime=0)
    blobs = {}
    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return "sha256:" + d, len(data)
    ld, ls = blob(layer)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": env, "Cmd": cmd or ["/bin/sh"], "WorkingDir": workdir, "User": user},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    cd, cs = blob(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]}
    md, ms = blob(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        "platform": {"architecture": "amd64", "os": "linux"}}]}
    with tarfile.open(out, "w") as t:
        def add(name, data):
            ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0
            t.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            add(f"blobs/sha256/{d}", data)

main()
