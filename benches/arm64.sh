#!/bin/bash
# benches/arm64.sh [--runs N]: arm64 boot phases, Skiff vs qemu-system-aarch64 -M virt -accel kvm,
# with the same Skiff arm64 kernel and initramfs, in one arm64 L1 (tools/kvm-vm --arch arm64).
#
# Builds (each cached by its inputs): the arm64 kernel and initramfs, the static arm64 vmm and
# `boot` bench (cross, aarch64-unknown-linux-musl), and an arm64 QEMU unpacked from Debian's
# packages (tools/build-qemu-arm64). In the L1, everything is copied to tmpfs first so that
# neither side reads its binaries or images over 9p while timed. Figures, not assertions.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=10
case ${1:-} in
  --runs) runs=$2 ;;
  -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "benches/arm64.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
say() { echo "benches/arm64.sh: $*" >&2; }
say "building the arm64 kernel, initramfs, vmm, boot bench and QEMU (cached after the first time)"
kernel/build.sh --arch arm64 >&2
kernel/build-initramfs.sh --arch arm64 >&2
K=$(kernel/build.sh --arch arm64 --print-path)/Image
I=$(kernel/build-initramfs.sh --arch arm64 --print-path)
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
cargo build -q --release --target aarch64-unknown-linux-musl -p skiff-vmm --bin vmm
cargo build -q --release --target aarch64-unknown-linux-musl -p skiff-benches --bin boot
Q=$(tools/build-qemu-arm64)
qdir=$(dirname "$Q")
t=target/aarch64-unknown-linux-musl/release
say "running $runs interleaved rounds in the arm64 L1 (TCG: slow; about $((runs * 25 + 60)) s)"
exec tools/kvm-vm --arch arm64 --timeout 3000 --ro "$(dirname "$K")" --ro "$(dirname "$I")" --ro "$qdir" -- sh -c "
  set -e
  cp $K /tmp/Image; cp $I /tmp/initrd; cp $t/vmm $t/boot /tmp/
  mkdir /tmp/q; cp -a $qdir/. /tmp/q/
  export HOME=/tmp SKIFF_TEMPLATES=/tmp/templates
  /tmp/boot --runs $runs --vmm /tmp/vmm --qemu /tmp/q/qemu-system-aarch64 --linux /tmp/Image /tmp/initrd"
