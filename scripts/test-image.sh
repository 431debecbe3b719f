#!/usr/bin/env bash
# The image test (`make test-image`, part of `make test`): builds the image with
# scripts/image.sh and runs it with podman the way the manifests do — read-only root
# filesystem, non-root, the store's data on a volume — then drives the store from the host's
# `cairn-ipam` CLI: create a network and an allocation, kill the container, start a new one on
# the same volume, and find the same allocation. Fails (never skips) when podman is missing.
#
# podman on these machines needs two settings, both set here for this script only:
#   CONTAINERS_CONF with `default_ulimits = []`  (else: setrlimit RLIMIT_NPROC: Operation not permitted)
#   --runtime runc when runc is installed       (crun: "cgroups in hybrid mode not supported")
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "test-image: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

command -v podman >/dev/null || fail "podman is not installed (apt-get install podman buildah runc)"
work=$(mktemp -d)
name=cairn-image-test-$$
vol=cairn-image-test-$$
cleanup() {
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  podman volume rm -f "$vol" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
run=(podman run)
command -v runc >/dev/null && run=(podman --runtime "$(command -v runc)" run)

tag=$(scripts/image.sh | tail -n 1)
cli=target/container/bin/cairn-ipam
version=$("$cli" --version | awk '{print $NF}')

# --- metadata ---------------------------------------------------------------------------------
user=$(podman image inspect --format '{{.Config.User}}' "$tag")
[ "$user" = "65532:65532" ] || fail "image user is '$user', want 65532:65532"
label=$(podman image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$tag")
[ "$label" = "$version" ] || fail "org.opencontainers.image.version is '$label', want '$version'"
layers=$(podman image inspect --format '{{len .RootFS.Layers}}' "$tag")
say "$tag: user $user, version $label, $layers layer(s)"

# --- the binaries run inside --------------------------------------------------------------------
ccm=$("${run[@]}" --rm --read-only "$tag" --version)
[ "$ccm" = "cairn-ccm $version" ] || fail "cairn-ccm --version in the image printed '$ccm'"
ipam=$("${run[@]}" --rm --read-only --entrypoint /usr/local/bin/cairn-ipam "$tag" --version)
[ "$ipam" = "cairn-ipam $version" ] || fail "cairn-ipam --version in the image printed '$ipam'"
say "both binaries run in the image ($ccm, $ipam)"

# The first address in the CLI's proto3 JSON (an AllocateResponse wraps the Allocation).
first_address() {
  python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
d = d.get("allocation", d)
print(d["addresses"][0])' "$1"
}

# --- the store serves from the container, the host's CLI talks to it ----------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint=http://127.0.0.1:$port
podman volume create "$vol" >/dev/null
start() {
  "${run[@]}" -d --name "$name" --read-only --network host -v "$vol:/var/lib/cairn-ipam" \
    --entrypoint /usr/local/bin/cairn-ipam "$tag" serve --listen "127.0.0.1:$port" >/dev/null
  local deadline=$(( $(date +%s) + 60 ))
  until "$cli" --endpoint "$endpoint" network list >/dev/null 2>&1; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      podman logs "$name" >&2 || true
      fail "the store's container exited"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { podman logs "$name" >&2 || true; fail "the store did not answer on $endpoint within 60s"; }
    sleep 0.2
  done
}
start
cat >"$work/net.yaml" <<'YAML'
name: image-net
prefixes: [127.0.120.0/24]
pools:
  - { name: vip, purpose: VIP, ranges: [127.0.120.10-127.0.120.20] }
YAML
"$cli" --endpoint "$endpoint" network apply -f "$work/net.yaml" >/dev/null
"$cli" --endpoint "$endpoint" -o json alloc create --network image-net --cluster img --kind service \
  --namespace default --name web --port tcp/80 >"$work/alloc.json"
ip=$(first_address "$work/alloc.json")
say "allocated $ip through the container"
# The data is on the volume, written by uid 65532, and the root filesystem stayed read-only.
mnt=$(podman volume inspect --format '{{.Mountpoint}}' "$vol")
owner=$(stat -c %u "$mnt")
[ "$owner" = 65532 ] || fail "the data volume is owned by uid $owner, want 65532"
[ -n "$(ls -A "$mnt")" ] || fail "the store wrote nothing to its volume"

# kill -9 the container; a new one on the same volume has the same assignment.
podman kill -s KILL "$name" >/dev/null
podman rm -f -t 0 "$name" >/dev/null
start
"$cli" --endpoint "$endpoint" -o json alloc get --network image-net --cluster img --kind service \
  --namespace default --name web >"$work/after.json"
after=$(first_address "$work/after.json")
[ "$after" = "$ip" ] || fail "after a kill -9 and a new container the allocation is $after, was $ip"

size=$(podman image inspect --format '{{.Size}}' "$tag")
say "ok: $tag ($(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }')) serves from a read-only container; $ip survived kill -9 on its volume"
