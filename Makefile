# Cairn: the two commands a new machine needs are `make demo` and `make test` (see README).
SHELL := /bin/bash
CARGO ?= cargo
export CAIRN_BIN_DIR ?= $(CURDIR)/.cache/bin

.PHONY: all build toolchain tools image test-image test test-unit test-store test-controller test-harness lint deny advisories demo bench bench-smoke clean-cache reliability reliability-backup \
	test-go check-go-generated check-monitoring fuzz fuzz-smoke web-screenshot

all: build

build: toolchain
	$(CARGO) build --workspace --bins

# rust-toolchain.toml pins a release. These machines cannot download toolchains, but their
# rustup has that release installed as `stable`: give it the release's name too (a symlink;
# `rustup toolchain link` refuses names of official releases). Elsewhere rustup installs it.
toolchain:
	@want=$$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml); \
	command -v rustup >/dev/null || exit 0; \
	host=$$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p'); \
	dir=$${RUSTUP_HOME:-$$HOME/.rustup}/toolchains; \
	if [ ! -e "$$dir/$$want-$$host" ] && RUSTUP_TOOLCHAIN=stable rustc -V | grep -q "^rustc $$want "; then \
	  ln -s "$$dir/stable-$$host" "$$dir/$$want-$$host"; \
	  echo "toolchain: $$want is the installed stable toolchain"; \
	fi

# etcd, kube-apiserver, kubectl, grpcurl and promtool built from the Go module proxy, cached by version.
tools:
	e2e/tools/build.sh all

# Formatting, clippy (warnings are errors) and cargo-deny's offline checks (deny.toml).
lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(MAKE) --no-print-directory deny

# Licenses, duplicate versions, sources. Needs cargo-deny (`cargo install --locked cargo-deny`;
# .ci/run installs it).
deny: toolchain
	$(CARGO) deny --workspace check bans licenses sources

# RustSec advisories: cargo-deny clones the advisory database from GitHub, so this runs only
# where GitHub is reachable (not on these machines, hence not in `lint`).
advisories: toolchain
	$(CARGO) deny --workspace check advisories

# Every test, each suite named for what it runs: pure unit tests, the store against real
# processes, the controller on real etcd + kube-apiserver, the control-plane harness itself;
# then the benchmarks in smoke mode.
test: tools lint test-unit test-store test-controller test-harness bench-smoke check-go-generated test-go check-monitoring test-image

# Unit and property tests of each crate's library (no apiserver, no store process; the HAProxy
# renderer's tests run `haproxy -c`, so haproxy must be installed — they fail without it).
test-unit: toolchain
	$(CARGO) test --workspace --exclude cairn-e2e --lib --bins
	$(CARGO) test --workspace --exclude cairn-e2e --doc

# cairn-ipam's integration tests: gRPC API, CLI, kill -9 crash cycles, grpcurl, regressions,
# the web view over HTTP and in headless chromium (chromium + chromium-driver from apt; the
# browser test fails, never skips, without them).
test-store: toolchain
	$(CARGO) test -p cairn-ipam --test '*'

# cairn-ccm's integration tests: the controller and HAProxy agent on real apiservers with a
# real store and haproxy; the committed CRD and manifests.
test-controller: toolchain
	$(CARGO) test -p cairn-ccm --test '*'

# The control-plane harness (e2e/): its unit, doc and integration tests.
test-harness: toolchain
	$(CARGO) test -p cairn-e2e

# The Go client (clients/go): go vet, then its tests, the example's flow against a live
# cairn-ipam built here, and failover across two replicas on a real etcd (the tests fail,
# never skip, without CAIRN_IPAM_BIN and CAIRN_ETCD_BIN).
CAIRN_IPAM_BIN ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/cairn-ipam
test-go: toolchain
	$(CARGO) build -p cairn-ipam --bin cairn-ipam
	e2e/tools/build.sh etcd
	cd clients/go && go vet ./... && CAIRN_IPAM_BIN=$(CAIRN_IPAM_BIN) CAIRN_ETCD_BIN=$(CAIRN_BIN_DIR)/etcd go test -count=1 ./...

# The checked-in generated Go code matches proto/ and the pinned protoc plugins.
check-go-generated:
	clients/go/generate.sh --check

# promtool check + unit tests of the PrometheusRule; the dashboard parses and queries only
# metrics the code defines.
check-monitoring:
	e2e/tools/build.sh promtool
	PROMTOOL=$(CAIRN_BIN_DIR)/promtool manifests/monitoring/check.sh

# The OCI image (from scratch + the static musl binaries built here; nothing is pulled), and
# its test: podman runs it read-only and non-root with the store's data on a volume, and the
# host's CLI drives the store inside (fails without podman: apt-get install podman buildah runc).
image: toolchain
	scripts/image.sh

test-image: toolchain
	scripts/test-image.sh

demo: tools build
	scripts/demo.sh

# Printed figures (release builds), recorded in docs/benchmarks.md.
# The controller bench runs MetalLB and kube-vip-cloud-provider beside Cairn (built here from
# their Go modules; not part of `make tools`).
bench: toolchain tools
	e2e/tools/build.sh metallb
	e2e/tools/build.sh kube-vip-cloud-provider
	$(CARGO) bench -p cairn-ipam --bench store
	$(CARGO) bench -p cairn-ccm --bench burst
	CAIRN_E2E_MAX_PLANES=8 $(CARGO) bench -p cairn-ccm --bench burst -- --fleet 8 --fleet-services 100
	$(CARGO) bench -p cairn-ccm --bench probe

# Keeps the benchmarks building and running in CI: tiny sizes, debug build (no second,
# release build of the whole dependency tree), figures meaningless.
# The README's screenshot of the web view: the browser test, saving the overview it loads.
web-screenshot: toolchain
	CAIRN_WEB_SCREENSHOT=$(CURDIR)/docs/web-view.png $(CARGO) test -p cairn-ipam --test web_browser

bench-smoke: toolchain
	$(CARGO) test -p cairn-ipam --bench store -- --quick
	$(CARGO) test -p cairn-ccm --bench burst -- --quick
	$(CARGO) test -p cairn-ccm --bench probe -- --quick

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

# Backups at 1M allocations: export + import through the CLI (release build), seconds and peak
# RSS of CLI and servers; figures in docs/reliability.md. RELIABILITY_BACKUP_N to resize.
RELIABILITY_BACKUP_N ?= 1000000
reliability-backup:
	CARGO=$(CARGO) scripts/reliability-backup.sh $(RELIABILITY_BACKUP_N)

clean-cache:
	rm -rf .cache

# Long reliability runs (figures in docs/reliability.md; CI runs short versions of each):
# 1,000 kill -9 cycles of cairn-ipam under load from 3 clusters, and two clusters racing for
# 100,000 addresses on one network through separate connections.
reliability:
	CAIRN_HA_KILLS=20 $(CARGO) test -p cairn-ipam --test ha concurrent_clusters -- --nocapture
	CAIRN_CRASH_CYCLES=1000 $(CARGO) test -p cairn-ipam --test crash -- --nocapture
	CAIRN_RACE_ALLOCS=100000 $(CARGO) test -p cairn-ipam --test race -- --nocapture
