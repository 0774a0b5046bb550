#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests without a cluster: every YAML document parses,
has apiVersion/kind/metadata.name, the kustomization lists every manifest, and the objects
refer to each other consistently (selectors, named ports, Secrets, ConfigMaps, claims, the
daemons' flags, the TLS and token files the flags name and the Secrets that hold them, probes
that work with TLS on), and the optional cert-manager kustomization issues those Secrets with
the names and usages the daemons need. Schema validation proper (field names and types) is
schema_check.py's. Exits non-zero with one line per problem."""
import pathlib
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
errors = []

# The scheduler listens on 0.0.0.0, which it refuses to do without TLS and authentication
# (docs/security.md), so the TLS and identity flags are required too.
REQUIRED_FLAGS = {
    "btx-scheduler": ["--listen=0.0.0.0:50051", "--metrics-listen=0.0.0.0:9090",
                      "--database-url=", "--artifact-root=", "--data-root=", "--tls-cert=", "--tls-key=",
                      "--tls-client-ca=", "--tokens-file="],
    "btx-worker": ["--scheduler=scheduler:50051", "--metrics-listen=0.0.0.0:9091",
                   "--slots=0", "--tls-ca=", "--tls-cert=", "--tls-key="],
}
# Flags whose value is a file that must be in the pod, from a Secret volume.
FILE_FLAGS = ["--tls-cert=", "--tls-key=", "--tls-ca=", "--tls-client-ca=", "--tokens-file="]
# Secrets the pods mount that the kustomization deliberately does not create (no key in git):
# made with kubectl (docs/deploy.md) or, for the certificates, by cert-manager/. Name -> keys.
EXTERNAL_SECRETS = {
    "btx-scheduler-tls": {"tls.crt", "tls.key", "ca.crt"},
    "btx-worker-tls": {"tls.crt", "tls.key", "ca.crt"},
    "btx-tokens": {"tokens"},
}
# The extended key usage each daemon's own certificate (--tls-cert) needs.
CERT_USAGE = {"btx-scheduler": "server auth", "btx-worker": "client auth"}


def err(where, msg):
    errors.append(f"{where}: {msg}")


def dig(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def load(directory=HERE):
    prefix = "" if directory == HERE else f"{directory.relative_to(HERE)}/"
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources = kust.get("resources") or []
    listed = set(resources)
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    for missing in sorted(on_disk - listed):
        err(f"{prefix}kustomization.yaml", f"{missing} is not listed in resources")
    docs = []
    for name in resources:
        path = directory / name
        name = prefix + name
        if not path.exists():
            err(f"{prefix}kustomization.yaml", f"resource {name} does not exist")
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


def secret_keys(docs):
    """Secret name -> the keys it holds, for the Secrets of the manifests and the external ones."""
    keys = {name: set(k) for name, k in EXTERNAL_SECRETS.items()}
    for _, s in by_kind(docs, "Secret"):
        keys[dig(s, "metadata", "name")] = set(s.get("stringData") or {}) | set(s.get("data") or {})
    return keys


def flag_value(args, flag):
    """The value of --flag=VALUE in args, or None."""
    for a in args:
        if a.startswith(flag):
            return a[len(flag):]
    return None


def file_source(pod, container, path):
    """(secret name, key) that provides the file at path in the container, or an error string."""
    mounts = [m for m in container.get("volumeMounts") or []
              if path.startswith(m.get("mountPath", "").rstrip("/") + "/")]
    if not mounts:
        return f"{path} is on no volume mount"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = next((v for v in pod.get("volumes") or [] if v.get("name") == mount.get("name")), None)
    secret = dig(volume, "secret", "secretName")
    if not secret:
        return f"{path} is not on a Secret volume"
    if mount.get("subPath"):
        return f"{path} is mounted with subPath, which a Secret update never reaches"
    items = dig(volume, "secret", "items")
    if items:
        key = next((i.get("key") for i in items if i.get("path") == rel), None)
        if key is None:
            return f"{path}: volume {volume['name']} projects no item to {rel}"
        return secret, key
    return secret, rel


def check_workloads(docs):
    names = lambda kind: {dig(d, "metadata", "name") for _, d in by_kind(docs, kind)}
    configmaps, claims = names("ConfigMap"), names("PersistentVolumeClaim")
    keys = secret_keys(docs)
    secrets = set(keys)
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
            for flag in FILE_FLAGS:
                path = flag_value(args, flag)
                if path is None:
                    continue
                source = file_source(pod, c, path)
                if isinstance(source, str):
                    err(where, f"{flag}{path}: {source}")
                elif source[0] in keys and source[1] not in keys[source[0]]:
                    err(where, f"{flag}{path}: Secret {source[0]} has no key {source[1]}")
            port_names = {p.get("name") for p in c.get("ports") or []}
            tls = flag_value(args, "--tls-cert=") is not None
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name) or {}
                if tls and "grpc" in probe:
                    err(where, f"{probe_name}: the kubelet's gRPC probe speaks plaintext and fails against "
                               "TLS; probe httpGet /healthz on the metrics port")
                port = dig(probe, "httpGet", "port")
                if isinstance(port, str) and port not in port_names:
                    err(where, f"{probe_name}: port {port} is not a container port name")
        for v in pod.get("volumes") or []:
            claim = dig(v, "persistentVolumeClaim", "claimName")
            if claim and claim not in claims:
                err(where, f"volume {v.get('name')} refers to missing claim {claim}")
            secret = dig(v, "secret", "secretName")
            if secret and secret not in secrets:
                err(where, f"volume {v.get('name')} refers to Secret {secret}, neither in the manifests "
                           "nor one of the Secrets created by hand (EXTERNAL_SECRETS)")
            for item in dig(v, "secret", "items", default=[]):
                if secret in keys and item.get("key") not in keys[secret]:
                    err(where, f"volume {v.get('name')}: Secret {secret} has no key {item.get('key')}")
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


def check_cert_manager(docs, workloads):
    """The optional cert-manager/ kustomization must issue every certificate Secret the daemons
    mount, with the usage each needs, and the scheduler's must name the host workers dial."""
    directory = HERE / "cert-manager"
    if not (directory / "kustomization.yaml").exists():
        return
    cm_docs = load(directory)
    issuers = {dig(d, "metadata", "name") for _, d in by_kind(cm_docs, "Issuer")}
    certs = {}
    for where, c in by_kind(cm_docs, "Certificate"):
        certs[dig(c, "spec", "secretName")] = (where, c)
        ref = dig(c, "spec", "issuerRef") or {}
        if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
            err(where, f"issuerRef names Issuer {ref.get('name')}, which is not in cert-manager/")
    for _, d in by_kind(cm_docs, "Issuer"):
        ca = dig(d, "spec", "ca", "secretName")
        if ca and ca not in certs:
            err(f"cert-manager Issuer/{dig(d, 'metadata', 'name')}", f"CA Secret {ca} is issued by no Certificate")
    dialled = set()
    for _, d in workloads:
        for c in dig(d, "spec", "template", "spec", "containers", default=[]):
            args = c.get("args") or []
            if (c.get("command") or [""])[0] == "btx-worker":
                host = (flag_value(args, "--scheduler=") or "").rsplit(":", 1)[0]
                dialled.add(flag_value(args, "--tls-server-name=") or host)
    for where, d in workloads:
        pod = dig(d, "spec", "template", "spec") or {}
        for c in pod.get("containers") or []:
            binary = (c.get("command") or [""])[0]
            path = flag_value(c.get("args") or [], "--tls-cert=")
            source = file_source(pod, c, path) if path else None
            if not isinstance(source, tuple) or source[0] not in EXTERNAL_SECRETS:
                continue
            if source[0] not in certs:
                err("cert-manager/", f"no Certificate issues Secret {source[0]}, which {where} mounts")
                continue
            cert_where, cert = certs[source[0]]
            usage = CERT_USAGE.get(binary)
            if usage and usage not in (dig(cert, "spec", "usages") or []):
                err(cert_where, f"usages lack '{usage}', which {binary}'s certificate needs")
            if binary == "btx-scheduler":
                names = set(dig(cert, "spec", "dnsNames") or [])
                for host in sorted(dialled - names):
                    err(cert_where, f"dnsNames lack {host}, the name workers check in the scheduler's certificate")


def main():
    docs = load()
    for where, s in by_kind(docs, "Secret"):
        data = {**(s.get("stringData") or {}), **(s.get("data") or {})}
        if dig(s, "metadata", "name") == "btx-database" and "BTX_DATABASE_URL" not in data:
            err(where, "Secret lacks BTX_DATABASE_URL")
    workloads = check_workloads(docs)
    check_services(docs, workloads)
    check_monitors(docs)
    check_cert_manager(docs, workloads)
    for e in errors:
        print(f"k8s: {e}", file=sys.stderr)
    if not errors:
        print(f"k8s: {len(docs)} objects OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
