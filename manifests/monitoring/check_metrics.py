#!/usr/bin/env python3
"""Checks that the Grafana dashboard parses and that every metric the dashboard and the
PrometheusRule query is one the code exports.

    check_metrics.py ROOT

The exported names are read from the Rust sources that register them (prometheus-client):
`Registry::with_prefix("p")` + `register("name", ...)` gives `p_name`; counters are exposed
as `p_name_total`, histograms as `p_name_bucket`, `_sum` and `_count`. Recording rules of the
PrometheusRule (`record:`) count as known names too. Standard library only (no PyYAML).
"""
import json
import re
import sys
from pathlib import Path

SOURCES = [
    "ipam-store/src/metrics.rs",
    "controller/src/metrics.rs",
    "controller/src/haproxy/agent/metrics.rs",
]


def exported(root: Path) -> set:
    names = set()
    for rel in SOURCES:
        text = (root / rel).read_text()
        prefixes = re.findall(r'Registry::with_prefix\("([a-z_:]+)"\)', text)
        if len(prefixes) != 1:
            sys.exit(f"{rel}: expected one Registry::with_prefix, found {prefixes}")
        prefix = prefixes[0]
        # `field: r.register("name", "help", constructor)`; the type is the field's.
        regs = re.findall(r'(\w+):\s*r\.register\(\s*"([a-z_]+)",', text)
        if not regs:
            sys.exit(f"{rel}: no register(...) calls found; has the registration code changed shape?")
        for var, name in regs:
            m = re.search(r"^\s*(?:pub(?:\([a-z]+\))? )?" + var + r":\s*([^\n]+),\s*$", text, re.M)
            if not m:
                sys.exit(f"{rel}: cannot find the type of {var} (metric {name})")
            kind = m.group(1)
            full = f"{prefix}_{name}"
            if "Histogram" in kind:
                names |= {full + "_bucket", full + "_sum", full + "_count"}
            elif "Counter" in kind:
                names.add(full + "_total")
            elif "Gauge" in kind:
                names.add(full)
            else:
                sys.exit(f"{rel}: metric {name}: unknown type in {kind!r}")
    return names


def rule_exprs(path: Path):
    """(exprs, recorded names) of a PrometheusRule, from `expr:` and `record:` lines."""
    exprs, records = [], set()
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(?:- )?record:\s*(\S+)\s*$", line)
        if m:
            records.add(m.group(2))
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                exprs.append(" ".join(block))
                continue
            exprs.append(value)
        i += 1
    return exprs, records


def dashboard_exprs(path: Path):
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        sys.exit(f"{path}: not valid JSON: {e}")
    for key in ("title", "uid", "panels", "templating"):
        if key not in dash:
            sys.exit(f"{path}: no {key!r}")
    exprs = []
    ids = set()

    def walk(panels):
        for p in panels:
            if p.get("id") in ids:
                sys.exit(f"{path}: panel id {p.get('id')} used twice")
            ids.add(p.get("id"))
            if p.get("type") != "row" and not p.get("targets"):
                sys.exit(f"{path}: panel {p.get('title')!r} has no query")
            for t in p.get("targets", []):
                if not t.get("expr"):
                    sys.exit(f"{path}: panel {p.get('title')!r}: target {t.get('refId')} has no expr")
                exprs.append((p.get("title"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            exprs.append(("variable " + v["name"], q))
    return exprs


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    mon = root / "manifests/monitoring"
    known = exported(root)
    rexprs, records = rule_exprs(mon / "prometheusrule.yaml")
    if not rexprs:
        sys.exit("prometheusrule.yaml: no expr found")
    known |= records
    queries = [("rule", e) for e in rexprs] + dashboard_exprs(mon / "grafana-dashboard.json")
    bad = []
    for where, expr in queries:
        # Every metric of ours starts with cairn_ (a recording rule with cairn_<x>:); label
        # values in quotes are not names.
        unquoted = re.sub(r'"[^"]*"', '""', expr)
        used = set(re.findall(r"\bcairn_[a-zA-Z0-9_:]*", unquoted))
        if not used:
            bad.append(f"{where}: queries no cairn_ metric: {expr}")
        for name in sorted(used - known):
            bad.append(f"{where}: {name} is not exported by the code (or recorded by a rule)")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        sys.exit(1)
    print(f"monitoring: {len(queries)} queries use only the {len(known)} known metric names")


if __name__ == "__main__":
    main()
