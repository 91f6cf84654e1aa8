#!/bin/bash
# Build the Skiff guest kernel from Debian's linux-source package.
#
#   kernel/build.sh [--arch x86_64|arm64] [--check-config] [--print-path]
#
# x86_64 (default): builds vmlinux (PVH entry) and bzImage from `tinyconfig` + config-x86_64.fragment,
# plus vmlinux.sym: the same vmlinux with its symbol table, for GDB (`vmm --gdb`).
# arm64: builds Image (and vmlinux.sym) from `tinyconfig` + config-arm64.fragment, with Debian's
# aarch64-linux-gnu- cross compiler on an x86_64 host.
# --check-config: only runs tinyconfig + fragment + olddefconfig and verifies the options.
# Output is cached outside the checkout, keyed by the hash of every input:
#   ${SKIFF_CACHE:-~/.cache/skiff}/kernel/<arch>-<hash>/{vmlinux,vmlinux.sym,bzImage,config}
#   (arm64: {Image,vmlinux.sym,config})
# A second run with the same inputs is instant. --print-path prints the output dir only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ARCH=x86_64; CHECK_ONLY=0; PRINT=0
while [ $# -gt 0 ]; do
  case $1 in
    --arch) ARCH=$2; shift 2;;
    --check-config) CHECK_ONLY=1; shift;;
    --print-path) PRINT=1; shift;;
    -h|--help) sed -n '2,12p' "$0"; exit 0;;
    *) echo "kernel/build.sh: unknown argument '$1'" >&2; exit 2;;
  esac
done
case $ARCH in x86_64|arm64) ;; *) echo "kernel/build.sh: unsupported arch '$ARCH' (x86_64 or arm64)" >&2; exit 2;; esac
FRAG=$here/config-$ARCH.fragment
[ -f "$FRAG" ] || { echo "kernel/build.sh: missing $FRAG" >&2; exit 2; }
log() { [ "$PRINT" = 1 ] || echo "kernel: $*" >&2; }

SRC_TAR=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [ -z "$SRC_TAR" ]; then
  log "installing Debian's linux-source-6.1 and build tools (one time)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source-6.1 flex bison bc libelf-dev lz4 xz-utils >&2
  SRC_TAR=/usr/src/linux-source-6.1.tar.xz
fi
for t in flex bison bc lz4 gcc make; do
  command -v $t >/dev/null || { log "installing build tools"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq flex bison bc libelf-dev lz4 >&2; break; }
done
SRC_VER=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$SRC_TAR")
HASH=$( { echo "$SRC_VER"; cat "$FRAG" "$here/build.sh"; echo "$CHECK_ONLY"; } | sha256sum | cut -c1-16)
CACHE=${SKIFF_CACHE:-$HOME/.cache/skiff}
OUT=$CACHE/kernel/$ARCH-$HASH
if [ "$CHECK_ONLY" = 1 ]; then OUT=$OUT-check; fi
if [ -f "$OUT/done" ]; then
  [ "$PRINT" = 1 ] && echo "$OUT" || log "cached: $OUT"
  exit 0
fi
WORK=$CACHE/kernel/src-6.1
if [ ! -f "$WORK/.extracted" ]; then
  log "extracting $SRC_TAR (about 1 minute)"
  rm -rf "$WORK"; mkdir -p "$WORK"
  tar -xf "$SRC_TAR" -C "$WORK" --strip-components=1
  touch "$WORK/.extracted"
fi
# One build tree per arch, so a config change rebuilds incrementally.
B=$CACHE/kernel/build-$ARCH
mkdir -p "$B"
cross=()
if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
  if ! command -v aarch64-linux-gnu-gcc >/dev/null && [ "$CHECK_ONLY" = 0 ]; then
    log "installing Debian's aarch64 cross compiler (one time)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >&2
  fi
  if command -v aarch64-linux-gnu-gcc >/dev/null; then cross=(CROSS_COMPILE=aarch64-linux-gnu-); fi
fi
mk() { make -s -C "$WORK" O="$B" ARCH=$ARCH "${cross[@]}" "$@"; }
log "configuring ($ARCH tinyconfig + $(basename "$FRAG"))"
mk tinyconfig >/dev/null
"$WORK/scripts/kconfig/merge_config.sh" -m -O "$B" "$B/.config" "$FRAG" >/dev/null
mk olddefconfig >/dev/null
missing=0
while IFS= read -r line; do
  case $line in
    CONFIG_*=y) grep -qx "$line" "$B/.config" || { echo "kernel/build.sh: option did not land: $line" >&2; missing=1; };;
    "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}; grep -qx "$sym=y" "$B/.config" && { echo "kernel/build.sh: option should be off: $sym" >&2; missing=1; };;
  esac
done < "$FRAG"
[ $missing = 0 ] || { echo "kernel/build.sh: config check failed for $ARCH (see lines above)" >&2; exit 1; }
log "config verified: $(grep -c '=y' "$B/.config") options enabled"
mkdir -p "$OUT.tmp"
cp "$B/.config" "$OUT.tmp/config"
if [ "$CHECK_ONLY" = 0 ]; then
  start=$(date +%s)
  case $ARCH in x86_64) targets=(vmlinux bzImage) ;; arm64) targets=(Image) ;; esac
  log "building ${targets[*]} with $(nproc) jobs (6-11 minutes on 2 cores; progress every 30 s)"
  ( while sleep 30; do log "  still building... $(( $(date +%s) - start )) s, $(find "$B" -name '*.o' | wc -l) objects"; done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
  mk -j"$(nproc)" "${targets[@]}" >"$B/build.log" 2>&1 || { kill $ticker; tail -30 "$B/build.log" >&2; echo "kernel/build.sh: build failed, log in $B/build.log" >&2; exit 1; }
  kill $ticker 2>/dev/null || true
  cp "$B/vmlinux" "$OUT.tmp/vmlinux.sym"
  if [ "$ARCH" = x86_64 ]; then
    strip -o "$OUT.tmp/vmlinux" "$B/vmlinux" 2>/dev/null || cp "$B/vmlinux" "$OUT.tmp/vmlinux"
    cp "$B/arch/x86/boot/bzImage" "$OUT.tmp/bzImage"
  else
    cp "$B/arch/arm64/boot/Image" "$OUT.tmp/Image"
  fi
  log "built in $(( $(date +%s) - start )) s"
fi
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"; touch "$OUT/done"
[ "$PRINT" = 1 ] && echo "$OUT" || log "done: $OUT"
