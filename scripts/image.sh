#!/usr/bin/env bash
# Builds Cairn's OCI image from `scratch` plus the static binaries built on this host — no base
# image is pulled, so it works without a registry.
#
#   scripts/image.sh [--tag NAME:TAG]      # default: localhost/cairn:<cairn-ipam --version>
#
# Steps: scripts/container-build.sh (static musl binaries, proven static and runnable), a build
# context in target/container/ (rootfs/ with the binaries and /etc/passwd, data/ for the
# store's volume), `buildah build` of ./Containerfile (podman build when buildah is absent),
# then the image's size. Prints the tag on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "image: $*" >&2; }

tag=
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --tag=*) tag="${1#--tag=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) log "unknown argument $1"; exit 2 ;;
  esac
done

if command -v buildah >/dev/null; then
  builder=(buildah build --layers=false)
elif command -v podman >/dev/null; then
  builder=(podman build)
else
  log "neither buildah nor podman is installed (apt-get install buildah podman)"
  exit 1
fi

ctx=target/container
scripts/container-build.sh --out "$ctx/bin" >&2

version=$("$ctx/bin/cairn-ipam" --version | awk '{print $NF}')
[ -n "$version" ] || { log "cairn-ipam --version printed no version"; exit 1; }
tag=${tag:-localhost/cairn:$version}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)

rm -rf "$ctx/rootfs" "$ctx/data"
install -d "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc" "$ctx/data"
install -m 0755 "$ctx/bin/cairn-ipam" "$ctx/bin/cairn-ccm" "$ctx/rootfs/usr/local/bin/"
# Names for the ids, so tools and logs show `nonroot` instead of a bare number.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ctx/rootfs/etc/group"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group"

log "building $tag with ${builder[*]}"
"${builder[@]}" -q -f Containerfile -t "$tag" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$revision" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$ctx" >&2

if command -v podman >/dev/null; then
  size=$(podman image inspect --format '{{.Size}}' "$tag")
  log "built $tag: $(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }')"
fi
echo "$tag"
