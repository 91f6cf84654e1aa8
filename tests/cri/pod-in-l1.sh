#!/bin/bash
# One CRI pod (skiff-cri) under containerd's CRI plugin with Debian's bridge CNI, in the nested
# VM (or any machine where /etc/cni/net.d and /var/lib/cni may be covered by tmpfs):
#   cargo build --release -p skiff-shim
#   cargo build --release --manifest-path tests/cri/Cargo.toml --target-dir target
#   tools/kvm-vm --rw /tmp/cri -- tests/cri/pod-in-l1.sh "runc skiff" /tmp/cri "$K" "$I" [ROUNDS]
# (K, I: kernel/build.sh --print-path + /vmlinux, kernel/build-initramfs.sh --print-path).
# One containerd; each handler's pod in turn (ROUNDS times, default 1). Writes
# OUT/result-HANDLER[-N].out (skiff-cri's JSON), OUT/containerd.log, OUT/left-HANDLER[-N].out
# (what is left after the pod: links, shims, mounts, run dirs, netns, IPAM leases).
set -u
HANDLERS=$1 OUT=$2 K=$3 I=$4 ROUNDS=${5:-1}
M=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
echo "pod-in-l1: building the images" >&2
R=$OUT/image-root
rm -rf "$R"; mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/proc" "$R/sys" "$R/dev" "$R/root"
cp /bin/busybox "$R/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"; echo 'root:x:0:' > "$R/etc/group"
python3 "$M/tools/mkoci.py" "$R" "$OUT/busybox.tar" docker.io/skiff/busybox:latest
python3 "$M/tools/mkoci.py" "$R" "$OUT/pause.tar" docker.io/skiff/pause:latest \
  --cmd sh --cmd -c --cmd 'trap "exit 0" TERM; while :; do sleep 3600 & wait $!; done'
LAB=$(mktemp -d /tmp/lab.XXXXXX)
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs cni /etc/cni/net.d; mount -t tmpfs cni-cache /var/lib/cni
if [ -e /run/kvm-vm/modroot ]; then
  for m in sch_ingress cls_u32 act_mirred; do modprobe -d "$(cat /run/kvm-vm/modroot)" $m; done
fi
cat > /etc/cni/net.d/10-skiff-pod.conflist <<'EOC'
{"cniVersion": "1.0.0", "name": "skiff-pod", "plugins": [
  {"type": "bridge", "bridge": "skpod0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "/tmp/cni-ipam",
            "ranges": [[{"subnet": "10.88.66.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOC
cat > $LAB/config.toml <<EOC
version = 2
root = "$LAB/root"
state = "$LAB/state"
[grpc]
  address = "$LAB/containerd.sock"
[ttrpc]
  address = "$LAB/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/skiff/pause:latest"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.skiff]
      runtime_type = "io.containerd.skiff.v2"
      pod_annotations = ["io.skiff.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
EOC
env PATH="$M/target/release:$PATH" SKIFF_KERNEL="$K" SKIFF_INITRD="$I" SKIFF_MEMORY_MIB=256 \
  containerd --config $LAB/config.toml > "$OUT/containerd.log" 2>&1 &
CTRD=$!
for n in $(seq 300); do [ -S $LAB/containerd.sock ] && break; sleep 0.1; done
C="timeout -k 10 150 ctr -a $LAB/containerd.sock -n k8s.io"
{ $C images import "$OUT/busybox.tar"; $C images import "$OUT/pause.tar"; } > "$OUT/import.log" 2>&1
echo "import rc=$?" >> "$OUT/import.log"
for round in $(seq "$ROUNDS"); do
  for HANDLER in $HANDLERS; do
    N=$HANDLER; [ "$ROUNDS" = 1 ] || N=$HANDLER-$round
    echo "pod-in-l1: pod under $HANDLER (round $round)" >&2
    timeout -k 10 600 "$M/target/release/skiff-cri" --socket $LAB/containerd.sock --handler "$HANDLER" \
      --image docker.io/skiff/busybox:latest --name "pod-$N" --out "$OUT/$N" > "$OUT/result-$N.out" 2> "$OUT/result-$N.err"
    echo "rc=$?" >> "$OUT/result-$N.err"
    sleep 1
    { echo "== links"; ip -o link show | grep -v ' lo:\| skpod0:\| eth'
      echo "== shims"; pgrep -fa containerd-shim
      echo "== mounts"; grep -e /run/skiff -e /run/containerd/io.containerd.runtime.v2.task /proc/mounts
      echo "== run"; ls /run/skiff 2>/dev/null | grep -v '^boot-slots\|^templates'
      echo "== netns"; ls /var/run/netns 2>/dev/null
      echo "== leases"; ls /tmp/cni-ipam/skiff-pod 2>/dev/null | grep -v 'last_reserved_ip\|lock'
    } > "$OUT/left-$N.out" 2>&1
  done
done
kill $CTRD; wait $CTRD
