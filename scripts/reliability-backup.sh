#!/usr/bin/env bash
# Backups at scale (issue 11): generates a backup of N allocations (default 1,000,000), imports
# it into server A, then `cairn-ipam export | cairn-ipam import -f -` into a fresh server B, and
# checks B exports exactly what A does. Prints seconds and peak RSS (GNU time's "Maximum
# resident set size") of each CLI step and of both servers. Figures go to docs/reliability.md.
#
#   scripts/reliability-backup.sh [N]            release build (make reliability-backup)
#   PROFILE=debug scripts/reliability-backup.sh 200000
set -euo pipefail
N=${1:-1000000}
PROFILE=${PROFILE:-release}
CARGO=${CARGO:-cargo}
cd "$(dirname "$0")/.."
if [[ $PROFILE == release ]]; then
  $CARGO build --release -p cairn-ipam --bin cairn-ipam --example gen_backup
  BIN=target/release
else
  $CARGO build -p cairn-ipam --bin cairn-ipam --example gen_backup
  BIN=target/debug
fi
[[ -x /usr/bin/time ]] || { echo "needs GNU time at /usr/bin/time" >&2; exit 1; }
W=$(mktemp -d /tmp/cairn-backup-XXXXXX)
PIDS=()
# PIDS are GNU time's; the servers are their children (signal those, so time reports).
servers() { for p in "${PIDS[@]}"; do pgrep -P "$p" || true; done; }
cleanup() { for s in $(servers); do kill "$s" 2>/dev/null || true; done; }
trap cleanup EXIT

# serve NAME: starts a server under GNU time; sets EP_NAME.
serve() {
  /usr/bin/time -v -o "$W/$1.time" "$BIN/cairn-ipam" serve --listen 127.0.0.1:0 \
    --data-dir "$W/$1.data" --addr-file "$W/$1.addrs" >"$W/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do
    [[ -s $W/$1.addrs ]] && break
    sleep 0.1
  done
  local a
  a=$(sed -n 's/^grpc=//p' "$W/$1.addrs")
  [[ -n $a ]] || { echo "server $1 did not start:" >&2; cat "$W/$1.log" >&2; exit 1; }
  printf -v "EP_$1" 'http://%s' "$a"
}
# timed LABEL CMD...: runs CMD under GNU time, prints seconds and peak RSS.
timed() {
  local label=$1; shift
  /usr/bin/time -v -o "$W/$label.time" "$@"
  report "$label"
}
report() {
  awk -v l="$1" -F': ' '/Elapsed \(wall clock\)/{t=$2} /Maximum resident set size/{r=$2}
    END{printf "%-28s %10s wall  %8.0f MiB peak RSS\n", l, t, r/1024}' "$W/$1.time"
}

echo "== $N allocations, $PROFILE build, in $W"
"$BIN/examples/gen_backup" "$N" >"$W/generated.json"
echo "generated backup: $(du -m "$W/generated.json" | cut -f1) MiB"
serve A
serve B
timed import-generated "$BIN/cairn-ipam" --endpoint "$EP_A" import -f "$W/generated.json"
timed export-file "$BIN/cairn-ipam" --endpoint "$EP_A" export -f "$W/a.json"
echo "backup file: $(du -m "$W/a.json" | cut -f1) MiB"
start=$(date +%s.%N)
/usr/bin/time -v -o "$W/pipe-export.time" "$BIN/cairn-ipam" --endpoint "$EP_A" export \
  | /usr/bin/time -v -o "$W/pipe-import.time" "$BIN/cairn-ipam" --endpoint "$EP_B" import -f -
end=$(date +%s.%N)
report pipe-export
report pipe-import
printf '%-28s %10.1f s\n' "export | import (total)" "$(echo "$end - $start" | bc)"
"$BIN/cairn-ipam" --endpoint "$EP_B" export -f "$W/b.json"
if ! diff -q <(grep -v exportedAt "$W/a.json") <(grep -v exportedAt "$W/b.json") >/dev/null; then
  echo "FAIL: server B does not hold what server A holds" >&2
  exit 1
fi
echo "B holds exactly what A holds: $(grep -c '"owner"' "$W/b.json") allocation lines"
grep -ho 'snapshot_ms=[0-9]*' "$W/A.log" | sed 's/^/server A export snapshot (under the lock, incl. flush wait): /'
kill -TERM $(servers)
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
report A
report B
rm -rf "$W"
