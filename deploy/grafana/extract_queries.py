#!/usr/bin/env python3
"""Print every PromQL expression of the btx Grafana dashboards, one per line.

Dashboard variables ($pipeline, ${pipeline}, [[pipeline]]) become their "All" value (`.*`,
which the dashboards only use in =~ matchers) and Grafana's interval macros become fixed
durations, so each line can be sent to Prometheus' /api/v1/query as is.

  extract_queries.py [--interval 1m] [--range 1h] [--with-variables] [dashboard.json ...]

Without files it reads deploy/grafana/dashboards/*.json. --with-variables also prints the
series selector of each label_values(...) variable query.
"""
import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent


def panels(items):
    """Yields every panel, descending into collapsed rows (whose children nest)."""
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def variable_query(var):
    q = var.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else q


def label_values_selector(query):
    """`label_values(sel, label)` -> `sel`; `label_values(label)` has no selector -> None."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", query, re.S)
    return m.group(1).strip() if m else None


def substitute(expr, variables, interval, range_):
    macros = {
        "__rate_interval": interval, "__interval": interval, "__range": range_,
        "__interval_ms": str(int(parse_seconds(interval) * 1000)),
        "__range_s": str(int(parse_seconds(range_))),
    }
    values = {**{v: ".*" for v in variables}, **macros}

    def repl(m):
        name = m.group("a") or m.group("b") or m.group("c")
        if name not in values:
            raise ValueError(f"unknown variable ${name} in: {expr}")
        return values[name]

    pattern = r"\$\{(?P<a>\w+)(?::\w+)?\}|\[\[(?P<b>\w+)\]\]|\$(?P<c>\w+)"
    return re.sub(pattern, repl, expr)


def parse_seconds(d):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", d)
    if not m:
        raise ValueError(f"bad duration {d!r}")
    return int(m.group(1)) * units[m.group(2)]


def extract(path, interval, range_, with_variables):
    dash = json.loads(pathlib.Path(path).read_text())
    templ = dash.get("templating", {}).get("list", [])
    variables = [v["name"] for v in templ]
    out = []
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr", "").strip():
                out.append(substitute(" ".join(t["expr"].split()), variables, interval, range_))
    if with_variables:
        for v in templ:
            sel = label_values_selector(variable_query(v)) if v.get("type") == "query" else None
            if sel:
                out.append(substitute(sel, variables, interval, range_))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboards", nargs="*")
    ap.add_argument("--interval", default="1m", help="value of $__rate_interval/$__interval")
    ap.add_argument("--range", default="1h", help="value of $__range")
    ap.add_argument("--with-variables", action="store_true")
    args = ap.parse_args()
    files = args.dashboards or sorted(str(p) for p in (HERE / "dashboards").glob("*.json"))
    seen = set()
    for f in files:
        for expr in extract(f, args.interval, args.range, args.with_variables):
            if expr not in seen:
                seen.add(expr)
                print(expr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
