#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests without a cluster: every YAML document parses,
has apiVersion/kind/metadata.name, the kustomization lists every manifest, and the objects
refer to each other consistently (selectors, named ports, Secrets, ConfigMaps, claims, the
daemons' flags). Schema validation proper is left to kubernetes-validate when installed
(see deploy/check.sh). Exits non-zero with one line per problem."""
import pathlib
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
errors = []

REQUIRED_FLAGS = {
    "btx-scheduler": ["--listen=0.0.0.0:50051", "--metrics-listen=0.0.0.0:9090",
                      "--database-url=", "--artifact-root="],
    "btx-worker": ["--scheduler=scheduler:50051", "--metrics-listen=0.0.0.0:9091",
                   "--slots=auto", "--artifact-root="],
}


def err(where, msg):
    errors.append(f"{where}: {msg}")


def dig(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def load():
    kust = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    resources = kust.get("resources") or []
    listed = set(resources)
    on_disk = {p.name for p in HERE.glob("*.yaml")} - {"kustomization.yaml"}
    for missing in sorted(on_disk - listed):
        err("kustomization.yaml", f"{missing} is not listed in resources")
    docs = []
    for name in resources:
        path = HERE / name
        if not path.exists():
            err("kustomization.yaml", f"resource {name} does not exist")
            continue
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            err(name, f"invalid YAML: {e}")
            continue
        for doc in loaded:
            if doc is None:
                continue
            where = f"{name} {doc.get('kind')}/{dig(doc, 'metadata', 'name')}"
            for key in ("apiVersion", "kind"):
                if not doc.get(key):
                    err(where, f"missing {key}")
            if not dig(doc, "metadata", "name"):
                err(where, "missing metadata.name")
            docs.append((where, doc))
    return docs


def by_kind(docs, kind):
    return [(w, d) for w, d in docs if d.get("kind") == kind]


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_workloads(docs):
    names = lambda kind: {dig(d, "metadata", "name") for _, d in by_kind(docs, kind)}
    secrets, configmaps, claims = names("Secret"), names("ConfigMap"), names("PersistentVolumeClaim")
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "DaemonSet")
    for where, d in workloads:
        selector = dig(d, "spec", "selector", "matchLabels") or {}
        labels = dig(d, "spec", "template", "metadata", "labels") or {}
        if not matches(selector, labels):
            err(where, "spec.selector.matchLabels does not match the pod template labels")
        pod = dig(d, "spec", "template", "spec") or {}
        containers = pod.get("containers") or []
        if not containers:
            err(where, "no containers")
        for c in containers:
            if not c.get("name") or not c.get("image"):
                err(where, "container needs name and image")
            for p in c.get("ports") or []:
                if not p.get("name"):
                    err(where, f"port {p.get('containerPort')} is unnamed")
            if not dig(c, "resources", "requests"):
                err(where, f"container {c.get('name')} has no resource requests")
            for env in c.get("env") or []:
                ref = dig(env, "valueFrom", "secretKeyRef", "name")
                if ref and ref not in secrets:
                    err(where, f"env {env['name']} refers to missing Secret {ref}")
                ref = dig(env, "valueFrom", "configMapKeyRef", "name")
                if ref and ref not in configmaps:
                    err(where, f"env {env['name']} refers to missing ConfigMap {ref}")
            binary = (c.get("command") or [""])[0]
            args = c.get("args") or []
            for flag in REQUIRED_FLAGS.get(binary, []):
                if not any(a.startswith(flag) for a in args):
                    err(where, f"{binary} lacks {flag}")
        for v in pod.get("volumes") or []:
            claim = dig(v, "persistentVolumeClaim", "claimName")
            if claim and claim not in claims:
                err(where, f"volume {v.get('name')} refers to missing claim {claim}")
        if d.get("kind") == "DaemonSet":
            gpus = [dig(c, "resources", "limits", "nvidia.com/gpu") for c in containers]
            if not any(gpus):
                err(where, "worker requests no nvidia.com/gpu")
            if not pod.get("nodeSelector"):
                err(where, "worker has no nodeSelector")
            if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
                err(where, "worker does not tolerate nvidia.com/gpu taints")
    return workloads


def check_services(docs, workloads):
    for where, svc in by_kind(docs, "Service"):
        selector = dig(svc, "spec", "selector") or {}
        pods = [d for _, d in workloads if matches(selector, dig(d, "spec", "template", "metadata", "labels") or {})]
        if not pods:
            err(where, "selector matches no workload")
            continue
        port_names = {p.get("name") for d in pods
                      for c in dig(d, "spec", "template", "spec", "containers", default=[])
                      for p in c.get("ports") or []}
        for p in dig(svc, "spec", "ports", default=[]):
            if not p.get("name"):
                err(where, f"port {p.get('port')} is unnamed")
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in port_names:
                err(where, f"targetPort {p['targetPort']} is not a container port name")
    scheduler = [d for _, d in by_kind(docs, "Service") if dig(d, "metadata", "name") == "scheduler"]
    if not scheduler:
        err("manifests", "no Service named scheduler (workers dial scheduler:50051)")
    else:
        ports = {(p.get("name"), p.get("port")) for p in dig(scheduler[0], "spec", "ports", default=[])}
        for want in (("grpc", 50051), ("metrics", 9090)):
            if want not in ports:
                err("Service/scheduler", f"missing port {want[0]}={want[1]}")


def check_monitors(docs):
    services = [d for _, d in by_kind(docs, "Service")]
    monitors = by_kind(docs, "ServiceMonitor")
    if not monitors:
        err("manifests", "no ServiceMonitor")
    for where, m in monitors:
        if m.get("apiVersion") != "monitoring.coreos.com/v1":
            err(where, "apiVersion must be monitoring.coreos.com/v1")
        selector = dig(m, "spec", "selector", "matchLabels") or {}
        targets = [s for s in services if matches(selector, dig(s, "metadata", "labels") or {})]
        if not targets:
            err(where, "selector matches no Service")
        endpoints = dig(m, "spec", "endpoints", default=[])
        if not endpoints:
            err(where, "no endpoints")
        for e in endpoints:
            names = {p.get("name") for s in targets for p in dig(s, "spec", "ports", default=[])}
            if e.get("port") not in names:
                err(where, f"endpoint port {e.get('port')} is not a port of the selected Service")
        job_label = dig(m, "spec", "jobLabel")
        for s in targets:
            if job_label and not (dig(s, "metadata", "labels") or {}).get(job_label, "").startswith("btx-"):
                err(where, "jobLabel must yield the job names the alerts use (btx-scheduler, btx-worker)")


def main():
    docs = load()
    for where, s in by_kind(docs, "Secret"):
        data = {**(s.get("stringData") or {}), **(s.get("data") or {})}
        if "BTX_DATABASE_URL" not in data:
            err(where, "Secret lacks BTX_DATABASE_URL")
    workloads = check_workloads(docs)
    check_services(docs, workloads)
    check_monitors(docs)
    for e in errors:
        print(f"k8s: {e}", file=sys.stderr)
    if not errors:
        print(f"k8s: {len(docs)} objects OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
