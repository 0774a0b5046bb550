#!/usr/bin/env python3
"""Checks that the daemons accept what the deployment files give them: every flag in the
Kubernetes containers' args and in the systemd units' ExecStart is one that btx-scheduler or
btx-worker defines (their CLI11 definitions in scheduler/main.cc and worker/main.cc) and does not
refuse (btx-worker's --token: a secret on a command line), and every
variable a unit sets is either used on its ExecStart line or read by the daemon itself
(->envname). Without a build: a flag that a daemon does not know would make it exit at
start-up, in a crash loop that no other offline check sees. Exits non-zero with one line per
problem."""
import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent
SOURCES = {"btx-scheduler": ROOT / "scheduler" / "main.cc", "btx-worker": ROOT / "worker" / "main.cc"}
errors = []


def cli(binary):
    """(flags, environment variables) that the daemon's CLI11 definitions name."""
    text = SOURCES[binary].read_text()
    flags = set()
    for names in re.findall(r'add_(?:option|flag)\(\s*"([^"]+)"', text):
        flags |= {n for n in names.split(",") if n.startswith("--")}
    return flags, set(re.findall(r'envname\(\s*"([^"]+)"', text))


# Flags a daemon still defines only to refuse them with an explanation (exit 2).
REFUSED = {"btx-worker": {"--token": "a token on the command line is visible to every user (ps); "
                                     "use BTX_WORKER_TOKEN or --token-file"}}


def check_args(where, binary, args, flags):
    for arg in args:
        name = arg.split("=", 1)[0]
        if not arg.startswith("--"):
            continue
        if name in REFUSED.get(binary, {}):
            errors.append(f"{where}: {binary} refuses {name}: {REFUSED[binary][name]}")
        elif name not in flags:
            errors.append(f"{where}: {binary} has no flag {name}")


def check_k8s():
    directory = DEPLOY / "k8s"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    containers = 0
    for name in kustomization.get("resources") or []:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            pod = ((doc or {}).get("spec") or {}).get("template", {}).get("spec") or {}
            for c in pod.get("containers") or []:
                binary = (c.get("command") or [""])[0]
                if binary in SOURCES:
                    containers += 1
                    check_args(f"k8s/{name} container {c.get('name')}", binary, c.get("args") or [], cli(binary)[0])
    return containers


def check_units():
    units = 0
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        lines = unit.read_text().splitlines()
        exec_start = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStart=")]
        if len(exec_start) != 1:
            errors.append(f"systemd/{unit.name}: expected one ExecStart line")
            continue
        words = exec_start[0].split()
        binary = pathlib.Path(words[0]).name
        if binary not in SOURCES:
            errors.append(f"systemd/{unit.name}: ExecStart runs {words[0]}, not a btx daemon")
            continue
        units += 1
        flags, env = cli(binary)
        check_args(f"systemd/{unit.name}", binary, words[1:], flags)
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", exec_start[0]))
        for line in lines:
            match = re.match(r"Environment=([A-Za-z_][A-Za-z0-9_]*)=", line)
            if match and match.group(1) not in used | env:
                errors.append(f"systemd/{unit.name}: {match.group(1)} is neither on the ExecStart line nor "
                              f"read by {binary}")
        for var in sorted(used):
            if not any(re.match(rf"Environment={var}=", l) for l in lines):
                errors.append(f"systemd/{unit.name}: ExecStart uses ${var}, which the unit gives no default")
    return units


def main():
    containers, units = check_k8s(), check_units()
    for e in errors:
        print(f"flags: {e}", file=sys.stderr)
    if not errors:
        print(f"flags: {containers} containers and {units} units use only flags the daemons define")
    return 1 if errors or not containers or not units else 0


if __name__ == "__main__":
    sys.exit(main())
