# Cairn: the two commands a new machine needs are `make demo` and `make test` (see README).
SHELL := /bin/bash
CARGO ?= cargo
export CAIRN_BIN_DIR ?= $(CURDIR)/.cache/bin

.PHONY: all build tools test test-unit test-e2e lint demo bench bench-smoke clean-cache \
	test-go check-go-generated check-monitoring fuzz fuzz-smoke

all: build

build:
	$(CARGO) build --workspace --bins

# etcd, kube-apiserver, kubectl, grpcurl and promtool built from the Go module proxy, cached by version.
tools:
	e2e/tools/build.sh all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Workspace tests (unit, property, gRPC/crash/grpcurl against real processes), then the
# control-plane suite on real etcd + kube-apiserver, the Go client against a live store, and
# the monitoring rules and dashboard.
test: tools lint test-unit test-e2e bench-smoke check-go-generated test-go check-monitoring

test-unit:
	$(CARGO) test --workspace --exclude cairn-e2e

test-e2e:
	$(CARGO) test -p cairn-e2e

# The Go client (clients/go): go vet, then its tests, the example's flow against a live
# cairn-ipam built here (the tests fail, never skip, without CAIRN_IPAM_BIN).
CAIRN_IPAM_BIN ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/cairn-ipam
test-go:
	$(CARGO) build -p cairn-ipam --bin cairn-ipam
	cd clients/go && go vet ./... && CAIRN_IPAM_BIN=$(CAIRN_IPAM_BIN) go test -count=1 ./...

# The checked-in generated Go code matches proto/ and the pinned protoc plugins.
check-go-generated:
	clients/go/generate.sh --check

# promtool check + unit tests of the PrometheusRule; the dashboard parses and queries only
# metrics the code defines.
check-monitoring:
	e2e/tools/build.sh promtool
	PROMTOOL=$(CAIRN_BIN_DIR)/promtool manifests/monitoring/check.sh

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

# cargo-fuzz targets of cairn-ipam (fuzz/, its own workspace; nightly + cargo-fuzz:
# `cargo install cargo-fuzz --locked`). Figures in docs/reliability.md, "Fuzzing".
FUZZ_CARGO ?= cargo +nightly
FUZZ_TARGETS := requests ledger_ops cli_files
# Leak checks off: LeakSanitizer's scans took ~40% of `requests` (a ledger and its committer
# thread per input), and safe Rust leaks only on purpose.
FUZZ_FLAGS ?= -detect_leaks=0
fuzz:
	for t in $(FUZZ_TARGETS); do $(FUZZ_CARGO) fuzz run $$t -- -runs=1000000 $(FUZZ_FLAGS) || exit 1; done

# A short run of each (20k executions or 20 s, whichever comes first): keeps the targets
# building and their contracts holding.
fuzz-smoke:
	for t in $(FUZZ_TARGETS); do \
		$(FUZZ_CARGO) fuzz run $$t -- -runs=20000 -max_total_time=20 $(FUZZ_FLAGS) || exit 1; done

clean-cache:
	rm -rf .cache
