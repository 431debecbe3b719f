#!/usr/bin/env bash
# Builds the two static release binaries of the container image — cairn-ipam and cairn-ccm —
# exactly as the Containerfile's build stage does (it runs this very script), so the image's
# build is exercised on any machine and in CI without a container engine.
#
#   scripts/container-build.sh [--out DIR]      # default DIR: target/container
#
# Steps: check the toolchain (rustup target for the musl triple, musl-gcc for ring's C code,
# protoc for the API; on a Debian machine running as root the missing ones are installed, the
# way .ci/run installs its tools), `cargo build --locked --release --target <triple>` of both
# binaries, then prove the result: statically linked (no ELF interpreter, no NEEDED libraries)
# and runnable (`--version`, `cairn-ccm crd` matches the committed CRD). The binaries are copied
# to DIR (debug info stripped), which the Containerfile copies into the runtime image.
#
# Environment: CAIRN_TARGET overrides the triple (default: <uname -m>-unknown-linux-musl);
# CARGO_TARGET_DIR and CARGO are honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/container
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "container-build: unknown argument $1" >&2; exit 2 ;;
  esac
done

arch=$(uname -m)
target=${CAIRN_TARGET:-${arch}-unknown-linux-musl}
cargo=${CARGO:-cargo}
log() { echo "container-build: $*" >&2; }

# --- toolchain --------------------------------------------------------------------------------
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    log "missing $* (install it, e.g. apt-get install $*)"
    exit 1
  fi
}
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
  log "adding rust target $target"
  rustup target add "$target"
fi
command -v protoc >/dev/null || apt_install protobuf-compiler
# ring (TLS of the Kubernetes client) compiles C and assembly for the target: with a musl
# triple cc-rs needs <arch>-linux-musl-gcc (Debian's musl-tools), not the host's glibc gcc.
case "$target" in
  *-linux-musl)
    command -v "${arch}-linux-musl-gcc" >/dev/null || command -v musl-gcc >/dev/null || apt_install musl-tools
    ;;
esac

# --- build (the same command in the Containerfile and here) ----------------------------------
log "cargo build --release --target $target (cairn-ipam, cairn-ccm)"
started=$(date +%s)
"$cargo" build --locked --release --target "$target" \
  -p cairn-ipam --bin cairn-ipam \
  -p cairn-ccm --bin cairn-ccm
log "built in $(( $(date +%s) - started ))s"

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$out"
for bin in cairn-ipam cairn-ccm; do
  install -m 0755 "$target_dir/$target/release/$bin" "$out/$bin"
  # The release profile keeps line tables (for backtraces in tests); the image does not need
  # them (~125 MiB → ~20 MiB). Symbol names stay, so panics still name functions.
  if command -v strip >/dev/null; then strip --strip-debug "$out/$bin"; fi
done

# --- proof -----------------------------------------------------------------------------------
# Static: no program interpreter (PT_INTERP) and no shared-library dependencies. readelf is
# binutils (present wherever gcc is); fall back to `file` when it is not.
for bin in cairn-ipam cairn-ccm; do
  f="$out/$bin"
  if command -v readelf >/dev/null; then
    if readelf -lW "$f" | grep -q 'INTERP' || readelf -dW "$f" | grep -q '(NEEDED)'; then
      log "$bin is not statically linked:"; readelf -dW "$f" | grep NEEDED >&2 || true; exit 1
    fi
  elif command -v file >/dev/null; then
    file -L "$f" | grep -Eq 'statically linked|static-pie linked' || { log "$bin is not static: $(file -L "$f")"; exit 1; }
  fi
done
"$out/cairn-ipam" --version >/dev/null
"$out/cairn-ccm" --version >/dev/null
if ! "$out/cairn-ccm" crd | diff -q - manifests/crds/clusternetworks.cairn.dev.yaml >/dev/null; then
  log "the built cairn-ccm prints a CRD that differs from manifests/crds/ (regenerate it)"
  exit 1
fi
log "ok: static $target binaries in $out/: $(cd "$out" && ls -l cairn-ipam cairn-ccm | awk '{printf "%s %.1fMiB  ", $NF, $5/1048576}')"
