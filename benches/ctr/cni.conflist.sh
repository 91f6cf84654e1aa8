#!/bin/sh
# Writes the CNI network ctrbench --cni uses: a bridge (skbench0, 10.88.99.0/24) with host-local
# addresses (leases in /tmp/cni-bench). Run it where /etc/cni/net.d is yours (a tmpfs in the
# nested VM), never over a host's own CNI config.
set -eu
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-skiff-bench.conflist <<'EOC'
{"cniVersion": "1.0.0", "name": "skiff-bench", "plugins": [
  {"type": "bridge", "bridge": "skbench0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "/tmp/cni-bench",
            "ranges": [[{"subnet": "10.88.99.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOC
