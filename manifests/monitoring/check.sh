#!/usr/bin/env bash
# `make check-monitoring`: the PrometheusRule passes `promtool check rules`, its alerts fire as
# rules-test.yaml says (`promtool test rules`), and the dashboard parses and queries only
# metrics the code exports (check_metrics.py).
#
#   PROMTOOL=.cache/bin/promtool manifests/monitoring/check.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
promtool=${PROMTOOL:-$root/.cache/bin/promtool}
[ -x "$promtool" ] || { echo "check-monitoring: no promtool at $promtool (build it: e2e/tools/build.sh promtool)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# promtool reads plain rule files: the PrometheusRule's spec, one level of indentation less.
awk 'found { sub(/^  /, ""); print } /^spec:/ { found = 1 }' "$here/prometheusrule.yaml" >"$tmp/cairn-rules.yaml"
grep -q '^groups:' "$tmp/cairn-rules.yaml" || { echo "check-monitoring: no spec.groups in prometheusrule.yaml" >&2; exit 1; }
"$promtool" check rules "$tmp/cairn-rules.yaml"
cp "$here/rules-test.yaml" "$tmp/"
"$promtool" test rules "$tmp/rules-test.yaml"
python3 "$here/check_metrics.py" "$root"
