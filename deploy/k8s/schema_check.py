#!/usr/bin/env python3
"""Schema validation of the Kubernetes manifests, offline, against the API server's own schemas.

Built-in kinds are checked with the OpenAPI-derived JSON schemas that the PyPI package
kubernetes-validate bundles, in their strict form (an unknown field is an error, as with
`kubectl apply --validate=strict`), against the oldest and the newest Kubernetes release the
package carries, so that an API removed or not yet available on one of them shows up.
Custom resources are checked against schemas generated from their CRDs: the Prometheus
Operator's (ServiceMonitor, PodMonitor, PrometheusRule, ...) from the models in the PyPI package
cloudcoil.models.prometheus_operator, and cert-manager's (Certificate, Issuer, ...) from
cloudcoil.models.cert_manager, made strict the same way. A custom resource of a group without a
known schema is reported as skipped; an unknown built-in kind or apiVersion fails.

    schema_check.py [FILE...]   default: every resource listed in deploy/k8s/kustomization.yaml
                                and in the optional kustomizations beside it (cert-manager/)
    schema_check.py --self-test run on deploy/k8s/testdata/*.yaml; each file's "# expect:" line
                                (invalid, skipped or valid) must be what the check finds

Needs the packages in deploy/k8s/requirements.txt (scripts/install-deps puts them in a
virtual environment; deploy/k8s/schema-check runs this script with it). Exits non-zero on any
failure, with one line per problem naming the file, the object, the Kubernetes version and the
field path.
"""
import copy
import functools
import importlib
import pathlib
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

HERE = pathlib.Path(__file__).resolve().parent

# API group of a custom resource -> the module whose pydantic models describe its kinds, per
# version (module.<version>.<Kind>).
CRD_MODELS = {
    "monitoring.coreos.com": "cloudcoil.models.prometheus_operator",
    "cert-manager.io": "cloudcoil.models.cert_manager",
}

# Kustomizations checked by default: the one `kubectl apply -k deploy/k8s` applies, and the
# optional ones applied on their own (custom resources that need their operator installed).
KUSTOMIZATIONS = [HERE, HERE / "cert-manager"]


def kubernetes_versions():
    versions = kv.all_versions()
    return sorted({versions[0], versions[-1]}, key=lambda v: tuple(int(x) for x in v.split(".")))


def is_builtin_group(api_version):
    """Core ("v1"), unqualified groups ("apps/v1") and *.k8s.io groups come with Kubernetes."""
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


def strict(schema):
    """Forbids fields a schema does not name, as the -strict schemas of kubernetes-validate do."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(api_version, kind):
    """A validator for a custom resource, or None when no schema is known for it."""
    group, _, version = api_version.partition("/")
    module_name = CRD_MODELS.get(group)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(f"{module_name}.{version}")
    except ImportError:
        return None
    model = getattr(module, kind, None)
    if model is None or not hasattr(model, "model_json_schema"):
        return None
    schema = strict(copy.deepcopy(model.model_json_schema(by_alias=True)))
    # The generated models default apiVersion and kind; a manifest must state them.
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def field_path(error):
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def best_message(error):
    # anyOf/oneOf failures (optional fields are "X or null") hide the useful message one level down.
    while error.context:
        error = min(error.context, key=lambda e: (-len(e.absolute_path), e.message))
    return f"{field_path(error)}: {error.message}"


def check_document(doc, where):
    """Returns (failures, skipped) for one object."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return [f"{where}: not a Kubernetes object (apiVersion and kind are required)"], []
    api_version, kind = doc["apiVersion"], doc["kind"]
    failures, skipped = [], []
    if not is_builtin_group(api_version):
        validator = crd_validator(api_version, kind)
        if validator is None:
            return [], [f"{where}: no schema for custom resource {kind} ({api_version}); not validated"]
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            failures.append(f"{where} [{api_version} CRD]: {best_message(error)}")
        return failures, skipped
    for version in kubernetes_versions():
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            failures.append(f"{where} [k8s {version}]: Kubernetes {version} has no {kind} in {api_version}")
        except kv.ValidationError as error:
            failures.append(f"{where} [k8s {version}]: {best_message(error)}")
    return failures, skipped


def manifest_files():
    files = []
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        files += [directory / name for name in kustomization.get("resources") or []]
    return files


def check_files(paths):
    failures, skipped, checked = [], [], 0
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(pathlib.Path(path).read_text()))
        except (OSError, yaml.YAMLError) as error:
            failures.append(f"{path}: {error}")
            continue
        for doc in docs:
            if doc is None:
                continue
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
            kind = doc.get("kind") if isinstance(doc, dict) else None
            shown = pathlib.Path(path).resolve()
            shown = shown.relative_to(HERE) if shown.is_relative_to(HERE) else pathlib.Path(path).name
            f, s = check_document(doc, f"{shown} {kind}/{name}")
            failures += f
            skipped += s
            checked += 1
    return failures, skipped, checked


def self_test():
    """Each test file must come out as its "# expect:" line says: the check must still catch errors."""
    problems = []
    files = sorted((HERE / "testdata").glob("*.yaml"))
    if not files:
        problems.append("no files in deploy/k8s/testdata")
    for path in files:
        match = re.search(r"^# expect: (invalid|skipped|valid)\b", path.read_text(), re.M)
        if not match:
            problems.append(f"{path.name}: no '# expect: invalid|skipped|valid' line")
            continue
        failures, skipped, _ = check_files([path])
        got = "invalid" if failures else "skipped" if skipped else "valid"
        if got != match.group(1):
            problems.append(f"{path.name}: expected {match.group(1)}, got {got}: {failures + skipped}")
        else:
            for line in failures + skipped:
                print(f"as expected: {line}")
    for p in problems:
        print(f"k8s schema self-test: {p}", file=sys.stderr)
    print(f"k8s schema self-test: {len(files) - len(problems)}/{len(files)} files as expected")
    return 1 if problems else 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    paths = argv or manifest_files()
    failures, skipped, checked = check_files(paths)
    for line in skipped:
        print(f"k8s schema: skipped: {line}")
    for line in failures:
        print(f"k8s schema: {line}", file=sys.stderr)
    versions = " and ".join(kubernetes_versions())
    print(f"k8s schema: {checked} objects against Kubernetes {versions}: {len(failures)} problem(s), "
          f"{len(skipped)} skipped")
    return 1 if failures or not checked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
