#!/usr/bin/env bash
# Offline checks of everything under deploy/: Prometheus config, alert rules and their unit
# tests, PromQL of every dashboard query, Grafana dashboards and provisioning, Kubernetes
# manifests and systemd units (TLS and authentication on, flags the daemons define). Exits
# non-zero if any check fails; optional tools that are missing are reported as skipped.
#   deploy/check.sh [--no-schema]
# Needs promtool and python3 with PyYAML, and for the Kubernetes schemas the Python tools that
# scripts/install-deps installs (--no-schema leaves that step out).
set -uo pipefail
no_schema=0
[[ "${1:-}" == "--no-schema" ]] && no_schema=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0

step() {
  local name="$1"
  shift
  if out="$("$@" 2>&1)"; then
    echo "ok    ${name}"
  else
    echo "FAIL  ${name}"
    sed 's/^/      /' <<<"$out"
    failures=$((failures + 1))
  fi
}
skip() { echo "skip  $1"; }

# Every dashboard expression becomes a recording rule, so promtool's parser checks the PromQL.
promql_of_dashboards() {
  python3 "$here/grafana/extract_queries.py" --with-variables > "$tmp/queries.txt" || return 1
  [[ -s "$tmp/queries.txt" ]] || { echo "no queries extracted"; return 1; }
  python3 - "$tmp/queries.txt" "$tmp/dashboard_rules.yml" <<'PY' || return 1
import sys, yaml
exprs = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
rules = [{"record": f"btx_dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, open(sys.argv[2], "w"))
PY
  promtool check rules "$tmp/dashboard_rules.yml"
}

# systemd-analyze verify wants the binaries and env files to exist; swap in stand-ins so it
# checks every other directive, and treat any diagnostic (e.g. an unknown key) as failure.
verify_units() {
  local unit out
  for unit in "$here"/systemd/*.service; do
    sed -e 's|^ExecStart=[^ ]*|ExecStart=/bin/true|' -e '/^EnvironmentFile=/d' \
        -e '/^RequiresMountsFor=/d' "$unit" > "$tmp/$(basename "$unit")"
  done
  out="$(cd "$tmp" && systemd-analyze verify --man=no ./*.service 2>&1)" || { echo "$out"; return 1; }
  [[ -z "$out" ]] || { echo "$out"; return 1; }
}

# The scheduler listens on 0.0.0.0, which it refuses to do without TLS and authentication, and
# the worker must dial it with TLS and a client certificate (docs/security.md).
units_use_tls() {
  local unit="$here/systemd/btx-scheduler.service" flag
  for flag in '--tls-cert ${BTX_SCHEDULER_TLS_CERT}' '--tls-key ${BTX_SCHEDULER_TLS_KEY}' \
              '--tls-client-ca ${BTX_SCHEDULER_TLS_CLIENT_CA}' '--tokens-file ${BTX_SCHEDULER_TOKENS_FILE}'; do
    grep -q -F -e "$flag" <(grep '^ExecStart=' "$unit") || { echo "btx-scheduler.service: ExecStart lacks $flag"; return 1; }
  done
  unit="$here/systemd/btx-worker.service"
  for flag in BTX_WORKER_TLS_CA= BTX_WORKER_TLS_CERT= BTX_WORKER_TLS_KEY=; do
    grep -q "^Environment=${flag}/" "$unit" || { echo "btx-worker.service: no Environment=${flag}<file>"; return 1; }
  done
}

units_have_required_keys() {
  local unit key
  for unit in "$here"/systemd/*.service; do
    for key in ExecStart= Restart=on-failure EnvironmentFile= NoNewPrivileges=yes \
               ProtectSystem=strict WantedBy=; do
      grep -q "^${key}" "$unit" || { echo "$(basename "$unit"): missing ${key}"; return 1; }
    done
  done
}

command -v promtool >/dev/null || { echo "FAIL  promtool not found (Debian: apt install prometheus)"; exit 1; }
command -v python3 >/dev/null || { echo "FAIL  python3 not found"; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "FAIL  PyYAML missing (Debian: apt install python3-yaml)"; exit 1; }

cd "$here/prometheus" || exit 1
step "promtool check config prometheus.yml" promtool check config prometheus.yml
step "promtool check rules alerts.yml" promtool check rules alerts.yml
step "promtool test rules alerts_test.yml" promtool test rules alerts_test.yml
cd "$here" || exit 1

step "dashboard PromQL parses" promql_of_dashboards
step "grafana dashboards and provisioning" python3 "$here/grafana/validate.py"
step "k8s manifests (parse, required keys, references)" python3 "$here/k8s/validate.py"

if command -v kubectl >/dev/null; then
  step "kubectl kustomize deploy/k8s" kubectl kustomize "$here/k8s"
  step "kubectl kustomize deploy/k8s/cert-manager (optional)" kubectl kustomize "$here/k8s/cert-manager"
else
  skip "kubectl kustomize (kubectl not installed)"
fi
# Schema validation, strict, of the built-in kinds and the ServiceMonitor CRD (k8s/schema-check;
# its Python tools come from scripts/install-deps). ctest runs it as a test of its own.
if ((no_schema)); then
  skip "Kubernetes schema validation (--no-schema; ctest runs deploy_k8s_schema)"
else
  step "k8s schemas (strict; built-in kinds and CRDs)" "$here/k8s/schema-check"
  step "k8s schema check catches broken manifests" "$here/k8s/schema-check" --self-test
fi

step "systemd units have required keys" units_have_required_keys
step "systemd units serve and dial TLS" units_use_tls
step "daemon flags of units and manifests exist" python3 "$here/check_flags.py"
if command -v systemd-analyze >/dev/null; then
  step "systemd-analyze verify" verify_units
else
  skip "systemd-analyze verify (systemd not installed)"
fi

if ((failures)); then
  echo "deploy/check.sh: ${failures} check(s) failed"
  exit 1
fi
echo "deploy/check.sh: all checks passed"
