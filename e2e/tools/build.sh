#!/usr/bin/env bash
# Builds the real components the tests run against, from the Go module proxy, into a cache
# keyed by version: .cache/bin/<name>-<version>. A second run finds them and returns at once.
#
#   e2e/tools/build.sh [etcd|kube-apiserver|kubectl|grpcurl|promtool|all]
#   e2e/tools/build.sh [metallb|kube-vip-cloud-provider]   # benchmark peers only; not in `all`
#
# Versions are pinned here and nowhere else; e2e/README.md explains the choice.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}     # matches k8s-openapi feature v1_36
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
GRPCURL_VERSION=${GRPCURL_VERSION:-1.9.3}
# promtool checks and unit-tests manifests/monitoring/ (`make check-monitoring`).
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-3.16.0}
# Peers of the controller benchmark (controller/benches/burst.rs), never needed by the tests.
# MetalLB 0.16.2 (the newest) does not build here: it requires github.com/metallb/frr-k8s
# v0.0.27, whose zip this module proxy refuses (403 "This module version is not available").
METALLB_VERSION=${METALLB_VERSION:-0.16.1}
KUBEVIP_CCM_VERSION=${KUBEVIP_CCM_VERSION:-0.0.12}

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CAIRN_CACHE:-$root/.cache}
bin=$cache/bin
work=$cache/gobuild
mkdir -p "$bin" "$work"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
export GOPATH=${GOPATH:-$cache/gopath}
export GOCACHE=${GOCACHE:-$cache/gocache}

log() { printf '[tools] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "Go is required (go.dev/dl): k8s v1.36 and etcd v3.6.16 declare go 1.26.0"; exit 1; }

# One build at a time per cache: `make test` and a developer's shell may both call this, and
# two `go build -o X.tmp` into the same file would clobber each other. A second caller waits
# and then finds the binaries already built.
if command -v flock >/dev/null; then
  exec 9>"$cache/.build.lock"
  flock 9
fi

# A built binary must run and report the pinned version before it is published.
check_version() { # $1 = expected version string ("" = must just run), $2... = command
  local want=$1 got; shift
  got=$("$@" 2>&1) || { log "'$*' failed: $got"; exit 1; }
  case $got in
    *"$want"*) ;;
    *) log "'$*' reports '$got', expected $want"; exit 1 ;;
  esac
}

build_etcd() {
  local out=$bin/etcd-v$ETCD_VERSION
  [ -x "$out" ] && return 0
  log "building etcd v$ETCD_VERSION"
  local d=$work/etcd-v$ETCD_VERSION
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init local/etcd >/dev/null 2>&1
  # server/go.mod has replace directives, so `go install` refuses it; a module of our own that
  # requires it works (replaces of a dependency are ignored; api/pkg are published modules).
  go get go.etcd.io/etcd/server/v3@v$ETCD_VERSION
  go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3
  check_version "$ETCD_VERSION" "$out.tmp" --version
  mv "$out.tmp" "$out"
}

# kube-apiserver and kubectl come from the k8s.io/kubernetes module, whose go.mod requires its
# staging modules at v0.0.0 with local replaces; pin each to its published v0.Y.Z instead.
k8s_module() {
  local d=$work/k8s-v$K8S_VERSION
  if [ ! -f "$d/.ready" ]; then
    log "preparing k8s.io/kubernetes v$K8S_VERSION module"
    rm -rf "$d" && mkdir -p "$d" && cd "$d"
    go mod init local/k8s >/dev/null 2>&1
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\([^"]*\)".*/\1/p')
    [ -n "$gomod" ] || { log "cannot download k8s.io/kubernetes@v$K8S_VERSION"; exit 1; }
    local m
    for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod"); do
      go mod edit "-replace=$m=$m@v0.${K8S_VERSION#1.}"
    done
    go get "k8s.io/kubernetes@v$K8S_VERSION"
    touch .ready
  fi
  echo "$d"
}

build_k8s() { # $1 = command name
  local name=$1 out=$bin/$1-v$K8S_VERSION
  [ -x "$out" ] && return 0
  local d; d=$(k8s_module)
  cd "$d"
  log "building $name v$K8S_VERSION"
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  go build -trimpath -o "$out.tmp" -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    "k8s.io/kubernetes/cmd/$name"
  if [ "$name" = kubectl ]; then
    check_version "v$K8S_VERSION" "$out.tmp" version --client
  else
    check_version "v$K8S_VERSION" "$out.tmp" --version
  fi
  mv "$out.tmp" "$out"
}

build_grpcurl() {
  local out=$bin/grpcurl-v$GRPCURL_VERSION
  [ -x "$out" ] && return 0
  log "building grpcurl v$GRPCURL_VERSION"
  GOBIN=$work/grpcurl-bin go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@v$GRPCURL_VERSION"
  # `go install` leaves grpcurl's version string unset ("dev build"); just check it runs.
  check_version "" "$work/grpcurl-bin/grpcurl" --version
  mv "$work/grpcurl-bin/grpcurl" "$out"
}

# promtool from the Prometheus module (Prometheus X.Y.Z is published as module v0.XYY.Z).
# remove_all_sd leaves out the service-discovery plugins (cloud SDKs, client-go): rule checks
# and rule unit tests do not use them, and they are most of the build.
build_promtool() {
  local out=$bin/promtool-v$PROMETHEUS_VERSION
  [ -x "$out" ] && return 0
  local major minor patch
  IFS=. read -r major minor patch <<<"$PROMETHEUS_VERSION"
  local mod; mod=$(printf 'v0.%d%02d.%d' "$major" "$minor" "$patch")
  log "building promtool v$PROMETHEUS_VERSION (github.com/prometheus/prometheus $mod)"
  GOBIN=$work/promtool-bin go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$mod"
  check_version "version $PROMETHEUS_VERSION" "$work/promtool-bin/promtool" --version
  mv "$work/promtool-bin/promtool" "$out"
}

# MetalLB's controller (binary `metallb-controller`) and its CRDs (`metallb-crds-v<version>/`,
# the module zip's config/crd/bases). Its go.mod has no replace directives, so `go install`
# builds it straight from the module.
build_metallb() {
  local out=$bin/metallb-controller-v$METALLB_VERSION crds=$bin/metallb-crds-v$METALLB_VERSION
  if [ ! -x "$out" ]; then
    log "building MetalLB controller v$METALLB_VERSION"
    GOBIN=$work/metallb-bin go install "go.universe.tf/metallb/controller@v$METALLB_VERSION"
    check_version "" "$work/metallb-bin/controller" --help
    mv "$work/metallb-bin/controller" "$out"
  fi
  if [ ! -f "$crds/.ready" ]; then
    local dir
    dir=$(cd "$work" && go mod download -json "go.universe.tf/metallb@v$METALLB_VERSION" | sed -n 's/.*"Dir": "\([^"]*\)".*/\1/p')
    [ -n "$dir" ] && [ -d "$dir/config/crd/bases" ] || { log "no config/crd/bases in go.universe.tf/metallb@v$METALLB_VERSION"; exit 1; }
    rm -rf "$crds" && mkdir -p "$crds"
    cp "$dir"/config/crd/bases/*.yaml "$crds/"
    chmod u+w "$crds"/*.yaml
    touch "$crds/.ready"
  fi
}

# kube-vip-cloud-provider (main package at the module root). `go install …@v0.0.12` fails here:
# it loads the module's deprecation notice from the proxy's version list, which this proxy
# refuses (403). A module of our own that requires the version needs no list.
build_kube_vip_ccm() {
  local out=$bin/kube-vip-cloud-provider-v$KUBEVIP_CCM_VERSION
  [ -x "$out" ] && return 0
  log "building kube-vip-cloud-provider v$KUBEVIP_CCM_VERSION"
  local d=$work/kube-vip-cloud-provider-v$KUBEVIP_CCM_VERSION
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init local/kube-vip-ccm >/dev/null 2>&1
  go mod edit "-require=github.com/kube-vip/kube-vip-cloud-provider@v$KUBEVIP_CCM_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$out.tmp" github.com/kube-vip/kube-vip-cloud-provider
  check_version "" "$out.tmp" --help
  mv "$out.tmp" "$out"
}

link() { ln -sf "$(basename "$2")" "$bin/$1"; }

what=${1:-all}
case $what in
  etcd) build_etcd; link etcd "$bin/etcd-v$ETCD_VERSION" ;;
  kube-apiserver|kubectl) build_k8s "$what"; link "$what" "$bin/$what-v$K8S_VERSION" ;;
  grpcurl) build_grpcurl; link grpcurl "$bin/grpcurl-v$GRPCURL_VERSION" ;;
  promtool) build_promtool; link promtool "$bin/promtool-v$PROMETHEUS_VERSION" ;;
  metallb)
    build_metallb
    link metallb-controller "$bin/metallb-controller-v$METALLB_VERSION"
    ln -sfn "metallb-crds-v$METALLB_VERSION" "$bin/metallb-crds"
    ;;
  kube-vip-cloud-provider)
    build_kube_vip_ccm
    link kube-vip-cloud-provider "$bin/kube-vip-cloud-provider-v$KUBEVIP_CCM_VERSION"
    ;;
  all)
    build_etcd; link etcd "$bin/etcd-v$ETCD_VERSION"
    build_grpcurl; link grpcurl "$bin/grpcurl-v$GRPCURL_VERSION"
    build_k8s kube-apiserver; link kube-apiserver "$bin/kube-apiserver-v$K8S_VERSION"
    build_k8s kubectl; link kubectl "$bin/kubectl-v$K8S_VERSION"
    build_promtool; link promtool "$bin/promtool-v$PROMETHEUS_VERSION"
    ;;
  *) echo "usage: $0 [etcd|kube-apiserver|kubectl|grpcurl|promtool|all|metallb|kube-vip-cloud-provider]" >&2; exit 2 ;;
esac
