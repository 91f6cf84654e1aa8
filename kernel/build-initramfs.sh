#!/bin/bash
# Build the Skiff initramfs: the static guest agent as /init, plus /dev/console.
#
#   kernel/build-initramfs.sh [--print-path]
#
# Builds skiff-agent for x86_64-unknown-linux-musl (static), then writes an uncompressed newc
# cpio with the agent as /init and a busybox root filesystem at /rootfs (the default container
# rootfs of `vmm run` until host directories are shared over virtio-fs); a cpio (uncompressed: decompression is a large share of an emulated boot). Output, cached by
# the agent binary's hash: ${SKIFF_CACHE:-~/.cache/skiff}/initramfs/<hash>/initramfs.cpio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
PRINT=0; [ "${1:-}" = --print-path ] && PRINT=1
log() { [ "$PRINT" = 1 ] || echo "initramfs: $*" >&2; }
TARGET=x86_64-unknown-linux-musl
if ! rustup target list --installed 2>/dev/null | grep -qx $TARGET; then
  log "adding rust target $TARGET (one time)"
  rustup target add $TARGET >&2
fi
log "building skiff-agent ($TARGET, static)"
(cd "$root" && cargo build --quiet --release -p skiff-agent --target $TARGET >&2)
AGENT=$root/target/$TARGET/release/skiff-agent
BUSYBOX=/bin/busybox
if ! file "$BUSYBOX" 2>/dev/null | grep -q "statically linked"; then
  log "installing Debian's busybox-static (one time)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2
fi
HASH=$( { sha256sum "$AGENT" "$BUSYBOX" "$root/tools/mkcpio.py" "$0"; } | sha256sum | cut -c1-16)
OUT=${SKIFF_CACHE:-$HOME/.cache/skiff}/initramfs/$HASH
if [ ! -f "$OUT/initramfs.cpio" ]; then
  mkdir -p "$OUT"
  list=$OUT/rootfs.list
  {
    for d in rootfs rootfs/bin rootfs/sbin rootfs/usr rootfs/usr/bin rootfs/usr/sbin rootfs/etc \
             rootfs/proc rootfs/sys rootfs/dev rootfs/root rootfs/home rootfs/var; do echo "dir:/$d"; done
    echo "dir:/rootfs/tmp:1777"
    echo "file:/rootfs/bin/busybox:$BUSYBOX:755"
    "$BUSYBOX" --list-full | while read -r a; do
      case $a in bin/busybox) continue;; esac
      echo "sym:/rootfs/$a:/bin/busybox"
    done
  } > "$list"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nuser:x:1000:1000:user:/home:/bin/sh\n' > "$OUT/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\nuser:x:1000:\n' > "$OUT/group"
  python3 "$root/tools/mkcpio.py" "$OUT/initramfs.cpio" \
    dir:/dev dir:/proc dir:/sys dir:/tmp:1777 dir:/run dir:/root:700 \
    chr:/dev/console:5:1 chr:/dev/null:1:3:666 \
    file:/init:"$AGENT":755 @"$list" \
    file:/rootfs/etc/passwd:"$OUT/passwd":644 file:/rootfs/etc/group:"$OUT/group":644
  log "wrote $OUT/initramfs.cpio ($(stat -c %s "$OUT/initramfs.cpio") bytes)"
fi
[ "$PRINT" = 1 ] && echo "$OUT/initramfs.cpio" || log "done: $OUT/initramfs.cpio"
