#!/usr/bin/env bash
# The main job on the built-in lab: bring up client -> lb -> server, check the hosts, then
# trace TCP resets on all three while the lab reproduces four kinds of reset (the last one
# through an LB that rewrites the VIP port 8085 to server port 9085 and the source port).
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/ebpfdiag
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: the lab needs root (network namespaces, sshd, nftables): sudo make demo" >&2
  exit 2
fi
$E lab up --link-headers
$E doctor --hosts client,lb,server
err=$(mktemp)
trap 'rm -f "$err"' EXIT
$E trace tcp-rst --hosts client,lb,server --port 8081,8082,8083,8085,9085 --count 4 --duration 60s \
  2> >(tee "$err" >&2) &
trace=$!
for _ in $(seq 1 120); do
  grep -q "tracing on" "$err" && break
  kill -0 "$trace" 2>/dev/null || break
  sleep 0.25
done
for scenario in rst-no-listener rst-abort rst-lb-reject rst-no-listener-portmap; do
  $E lab scenario "$scenario"
done
wait "$trace"
echo "demo: done; the lab stays up for you (ebpfdiag lab status; sudo ebpfdiag lab down)" >&2
echo "demo: a connection moved to another server mid-flight needs two servers:" \
  "sudo ebpfdiag lab down; sudo ebpfdiag lab up --servers 2; sudo ebpfdiag lab scenario rst-lb-failover" >&2
