#!/usr/bin/env bash
# `make demo`: the store on loopback with an embedded sled ledger, a shared network applied
# from YAML, and the seed's scenario played through the admin CLI: two clusters draw VIPs
# from one pool and never get the same address. It grows with the controller (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
work=$(mktemp -d -t cairn-demo.XXXXXX)
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin/cairn-ipam" serve --listen 127.0.0.1:0 --data-dir "$work/data" --addr-file "$work/addr" \
  --metrics-listen 127.0.0.1:0 --default-reuse-grace 0s 2>"$work/ipam.log" &
pid=$!
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
[ -s "$work/addr" ] || { echo "cairn-ipam did not start:"; cat "$work/ipam.log"; exit 1; }
export CAIRN_IPAM_ENDPOINT="http://$(sed -n 's/^grpc=//p' "$work/addr")"
ipam() { echo "+ cairn-ipam $*" >&2; "$bin/cairn-ipam" "$@"; }

cat > "$work/net-a.yaml" <<'YAML'
name: net-a
prefixes: [10.20.0.0/16]
gateways: [10.20.0.1]
dnsServers: [10.20.0.2]
vlan: 20
pools:
  - name: vip
    purpose: VIP
    ranges: [10.20.1.0-10.20.1.3]
  - name: nodes
    purpose: NODE
    ranges: [10.20.2.0/24]
YAML
ipam network apply -f "$work/net-a.yaml"
ipam network list
ipam alloc create --network net-a --cluster cluster-a --kind api-server --name kube-apiserver
ipam alloc create --network net-a --cluster cluster-b --kind api-server --name kube-apiserver
ipam alloc create --network net-a --cluster cluster-a --kind service --namespace default --name web --port tcp/80
ipam alloc create --network net-a --cluster cluster-b --kind service --namespace default --name web --port tcp/8080
ipam alloc create --network net-a --cluster cluster-a --kind node --name a-node-1
echo "+ cluster-b asks for cluster-a's VIP (refused: one owner cluster per address)" >&2
ipam alloc create --network net-a --cluster cluster-b --kind service --namespace default --name steal --ip 10.20.1.2 || true
echo "+ the pool is full (4 VIPs): the next request is refused with RESOURCE_EXHAUSTED" >&2
ipam alloc create --network net-a --cluster cluster-b --kind service --namespace default --name late || true
ipam alloc release --network net-a --cluster cluster-a --kind service --namespace default --name web
ipam alloc create --network net-a --cluster cluster-b --kind service --namespace default --name late
ipam alloc list --network net-a
ipam usage
echo "demo finished; store log: kept until exit" >&2
