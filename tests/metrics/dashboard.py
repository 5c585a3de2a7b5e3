#!/usr/bin/env python3
"""Check a Grafana dashboard against a real /metrics scrape.

    dashboard.py DASHBOARD.json METRICS.txt RULES_OUT.yml

Every PromQL expression of the dashboard (panel targets, also inside rows,
and label_values() of its variables) must name only series the scrape has:
each amp2dify_* name a sample name of the scrape (histograms: _bucket, _sum,
_count), each label of a selector or of by()/without() a label of such a
series (instance and job are added by Prometheus at scrape time), and each
value an equality matcher asks for a value the scrape shows. The
expressions, with Grafana's variables replaced, go to RULES_OUT.yml as
recording rules, so that `promtool check rules` parses them. Exit 1 naming
every problem.
"""
import json
import re
import sys

SCRAPE_LABELS = {"instance", "job"}
VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$__interval": "1m",
    "$instance": ".*",
    "$app": ".*",
}
NAME = re.compile(r"\b(amp2dify_[a-zA-Z0-9_]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z0-9_]+)\s*,\s*([a-zA-Z0-9_]+)\s*\)")


def read_scrape(path):
    """sample name -> {label: set of values}."""
    series = {}
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            m = line_re.match(line)
            if not m:
                continue
            labels = series.setdefault(m.group(1), {})
            for lm in MATCHER.finditer(m.group(3) or ""):
                labels.setdefault(lm.group(1), set()).add(lm.group(3))
    return series


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def main():
    dash_path, scrape_path, rules_path = sys.argv[1:4]
    with open(dash_path) as f:
        dash = json.load(f)
    series = read_scrape(scrape_path)
    problems = []
    exprs = []
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            exprs.append((p.get("title", "?"), t["expr"]))
    variables = dash.get("templating", {}).get("list", [])
    for v in variables:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") != "query":
            continue
        m = LABEL_VALUES.fullmatch(q.strip())
        if not m:
            problems.append(f"variable {v['name']}: expected label_values(metric, label), found {q}")
            continue
        name, label = m.groups()
        if name not in series:
            problems.append(f"variable {v['name']}: {name} is not in the scrape")
        elif label not in series[name] and label not in SCRAPE_LABELS:
            problems.append(f"variable {v['name']}: {name} has no label {label}")
    if not exprs:
        problems.append("no expressions in the dashboard")

    rules = []
    for title, expr in exprs:
        e = expr
        for var, val in VARIABLES.items():
            e = e.replace(var, val)
        if "$" in e:
            problems.append(f"{title}: unknown Grafana variable in {expr}")
        rules.append(e)
        names = NAME.findall(e)
        if not names:
            problems.append(f"{title}: names no amp2dify metric: {expr}")
        known = []
        for name, sel in names:
            if name not in series:
                problems.append(f"{title}: {name} is not in the scrape")
                continue
            known.append(name)
            for label, op, value in MATCHER.findall(sel or ""):
                if label in SCRAPE_LABELS:
                    continue
                if label not in series[name]:
                    problems.append(f"{title}: {name} has no label {label}")
                elif op == "=" and value not in series[name][label]:
                    problems.append(f"{title}: {name} never has {label}=\"{value}\"")
        for group in GROUPING.findall(e):
            for label in (x.strip() for x in group.split(",")):
                if not label or label in SCRAPE_LABELS:
                    continue
                if not any(label in series[n] for n in known):
                    problems.append(f"{title}: no metric of the expression has label {label}")

    with open(rules_path, "w") as f:
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, e in enumerate(rules):
            f.write(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(e)}\n")
    for p in problems:
        print(f"dashboard: {p}", file=sys.stderr)
    print(f"dashboard: {len(exprs)} expressions, {len(variables)} variables checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
