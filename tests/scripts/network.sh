#!/bin/bash
# Networking end to end, run inside one nested VM (tools/kvm-vm) by tests/tests/network.rs.
#   network.sh OUT   (env: SKIFF_VMM, SKIFF_KERNEL, SKIFF_INITRD)
# Every server listens on 127.0.0.1 or inside a namespace made here; every wait is bounded.
# Each case writes OUT/<case>.rc and OUT/<case>.out; the Rust side checks them.
set -u
OUT=$1; export OUT
VMM=$SKIFF_VMM
cd "$OUT" || exit 1
# A retry after a wedged L1 (the harness reruns this script) skips the cases that finished
# before, except the last one (the substrate may already have been failing under it).
isdone() { grep -qx "$1" "$OUT/.done" 2>/dev/null; }
if [ -e "$OUT/.done" ]; then
  head -n -1 "$OUT/.done" > "$OUT/.done.tmp"; mv "$OUT/.done.tmp" "$OUT/.done"
  echo "resuming: $(wc -l < "$OUT/.done") cases finished before" >&2
fi
res() {
  n=$1; shift
  if isdone "$n"; then echo "case $n: done before" >&2; return; fi
  "$@" > "$OUT/$n.out" 2>&1; echo $? > "$OUT/$n.rc"; echo "case $n: $(cat $OUT/$n.rc)" >&2
  echo "$n" >> "$OUT/.done"
}
# L1 has no link at all: give it what a networked host has (passt copies its configuration).
ip link set lo up
ip link add sk0 type veth peer name sk1 && ip addr add 192.0.2.1/24 dev sk0 \
  && ip link set sk0 up && ip link set sk1 up && ip route add default via 192.0.2.254 \
  || echo "host network setup failed" >&2
# Host tools inside a container: the host's /usr over the busybox root (merged /usr).
HOSTUSR="-v /usr:/usr:ro -v /usr/lib:/lib:ro -v /usr/lib64:/lib64:ro"
python3 - <<'PY' &
import socket, threading, struct
def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 9999))
    while True:
        d, a = s.recvfrom(65535); s.sendto(b"echo:" + d, a)
def dns():
    # Answers A queries for *.skiff.test with 198.51.100.7, NXDOMAIN otherwise.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 53))
    while True:
        q, a = s.recvfrom(512)
        if len(q) < 12: continue
        i = 12; labels = []
        while i < len(q) and q[i] != 0:
            labels.append(q[i+1:i+1+q[i]].decode(errors="replace")); i += 1 + q[i]
        qtype = struct.unpack(">H", q[i+1:i+3])[0] if i + 3 <= len(q) else 0
        question = q[12:i+5]; name = ".".join(labels)
        ok = name.endswith("skiff.test")
        ans = b""
        if ok and qtype == 1:
            ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([198, 51, 100, 7])
        flags = 0x8180 if ok else 0x8183
        hdr = q[:2] + struct.pack(">HHHHH", flags, 1, 1 if ans else 0, 0, 0)
        s.sendto(hdr + question + ans, a)
for f in (udp_echo, dns): threading.Thread(target=f, daemon=True).start()
threading.Event().wait()
PY
SRV=$!
# A sink: receives one TCP stream on ADDR:PORT, writes "<sha256> <bytes>" to FILE (bounded waits).
cat > /tmp/sink.py <<'PY'
import hashlib, socket, sys
addr, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind((addr, port)); l.listen(1)
l.settimeout(600); c, _ = l.accept(); c.settimeout(120); h = hashlib.sha256(); n = 0
try:
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
except OSError as e:
    print(f"sink {port}: {e!r} after {n} bytes", file=sys.stderr)
open(path, "w").write(f"{h.hexdigest()} {n}\n")
PY
# Made once per test run: a resumed attempt (new L1) sees the same file and the same 256 MiB.
[ -s "$OUT/file.txt" ] || echo "served-$$-$RANDOM" > "$OUT/file.txt"
[ -s "$OUT/big.seed" ] || echo "$$$RANDOM" > "$OUT/big.seed"
python3 -c 'import random, sys
r = random.Random(int(sys.argv[1]))
with open("/tmp/big", "wb") as f:
    for _ in range(256): f.write(r.randbytes(1 << 20))' "$(cat "$OUT/big.seed")"
sha256sum < /tmp/big | cut -d' ' -f1 > "$OUT/big.sha"
python3 -m http.server 8000 --bind 127.0.0.1 --directory "$OUT" > /dev/null 2>&1 &
HTTP=$!
python3 -m http.server 8001 --bind 127.0.0.1 --directory /tmp > /dev/null 2>&1 &
HTTPBIG=$!
for i in $(seq 50); do wget -q -O /dev/null http://127.0.0.1:8000/file.txt 2>/dev/null && break; sleep 0.2; done
V="timeout -k 5 180 $VMM run"

# Outbound TCP through passt's gateway mapping (10.0.2.2 = the host's loopback).
# Warm (the default): the VM is restored from a template made with a network card; the card
# gets the run's MAC address. Then the same with --cold (the kernel boots).
for c in tcp tcp_cold; do
  res $c $V --timings $([ $c = tcp_cold ] && echo --cold) --hostname box -- sh -c 'wget -q -O - http://10.0.2.2:8000/file.txt; hostname; cat /etc/hostname; ip -o -4 addr show eth0; ip route; echo "mac $(cat /sys/class/net/eth0/address)"'
done
# Published ports: two VMs at once, each with its own host port.
for p in 1 2; do
  $V -p 127.0.0.1:1808$p:80 -- sh -c "mkdir -p /www; echo from-container-$p > /www/index.html; httpd -f -p 80 -h /www & sleep 60" > "$OUT/pub$p.vm" 2>&1 &
  eval "PUB$p=\$!"
done
for p in 1 2; do
  for i in $(seq 120); do wget -q -O - http://127.0.0.1:1808$p/index.html > "$OUT/publish$p.out" 2>/dev/null && break; sleep 0.5; done
  wget -q -O - http://127.0.0.1:1808$p/index.html > "$OUT/publish$p.out" 2>&1; echo $? > "$OUT/publish$p.rc"
done
kill $PUB1 $PUB2 2>/dev/null; wait $PUB1 $PUB2 2>/dev/null
# UDP round trip to an echo server on the host's loopback (the host's python in the container).
res udp $V $HOSTUSR -- /usr/bin/python3 -c '
import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
s.sendto(b"ping-udp", ("10.0.2.2", 9999)); print(s.recvfrom(100)[0].decode())'
# DNS: a made-up name through the resolver the container was given.
res dns $V --dns 10.0.2.2 -- sh -c 'cat /etc/resolv.conf; nslookup made-up.skiff.test'
# 256 MiB host -> container (random data, sha256 in the container), and container -> host (the
# same file, shared read-only, sent with nc to a sink on the host's loopback; sha256 there).
VBIG="timeout -k 5 420 $VMM run --memory 512"
res big_in $VBIG -- sh -c 'wget -q -O - http://10.0.2.2:8001/big | sha256sum'
SINK=""
isdone big_out || { rm -f "$OUT/big_out.sha"; python3 /tmp/sink.py 127.0.0.1 9000 "$OUT/big_out.sha" & SINK=$!; }
for i in $(seq 100); do isdone big_out || ss -ltn | grep -q ':9000 ' && break; sleep 0.2; done
res big_out $VBIG -v /tmp:/data:ro -- sh -c 'nc 10.0.2.2 9000 < /data/big'
for i in $(seq 100); do [ -s "$OUT/big_out.sha" ] && break; sleep 0.2; done; [ -z "$SINK" ] || kill $SINK 2>/dev/null
# tap: in a namespace made here, a tap with an address and a server behind it.
ip netns add sknet
ip -n sknet link set lo up
ip -n sknet tuntap add sktap0 mode tap vnet_hdr
ln -sf /tmp/big "$OUT/tapbig"
ip -n sknet addr add 10.9.0.1/24 dev sktap0
ip -n sknet link set sktap0 up
ip netns exec sknet python3 -m http.server 8002 --bind 10.9.0.1 --directory "$OUT" > /dev/null 2>&1 &
TAPSRV=$!
for i in $(seq 100); do ip netns exec sknet wget -q -O /dev/null http://10.9.0.1:8002/file.txt 2>/dev/null && break; sleep 0.2; done
res tap ip netns exec sknet $V --timings --net tap:sktap0 --ip 10.9.0.2/24 --gateway 10.9.0.1 -- sh -c 'wget -q -O - http://10.9.0.1:8002/file.txt; echo "mac $(cat /sys/class/net/eth0/address)"'
res tapbig ip netns exec sknet $VBIG --net tap:sktap0 --ip 10.9.0.2/24 --gateway 10.9.0.1 -- sh -c 'wget -q -O - http://10.9.0.1:8002/tapbig | sha256sum'
SINK=""
isdone tapbig_out || { rm -f "$OUT/tapbig_out.sha"; ip netns exec sknet python3 /tmp/sink.py 10.9.0.1 9001 "$OUT/tapbig_out.sha" & SINK=$!; }
for i in $(seq 100); do isdone tapbig_out || ip netns exec sknet ss -ltn | grep -q ':9001 ' && break; sleep 0.2; done
res tapbig_out ip netns exec sknet $VBIG -v /tmp:/data:ro --net tap:sktap0 --ip 10.9.0.2/24 --gateway 10.9.0.1 -- sh -c 'nc 10.9.0.1 9001 < /data/big'
for i in $(seq 100); do [ -s "$OUT/tapbig_out.sha" ] && break; sleep 0.2; done; [ -z "$SINK" ] || kill $SINK 2>/dev/null
kill $TAPSRV 2>/dev/null
# Bad input: one line each, status 125, nothing left behind.
res bad_port $V -p 80:x -- true
python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 18090)); s.listen(); time.sleep(60)' &
TAKEN=$!
for i in $(seq 100); do python3 -c 'import socket; socket.create_connection(("127.0.0.1", 18090), 1)' 2>/dev/null && break; sleep 0.2; done
res port_taken $V -p 127.0.0.1:18090:80 -- true
kill $TAKEN
res no_passt env PATH=/nonexistent /usr/bin/timeout -k 5 60 $VMM run --net passt -- true
res no_tap $V --net tap:sknosuch --ip 10.9.0.2/24 -- true
res bad_net $V --net bogus -- true
# Loopback only, as runc gives without a network.
res none $V --net none -- sh -c 'ip -o link | cut -d: -f2'
pgrep -a passt > "$OUT/passt.left"
ip link show | grep -c sknosuch > "$OUT/tap.left"
kill $SRV $HTTP $HTTPBIG 2>/dev/null
ip netns del sknet
exit 0
