#!/usr/bin/env bash
# `make demo`: Cairn's main job on one machine, on loopback only.
#
#   a real control plane (etcd + kube-apiserver)  ─┐
#   cairn-ipam (embedded sled store, mTLS only)    ├─ a network with a VIP pool in
#   cairn-ccm (the controller)                     │  127.0.100.0/28 and a node pool in
#   cairn-ccm haproxy-agent + haproxy              ─┘  127.0.101.0/28
#
# The on-prem workflow, secured: certificates are minted (`cairn-ipam certs`), the store serves
# mutual TLS only, the cloud operator (role `cloud`) defines the network in the store, and the
# cluster's ClusterNetwork binds to it; the controller talks to the store with cluster demo's
# own certificate. A Node registers tainted "uninitialized" and gets its address from the node pool; a
# LoadBalancer Service gets a VIP; HAProxy forwards VIP:80 to the node's nodePort, where a
# small HTTP server answers. The script prints what each step did and the answer through the
# VIP, then tears everything down (DEMO_HOLD=1 keeps it running until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/target/debug
tools=${CAIRN_BIN_DIR:-$root/.cache/bin}
work=$(mktemp -d -t cairn-demo.XXXXXX)
pids=()
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then echo "timed out waiting for $what" >&2; tail -n 30 "$work"/*.log >&2 || true; exit 1; fi
    sleep 0.2
  done
}
for b in "$bin/cairn-ipam" "$bin/cairn-ccm" "$bin/cairn-e2e-cluster" "$tools/kubectl" "$tools/kube-apiserver" "$tools/etcd"; do
  [ -x "$b" ] || { echo "missing $b: run 'make demo' (it builds everything)" >&2; exit 1; }
done
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
kubectl() { "$tools/kubectl" --kubeconfig "$work/demo.kubeconfig" "$@"; }

say "control plane: etcd + kube-apiserver on loopback"
"$bin/cairn-e2e-cluster" --name demo --kubeconfig-dir "$work" --ready-file "$work/plane.json" \
  >"$work/plane.out" 2>"$work/plane.log" &
pids+=($!)
wait_for "the control plane" 120 test -s "$work/plane.json"
kubectl version 2>/dev/null | sed 's/^/  /' >&2 || true

say "certificates: a CA, the store's server certificate, the cloud's and cluster demo's client certificates"
pki=$work/pki
"$bin/cairn-ipam" certs init --dir "$pki" >&2
"$bin/cairn-ipam" certs issue --dir "$pki" --server --ip 127.0.0.1 >&2
"$bin/cairn-ipam" certs issue --dir "$pki" --cloud >&2
"$bin/cairn-ipam" certs issue --dir "$pki" --cluster demo >&2

say "cairn-ipam: the store (sled in $work/ipam), mutual TLS only"
"$bin/cairn-ipam" serve --listen 127.0.0.1:0 --data-dir "$work/ipam" --addr-file "$work/ipam.addr" \
  --default-reuse-grace 0s --tls-cert "$pki/server.pem" --tls-key "$pki/server-key.pem" \
  --client-ca "$pki/ca.pem" --metrics-listen 127.0.0.1:0 2>"$work/ipam.log" &
pids+=($!)
wait_for "cairn-ipam" 30 test -s "$work/ipam.addr"
store="https://$(sed -n 's/^grpc=//p' "$work/ipam.addr")"
web="http://$(sed -n 's/^metrics=//p' "$work/ipam.addr")"
echo "  serving on $store; read-only web view on $web/ui/" >&2
# The cloud operator's CLI: role `cloud` (everything); a cluster's certificate could only touch
# its own addresses.
cloud() { "$bin/cairn-ipam" --endpoint "$store" --tls-ca "$pki/ca.pem" --tls-cert "$pki/cloud.pem" --tls-key "$pki/cloud-key.pem" "$@"; }

say "the cloud operator defines the shared network once, in the store"
cat >"$work/demo-net.yaml" <<'YAML'
name: demo-net
reuseGraceSeconds: 0
managedBy: cloud
pools:
  - { name: vip, purpose: VIP, ranges: [127.0.100.1-127.0.100.14] }
  - { name: nodes, purpose: NODE, ranges: [127.0.101.1-127.0.101.14] }
YAML
cloud network apply -f "$work/demo-net.yaml" >&2

say "the ClusterNetwork CRD; the cluster binds to the cloud's network (no pools: it never changes it)"
kubectl apply -f manifests/crds/clusternetworks.cairn.dev.yaml
kubectl wait --for=condition=Established --timeout=60s crd/clusternetworks.cairn.dev
kubectl apply -f - <<'YAML'
apiVersion: cairn.dev/v1alpha1
kind: ClusterNetwork
metadata:
  name: demo-net
spec:
  network: demo-net
  apiServerVIP: {}
YAML

say "cairn-ccm: the controller for cluster 'demo'"
"$bin/cairn-ccm" --kubeconfig "$work/demo.kubeconfig" --cluster-id demo --ipam-endpoint "$store" \
  --tls-ca "$pki/ca.pem" --tls-cert "$pki/cluster-demo.pem" --tls-key "$pki/cluster-demo-key.pem" \
  --leader-elect false --metrics-listen 127.0.0.1:0 2>"$work/ccm.log" &
pids+=($!)
wait_for "the network to be Ready" 60 kubectl wait --for=condition=Ready --timeout=2s clusternetwork/demo-net
kubectl get clusternetworks >&2

say "a Node registers with the cloud taint; cairn-ccm gives it a node-pool address"
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Node
metadata:
  name: demo-node-1
spec:
  taints: [ { key: node.cloudprovider.kubernetes.io/uninitialized, value: "true", effect: NoSchedule } ]
YAML
node_ip() { kubectl get node demo-node-1 -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
wait_for "the node's address" 60 test -n "$(node_ip)"
nip=$(node_ip)
echo "  demo-node-1: InternalIP $nip, providerID $(kubectl get node demo-node-1 -o jsonpath='{.spec.providerID}')" >&2
# No kubelet runs here: report the node Ready, as a kubelet would.
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kubectl patch node demo-node-1 --subresource=status --type=merge -p \
  "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"demo\",\"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" >/dev/null

say "a LoadBalancer Service gets a VIP"
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
spec:
  type: LoadBalancer
  selector: { app: hello }
  ports: [ { name: http, port: 80, protocol: TCP } ]
YAML
vip() { kubectl get svc hello -o jsonpath='{.status.loadBalancer.ingress[0].ip}'; }
wait_for "the Service's VIP" 60 test -n "$(vip)"
vip=$(vip)
nodeport=$(kubectl get svc hello -o jsonpath='{.spec.ports[0].nodePort}')
kubectl get svc hello >&2
echo "  VIP $vip; the node answers on $nip:$nodeport" >&2

say "the workload: an HTTP server on the node's address and nodePort"
mkdir -p "$work/www" && echo "hello from demo-node-1 ($nip:$nodeport) through $vip:80" >"$work/www/index.html"
python3 -m http.server --bind "$nip" --directory "$work/www" "$nodeport" >"$work/www.log" 2>&1 &
pids+=($!)
wait_for "the backend" 20 bash -c "exec 3<>/dev/tcp/$nip/$nodeport"

say "cairn-ccm haproxy-agent: renders, validates and (re)loads haproxy"
"$bin/cairn-ccm" haproxy-agent --kubeconfig "$work/demo.kubeconfig" --config "$work/haproxy.cfg" \
  --manage-haproxy --metrics-listen 127.0.0.1:0 2>"$work/agent.log" &
pids+=($!)
wait_for "traffic through HAProxy" 60 curl -fsS --max-time 2 "http://$vip:80/"
sed 's/^/  /' "$work/haproxy.cfg" >&2

say "curl http://$vip/"
curl -fsS --max-time 2 "http://$vip:80/"

say "who holds what (the store's view)"
cloud alloc list
cloud usage
echo "  the web view's answer for $vip ($web/api/v1/addresses/$vip):" >&2
curl -fsS --max-time 5 "$web/api/v1/addresses/$vip" | python3 -c 'import json,sys; a=json.load(sys.stdin); h=a["holders"][0]["owner"]; print("  ", a["address"], a["state"], "by cluster", h["cluster"], h["kind"], h["namespace"] + "/" + h["name"], "in", a["network"] + "/" + a["pool"])' >&2

if [ "${DEMO_HOLD:-0}" = 1 ]; then
  say "running; KUBECONFIG=$work/demo.kubeconfig, web view $web/ui/ — Ctrl-C to stop"
  wait
fi
say "demo finished"
