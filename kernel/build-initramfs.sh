#!/bin/bash
# Build the Skiff initramfs: the static guest agent as /init, plus /dev/console.
#
#   kernel/build-initramfs.sh [--arch x86_64|arm64] [--print-path]
#
# Builds skiff-agent for x86_64-unknown-linux-musl (arm64: aarch64-unknown-linux-musl, linked
# with Debian's aarch64-linux-gnu-gcc; busybox from busybox-static:arm64, downloaded and
# unpacked into the cache, not installed), static, then writes an uncompressed newc
# cpio with the agent as /init and a busybox root filesystem at /rootfs (the default container
# rootfs of `vmm run` until host directories are shared over virtio-fs); a cpio (uncompressed: decompression is a large share of an emulated boot). Output, cached by
# the agent binary's hash: ${SKIFF_CACHE:-~/.cache/skiff}/initramfs/<hash>/initramfs.cpio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
PRINT=0 ARCH=x86_64
while [ $# -gt 0 ]; do
  case $1 in
    --print-path) PRINT=1; shift ;;
    --arch) ARCH=$2; shift 2 ;;
    *) echo "kernel/build-initramfs.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
log() { [ "$PRINT" = 1 ] || echo "initramfs: $*" >&2; }
case $ARCH in
  x86_64) TARGET=x86_64-unknown-linux-musl ;;
  arm64|aarch64) ARCH=arm64 TARGET=aarch64-unknown-linux-musl
    command -v aarch64-linux-gnu-gcc >/dev/null || {
      log "installing Debian's aarch64 cross compiler (one time)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >&2; }
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc ;;
  *) echo "kernel/build-initramfs.sh: --arch $ARCH: x86_64 or arm64" >&2; exit 2 ;;
esac
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
# The applet list comes from the host's busybox (the same Debian version for both arches).
APPLETS=$BUSYBOX
if [ "$ARCH" = arm64 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || {
    log "adding Debian's arm64 architecture (package lists only)"
    dpkg --add-architecture arm64; apt-get update -qq >&2; }
  ver=$(apt-cache show --no-all-versions busybox-static:arm64 | sed -n 's/^Version: //p' | head -1)
  bbdir=${SKIFF_CACHE:-$HOME/.cache/skiff}/busybox-arm64/${ver//[:~]/_}
  if [ ! -x "$bbdir/bin/busybox" ]; then
    log "downloading busybox-static:arm64 $ver"
    rm -rf "$bbdir.tmp"; mkdir -p "$bbdir.tmp"
    (cd "$bbdir.tmp" && apt-get -q download "busybox-static:arm64=$ver" >&2 && dpkg-deb -x busybox-static_*.deb x)
    mkdir -p "$bbdir/bin"; cp "$bbdir.tmp/x/bin/busybox" "$bbdir/bin/busybox"; rm -rf "$bbdir.tmp"
  fi
  BUSYBOX=$bbdir/bin/busybox
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
    "$APPLETS" --list-full | while read -r a; do
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
