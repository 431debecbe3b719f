# Cairn: the two commands a new machine needs are `make demo` and `make test` (see README).
SHELL := /bin/bash
CARGO ?= cargo
export CAIRN_BIN_DIR ?= $(CURDIR)/.cache/bin

.PHONY: all build tools test test-unit test-e2e lint demo bench bench-smoke clean-cache reliability-backup

all: build

build:
	$(CARGO) build --workspace --bins

# etcd, kube-apiserver, kubectl and grpcurl built from the Go module proxy, cached by version.
tools:
	e2e/tools/build.sh all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Workspace tests (unit, property, gRPC/crash/grpcurl against real processes), then the
# control-plane suite on real etcd + kube-apiserver.
test: tools lint test-unit test-e2e bench-smoke

test-unit:
	$(CARGO) test --workspace --exclude cairn-e2e

test-e2e:
	$(CARGO) test -p cairn-e2e

demo: tools build
	scripts/demo.sh

# Printed figures (release builds), recorded in docs/benchmarks.md.
# The controller bench runs MetalLB and kube-vip-cloud-provider beside Cairn (built here from
# their Go modules; not part of `make tools`).
bench: tools
	e2e/tools/build.sh metallb
	e2e/tools/build.sh kube-vip-cloud-provider
	$(CARGO) bench -p cairn-ipam --bench store
	$(CARGO) bench -p cairn-ccm --bench burst

# Keeps the benchmarks building and running in CI: tiny sizes, debug build (no second,
# release build of the whole dependency tree), figures meaningless.
bench-smoke:
	$(CARGO) test -p cairn-ipam --bench store -- --quick
	$(CARGO) test -p cairn-ccm --bench burst -- --quick

# Backups at 1M allocations: export + import through the CLI (release build), seconds and peak
# RSS of CLI and servers; figures in docs/reliability.md. RELIABILITY_BACKUP_N to resize.
RELIABILITY_BACKUP_N ?= 1000000
reliability-backup:
	CARGO=$(CARGO) scripts/reliability-backup.sh $(RELIABILITY_BACKUP_N)

clean-cache:
	rm -rf .cache
