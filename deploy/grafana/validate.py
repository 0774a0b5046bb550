#!/usr/bin/env python3
"""Offline checks of the Grafana provisioning files and dashboards (Grafana itself is not
needed): structure, datasource uids, variable use, and that every queried btx_* metric is one
documented in docs/metrics.md. Exits non-zero with one line per problem."""
import json
import pathlib
import re
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
DOCS = HERE.parent.parent / "docs" / "metrics.md"
REQUIRED_VARIABLES = {"btx-pipeline": {"pipeline"}}
MACROS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def check_provisioning():
    uids = set()
    for f in sorted((HERE / "provisioning" / "datasources").glob("*.yml")):
        doc = yaml.safe_load(f.read_text())
        if doc.get("apiVersion") != 1:
            err(f, "apiVersion must be 1")
        for ds in doc.get("datasources") or []:
            for key in ("name", "uid", "type", "url", "access"):
                if not ds.get(key):
                    err(f, f"datasource lacks {key}")
            uids.add(ds.get("uid"))
    for f in sorted((HERE / "provisioning" / "dashboards").glob("*.yml")):
        doc = yaml.safe_load(f.read_text())
        if doc.get("apiVersion") != 1:
            err(f, "apiVersion must be 1")
        providers = doc.get("providers") or []
        if not providers:
            err(f, "no dashboard providers")
        for p in providers:
            if not p.get("name") or p.get("type") != "file" or not (p.get("options") or {}).get("path"):
                err(f, "provider needs name, type: file and options.path")
    if not uids:
        err("provisioning/datasources", "no datasource provisioned")
    return uids


def documented_metrics():
    names = set(re.findall(r"^\|\s*`(btx_[a-z0-9_]+)`", DOCS.read_text(), re.M))
    if not names:
        err(DOCS, "no metric table rows found")
    return names


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def check_expr(where, expr, variables, metrics):
    for m in re.finditer(r"\$\{?(\w+)|\[\[(\w+)\]\]", expr):
        name = m.group(1) or m.group(2)
        if name in MACROS:
            continue
        if name not in variables:
            err(where, f"undefined variable ${name}")
        # Multi-value and All values are regexes; with = they would match nothing.
        elif not re.search(r'=~\s*"\$\{?' + name + r'\b', expr):
            err(where, f"${name} must be used in a =~ matcher")
    for name in re.findall(r"\bbtx_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in metrics and base not in metrics:
            err(where, f"{name} is not documented in docs/metrics.md")


def check_dashboard(f, ds_uids, metrics, seen_uids):
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        err(f, f"invalid JSON: {e}")
        return
    for key, typ in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                     ("templating", dict), ("time", dict)):
        if not isinstance(d.get(key), typ):
            err(f, f"missing or mistyped {key}")
    if d.get("uid") in seen_uids:
        err(f, f"duplicate dashboard uid {d.get('uid')}")
    seen_uids.add(d.get("uid"))
    variables = {v.get("name") for v in d.get("templating", {}).get("list", [])}
    missing = REQUIRED_VARIABLES.get(d.get("uid"), set()) - variables
    if missing:
        err(f, f"missing template variables {sorted(missing)}")
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") not in ds_uids:
            err(f, f"variable {v.get('name')} uses an unprovisioned datasource")
    ids = set()
    for p in panels(d.get("panels", [])):
        where = f"{f.name} panel {p.get('title')!r}"
        for key in ("id", "type", "title", "gridPos"):
            if key not in p:
                err(where, f"missing {key}")
        if p.get("id") in ids:
            err(where, f"duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "xywh") or g.get("x", 0) + g.get("w", 0) > 24:
            err(where, "gridPos needs integer x, y, w, h within 24 columns")
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") not in ds_uids:
            err(where, "panel datasource uid is not provisioned")
        targets = p.get("targets") or []
        if not targets:
            err(where, "no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            err(where, "targets need unique refIds")
        for t in targets:
            if not t.get("expr", "").strip():
                err(where, f"target {t.get('refId')} has no expr")
            elif (t.get("datasource") or {}).get("uid") not in ds_uids:
                err(where, f"target {t.get('refId')} datasource uid is not provisioned")
            else:
                check_expr(where, t["expr"], variables, metrics)


def main():
    ds_uids = check_provisioning()
    metrics = documented_metrics()
    seen = set()
    files = sorted((HERE / "dashboards").glob("*.json"))
    if not files:
        err(HERE / "dashboards", "no dashboards")
    for f in files:
        check_dashboard(f, ds_uids, metrics, seen)
    for e in errors:
        print(f"grafana: {e}", file=sys.stderr)
    if not errors:
        print(f"grafana: {len(files)} dashboards OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
