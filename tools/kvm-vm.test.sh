#!/bin/bash
# Quick self-test of tools/kvm-vm. Two L1 boots (~5 s each under TCG, plus the one-time image
# build on a fresh cache):
#   run 1: exit status, byte-exact stdout/stderr separation, argv quoting, cwd, environment,
#          --rw write-back (via a relative path from the cwd), real KVM inside (kvm_amd loaded,
#          no kvm_pvm, KVM_CREATE_VM works), the L1 mounts, and a nested kvm-vm call (execs
#          directly inside L1);
#   run 2: streaming (output arrives while CMD still runs), a bulk byte-exact stdout, the
#          whole-run timeout (exit 124 + message), and a cwd below /tmp without --rw (shared
#          read-only at the same path);
#   run 3 (PVM hosts): a wedged L1 (CMD stops every other process, the heartbeat with them)
#          is found by the missing heartbeat: exit 125 well before --timeout.
# Before them, --dry-run checks of the shares (no boot).
# On a host with hardware KVM, kvm-vm execs directly and most checks still apply.
# usage: tools/kvm-vm.test.sh        (exit 0 = all passed)
set -u
here=$(cd "$(dirname "$0")" && pwd)
KVM_VM=$here/kvm-vm
fails=0
ok()   { echo "ok   - $*"; }
bad()  { echo "FAIL - $*"; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

t=$(mktemp -d "${TMPDIR:-/tmp}/kvm-vm-test.XXXXXX")
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/rw/cwd dir" "$t/plain dir/sub"
echo "visible read-only" > "$t/plain dir/sub/marker"

# ---- dry runs: what L1 would show of the host (no boot) ------------------------------------------
if [ -d /sys/module/kvm_pvm ]; then
  has_line() { grep -qxF "$2" <<< "$1"; }
  dry=$(cd "$t/plain dir/sub" && "$KVM_VM" --dry-run --rw "$t/rw" -- true)
  check "dry run: a cwd below /tmp is shared read-only" has_line "$dry" "read-only share: $t/plain dir/sub"
  check "dry run: --rw listed" has_line "$dry" "writable share: $t/rw"
  checkout=$(cd "$here/.." && pwd -P)
  case $checkout in
    /tmp/*|/run/*|/dev/shm/*)
      check "dry run: the checkout below /tmp is shared read-only" has_line "$dry" "read-only share: $checkout" ;;
  esac
  dry=$(cd "$t/rw/cwd dir" && "$KVM_VM" --dry-run --rw "$t/rw" --ro "$t/plain dir" --ro "$t/plain dir/sub" -- true)
  check "dry run: a cwd below a --rw dir needs no read-only share" bash -c '! grep -qF "read-only share: $1" <<< "$2"' _ "$t/rw" "$dry"
  check "dry run: --ro below /tmp shared, nested --ro folded into it" \
    test "$(grep -cF "read-only share: $t/plain dir" <<< "$dry")" = 1
fi

# ---- run 1 --------------------------------------------------------------------------------------
arg1="arg with spaces and a ' single quote"
arg2='$HOME "double" \back `tick` *'
val=$'value with spaces, \'quotes\', "dq", $dollar, \\ and a\nnewline'
inner='
out=$1; shift
{
  printf "argc=%s\n" "$#"
  for a in "$@"; do printf "arg=[%s]\n" "$a"; done
  printf "cwd=%s\n" "$(pwd -P)"
  printf "var=[%s]\n" "$KVMVM_TEST_VAR"
  printf "path=%s\n" "$PATH"
  printf "inside=%s\n" "${SKIFF_IN_KVM_VM:-}"
  [ -d /sys/module/kvm_amd ] && echo kvm_amd=present
  echo "npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) vgif=$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null)"
  [ -d /sys/module/kvm_pvm ] && echo kvm_pvm=present
  [ -c /dev/kvm ] && echo dev_kvm=char
  /usr/bin/python3 -c "import fcntl,os; f=os.open(\"/dev/kvm\",os.O_RDWR); v=fcntl.ioctl(f,0xAE00); vm=fcntl.ioctl(f,0xAE01,0); print(\"kvm_api=%d create_vm=%s\" % (v, vm >= 0))"
  for m in /dev/pts /dev/shm /sys/fs/cgroup /run /tmp; do
    printf "mount %s %s\n" "$m" "$(awk -v m="$m" "\$2==m{t=\$3} END{print t}" /proc/mounts)"
  done
  touch /probe-ro 2>/dev/null && echo root=writable || echo root=readonly
  "$KVMVM_TOOL" -- sh -c "exit 7"; echo nested_rc=$?
} > "$out" 2>&1
echo "written via a relative path" > rel.txt
printf "a\nb"
printf "to stderr\n" >&2
exit 42'
s1=$(date +%s.%N)
(cd "$t/rw/cwd dir" && KVMVM_TEST_VAR=$val KVMVM_TOOL=$KVM_VM env 'BAD-NAME=x' \
   "$KVM_VM" --rw "$t/rw" -- sh -c "$inner" sh "$t/rw/result" "$arg1" "$arg2" \
   > "$t/stdout" 2> "$t/stderr")
rc=$?
e1=$(date +%s.%N)
echo "# run 1: $(echo "$e1 - $s1" | bc) s"

check "exit status 42 passed through (got $rc)" [ "$rc" = 42 ]
printf 'a\nb' > "$t/want-stdout"
check "stdout is exactly 'a\\nb'" cmp -s "$t/stdout" "$t/want-stdout"
# stderr: CMD's line; kvm-vm's own progress lines (only when building) start with "kvm-vm:"
grep -v '^kvm-vm:\|^Get:\|^Fetched\|^W: Download' "$t/stderr" > "$t/stderr-cmd"
check "stderr carries CMD's stderr exactly" cmp -s "$t/stderr-cmd" <(printf 'to stderr\n')
r=$t/rw/result
if [ -f "$r" ]; then
  check "argc" grep -qx 'argc=2' "$r"
  check "argument with spaces and a single quote" grep -qxF "arg=[$arg1]" "$r"
  check "argument with \$, \", \\, \`, *" grep -qxF "arg=[$arg2]" "$r"
  check "cwd passed" grep -qxF "cwd=$t/rw/cwd dir" "$r"
  want_var=$(printf 'var=[%s]' "$val")
  contains() { [[ $(cat "$1") == *"$2"* ]]; }
  check "env var with quotes/newline passed" contains "$r" "$want_var"
  check "PATH passed" grep -qxF "path=$PATH" "$r"
  check "--rw write-back through the cwd" grep -qx 'written via a relative path' "$t/rw/cwd dir/rel.txt"
  if [ -d /sys/module/kvm_pvm ]; then
    check "inside L1: SKIFF_IN_KVM_VM=1" grep -qx 'inside=1' "$r"
    check "inside L1: kvm_amd loaded" grep -qx 'kvm_amd=present' "$r"
    check "inside L1: kvm_amd npt=0 vgif=0 (the substrate defaults)" grep -qx 'npt=[N0] vgif=0' "$r"
    check "inside L1: no kvm_pvm" bash -c "! grep -q kvm_pvm=present '$r'"
    check "inside L1: host / read-only" grep -qx 'root=readonly' "$r"
    for m in "/dev/pts devpts" "/dev/shm tmpfs" "/sys/fs/cgroup cgroup2" "/run tmpfs" "/tmp tmpfs"; do
      check "inside L1: mount $m" grep -qx "mount $m" "$r"
    done
  fi
  check "/dev/kvm works (KVM_GET_API_VERSION=12, KVM_CREATE_VM)" grep -qx 'kvm_api=12 create_vm=True' "$r"
  check "nested kvm-vm execs directly (rc 7)" grep -qx 'nested_rc=7' "$r"
else
  bad "no result file written through --rw"
fi
if [ "$fails" -gt 0 ]; then
  echo "--- stderr of run 1:"; cat "$t/stderr"; echo "--- result:"; cat "$r" 2>/dev/null
fi

# ---- run 2: streaming, bulk output, timeout -------------------------------------------------------
s2=$(date +%s.%N)
(cd "$t/plain dir/sub" &&
 "$KVM_VM" --timeout 20 -- sh -c 'cat marker >&2; touch new 2>/dev/null && echo cwd-writable >&2
   seq 1 100000; echo first-marker; sleep 600; echo never') \
  2> "$t/stderr2" | while IFS= read -r line; do
    [ "$line" = first-marker ] && date +%s.%N > "$t/first-at"
    printf '%s\n' "$line"
  done > "$t/stdout2"
rc2=${PIPESTATUS[0]}
check "cwd below /tmp without --rw: visible (got its file)" grep -qx 'visible read-only' "$t/stderr2"
if [ -d /sys/module/kvm_pvm ]; then
  check "cwd below /tmp without --rw: read-only" bash -c "! grep -qx cwd-writable '$t/stderr2'"
fi
e2=$(date +%s.%N)
echo "# run 2: $(echo "$e2 - $s2" | bc) s"
check "timeout: exit 124 (got $rc2)" [ "$rc2" = 124 ]
check "timeout: message on stderr" grep -q '^kvm-vm: timed out' "$t/stderr2"
check "bulk stdout byte-exact (seq 1 100000, 588,895 bytes)" cmp -s "$t/stdout2" <(seq 1 100000; echo first-marker)
if [ -f "$t/first-at" ]; then
  lead=$(echo "$e2 - $(cat "$t/first-at")" | bc)
  check "streaming: output arrived ${lead} s before the end" [ "$(echo "$lead > 5" | bc)" = 1 ]
else
  bad "streaming: marker line never arrived"
fi
[ "$rc2" = 124 ] || { echo "--- stderr of run 2:"; cat "$t/stderr2"; }

# wedge_run N WHAT MESSAGE ENV CMD: kvm-vm must find a (simulated) wedge of L1 within 60 s,
# exit 125 and say MESSAGE on stderr (ENV: one VAR=VALUE for kvm-vm, or "").
wedge_run() {
  local n=$1 what=$2 msg=$3 envs=$4 cmd=$5 s rc e
  s=$SECONDS
  env $envs "$KVM_VM" --timeout 300 -- sh -c "$cmd" > "$t/stdout$n" 2> "$t/stderr$n"
  rc=$? e=$((SECONDS - s))
  echo "# run $n: $e s"
  check "$what: exit 125 (got $rc)" [ "$rc" = 125 ]
  check "$what: found within 60 s, not at --timeout (took $e s)" [ "$e" -lt 60 ]
  check "$what: message on stderr" grep -q "^kvm-vm: $msg" "$t/stderr$n"
  [ "$rc" = 125 ] || { echo "--- stderr of run $n:"; cat "$t/stderr$n"; }
}
if [ -d /sys/module/kvm_pvm ]; then
  # ---- run 3: a wedged L1 (simulated: everything but CMD and init stopped, so the heartbeat too)
  wedge_run 3 "wedged L1" "L1 stopped responding" KVM_VM_STALL_TIMEOUT=10 \
    'echo stopping; kill -STOP -1; sleep 250'
  # ---- run 4: a half-wedged L1 (simulated: the watchdog line of a CPU stuck for 99 s on L1's
  # console while the heartbeat goes on)
  wedge_run 4 "half-wedged L1" "an L1 CPU is stuck" "" \
    'echo "watchdog: BUG: soft lockup - CPU#0 stuck for 99s! [vcpu0:1]" > /dev/ttyS0; sleep 250'
fi

echo
if [ "$fails" = 0 ]; then echo "kvm-vm self-test: all passed"; else echo "kvm-vm self-test: $fails failed"; fi
[ "$fails" = 0 ]
