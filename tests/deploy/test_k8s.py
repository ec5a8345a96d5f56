"""Offline validation of the Kustomize tree k8s/: the base, the overlays dev, prod and
one-run-per-pod, and the optional monitoring component (rendered through prod by
tests/deploy/monitored).

No cluster is needed. Each kustomization is rendered by the small kustomize of
tests/deploy/kustomize.py; where kubectl is installed, `kubectl kustomize` must render the same
objects. Core objects are validated against the Kubernetes JSON schemas bundled by the PyPI
package kubernetes-validate (strict: unknown fields are errors); KEDA, cert-manager and
prometheus-operator objects against their CRDs' schemas, kept in tests/deploy/crds (origin and
licence in its README), made strict the same way. Then the objects are checked against the code
they deploy: settings, the CLI, the probes, the queue and the dequeuer's scaling endpoint, the
webhook's body limit. The NetworkPolicies are checked in test_k8s_network.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.cli import SERVICE_VARIABLES
from services.webhook.routes import MAX_BODY_BYTES
from shared.messages import QUEUE_TASKS
from tests.deploy import (
    AWS_VARIABLES,
    REPO_ROOT,
    SERVICES,
    SETTINGS_VARIABLES,
    SUBCOMMANDS,
    settings_from_environment,
)
from tests.deploy.kustomize import group, kustomization_file, load_documents, normalise, render

HERE = Path(__file__).resolve().parent
K8S = REPO_ROOT / "k8s"
BASE = K8S / "base"
DEV = K8S / "overlays" / "dev"
PROD = K8S / "overlays" / "prod"
ONE_RUN_PER_POD = K8S / "overlays" / "one-run-per-pod"
MONITORING = K8S / "components" / "monitoring"
MONITORED = HERE / "monitored"
KUSTOMIZATIONS = [BASE, DEV, PROD, ONE_RUN_PER_POD, MONITORED]
#: Folders of k8s/ (each holds a kustomization.yaml).
FOLDERS = [BASE, DEV, PROD, ONE_RUN_PER_POD, MONITORING]
CRDS = HERE / "crds"

#: Oldest Kubernetes we claim to support, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29", "1.37")
#: API groups whose objects are validated against a CRD schema in tests/deploy/crds.
CRD_GROUPS = {"keda.sh", "cert-manager.io", "monitoring.coreos.com"}

#: Settings no overlay sets, and why: each would be wrong or useless there.
UNSET_EVERYWHERE = {
    "RABBITMQ_MANAGEMENT_URL": "read by `oa-machine up` only, which no pod runs",
    "USER_AGENT": "unset sends oa-machine/VERSION (+sources URL); empty is invalid",
}
UNSET_IN = {
    BASE: {"S3_ENDPOINT_URL": "AWS S3 needs no endpoint"},
    PROD: {"S3_ENDPOINT_URL": "AWS S3 needs no endpoint"},
    ONE_RUN_PER_POD: {"S3_ENDPOINT_URL": "AWS S3 needs no endpoint"},
    MONITORED: {"S3_ENDPOINT_URL": "AWS S3 needs no endpoint"},
    DEV: {"GITHUB_TOKEN": "a laptop cluster has none (see the dev kustomization)"},
}

Obj = dict[str, Any]


# --- fixtures and helpers ------------------------------------------------------------------------


@cache
def rendered_copy(folder: Path) -> str:
    return json.dumps(render(folder))


def rendering(folder: Path) -> list[Obj]:
    objects: list[Obj] = json.loads(rendered_copy(folder))
    return objects


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda path: path.name)
def folder(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture
def rendered(folder: Path) -> list[Obj]:
    return rendering(folder)


@pytest.fixture
def base() -> list[Obj]:
    return rendering(BASE)


@pytest.fixture
def dev() -> list[Obj]:
    return rendering(DEV)


@pytest.fixture
def prod() -> list[Obj]:
    return rendering(PROD)


@pytest.fixture
def one_run_per_pod() -> list[Obj]:
    return rendering(ONE_RUN_PER_POD)


@pytest.fixture
def monitored() -> list[Obj]:
    return rendering(MONITORED)


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(owner object, pod template) for every workload and KEDA ScaledJob."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]
        elif obj["kind"] == "ScaledJob":
            yield obj, obj["spec"]["jobTargetRef"]["template"]


def is_app(template: Obj) -> bool:
    """A pod of oa-machine itself (not of the dev overlay's PostgreSQL, RabbitMQ, MinIO)."""
    return bool(template["metadata"]["labels"].get("app.kubernetes.io/name") == "oa-machine")


def app_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    return ((owner, t) for owner, t in pod_templates(objects) if is_app(t))


def all_containers(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(owner, container) for every container of oa-machine's pods, init containers too."""
    for owner, template in app_templates(objects):
        for container in all_containers(template):
            yield owner, container


def config_data(objects: list[Obj]) -> dict[str, str]:
    (config,) = find(objects, "ConfigMap")
    return dict(config["data"])


def settings_of(objects: list[Obj]) -> Any:
    return settings_from_environment(config_data(objects))


def namespace_of(objects: list[Obj]) -> str | None:
    names = {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"}
    assert len(names) == 1, f"objects in several namespaces: {names}"
    return names.pop()


def quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def quantity_cpu(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def external_secret_keys() -> set[str]:
    """The keys docs/deploy.md's `kubectl ... create secret generic oa-machine-secrets` gives."""
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    command = text[text.index("create secret generic oa-machine-secrets") :]
    command = command[: command.index("```")]
    return set(re.findall(r"--from-literal=([A-Z_0-9]+)=", command))


def secret_keys(objects: list[Obj], name: str) -> set[str]:
    """The keys of the Secret `name`: rendered (dev), else the documented external one."""
    found = find(objects, "Secret", name)
    if found:
        return set(found[0]["data"])
    assert name == "oa-machine-secrets", f"no Secret {name} is rendered or documented"
    return external_secret_keys()


def secret_value(objects: list[Obj], name: str, key: str) -> str:
    import base64

    return base64.b64decode(one(objects, "Secret", name)["data"][key]).decode()


# --- the tree ------------------------------------------------------------------------------------


def test_every_file_in_a_kustomization_folder_is_used() -> None:
    for folder in FOLDERS:
        kustomization = kustomization_file(folder)
        used = {"kustomization.yaml", *kustomization.get("resources", [])}
        used.update(kustomization.get("configurations", []))
        for generator in kustomization.get("configMapGenerator", []):
            used.update(generator.get("envs", []))
        used.update(patch["path"] for patch in kustomization.get("patches", []) if "path" in patch)
        for path in folder.iterdir():
            assert path.name in used, f"{path} is in no kustomization: it would never be applied"


def test_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: [{name: x, count: 2}]\n")
    with pytest.raises(AssertionError, match="replicas"):
        render(tmp_path)


def test_base_settings_are_the_compose_file_s_too() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    paths = [entry["path"] for entry in compose["x-app"]["env_file"]]
    assert "k8s/base/settings.env" in paths, "one list of settings for compose and Kubernetes"


def test_objects_have_unique_names(rendered: list[Obj]) -> None:
    keys = [(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) for obj in rendered]
    assert len(keys) == len(set(keys))
    assert all(obj["metadata"]["name"].startswith("oa-machine") for obj in rendered), (
        "every object is named oa-machine-* so that it never collides in a shared namespace"
    )


def test_overlays_put_everything_in_one_namespace(folder: Path, rendered: list[Obj]) -> None:
    if folder == BASE:
        return
    assert namespace_of(rendered) == "oa-machine", "the namespace docs/deploy.md names"


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(rendered: list[Obj], version: str) -> None:
    checked = 0
    for obj in rendered:
        if group(obj["apiVersion"]) in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(error.message)
        checked += 1
    assert checked >= 10


def test_the_schemas_catch_a_broken_object(base: list[Obj]) -> None:
    # Proof that the validation above bites: a typo in a probe field is rejected.
    deployment = copy.deepcopy(one(base, "Deployment", "oa-machine-webhook"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = (
        "/health"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


CRD_FILES = {
    "keda.sh_ScaledObject_v1alpha1.json":
        "1bafa310dfaefaa77c02be54c5151f0ea45ad967e1b89faab0bf7c3518d75bfc",
    "keda.sh_ScaledJob_v1alpha1.json":
        "73afd0d2eff07ecce0d869ce8345afeea66c6ea9c0a0db36cb49de5920caddaf",
    "keda.sh_TriggerAuthentication_v1alpha1.json":
        "66ee6982741e36e1e70e3a51842a91c9004858ad01bb4a18ba18d6b979a2680d",
    "cert-manager.io_Certificate_v1.json":
        "00e0936cb34c296d83ebc4aec498f86e00bcaef2833a72a57b0c705eb897a5d3",
    "monitoring.coreos.com_ServiceMonitor_v1.json":
        "cb0ac300bf88b730e7a5a054c42ef4853294cddc4e85250a002933eeb56fae5b",
}  # fmt: skip


def test_crd_schemas_are_the_recorded_copies() -> None:
    readme = (CRDS / "README.md").read_text()
    assert {path.name for path in CRDS.glob("*.json")} == set(CRD_FILES)
    for name, digest in CRD_FILES.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, (
            f"{name} changed: record its origin in crds/README.md and its new hash here"
        )
        assert f"`{name}`" in readme, f"{name}: origin not recorded"
    for licence in ("keda", "cert-manager", "prometheus-operator"):
        text = (CRDS / f"{licence}.LICENSE").read_text()
        assert text.lstrip().startswith("Apache License") and "Version 2.0" in text


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the API server would prune them."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = CRDS / f"{group(api_version)}_{kind}_{api_version.split('/')[1]}.json"
    assert path.exists(), f"no CRD schema for {api_version} {kind} in {CRDS}"
    schema = _strict(json.loads(path.read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: not described by CRDs
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: Obj) -> list[str]:
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    return [
        f"{obj['kind']} {obj['metadata']['name']}: {error.json_path}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def test_custom_resources_match_their_crd_schemas(rendered: list[Obj]) -> None:
    custom = [obj for obj in rendered if group(obj["apiVersion"]) in CRD_GROUPS]
    errors = [error for obj in custom for error in crd_errors(obj)]
    assert not errors, "\n".join(errors)


def test_crd_schemas_catch_a_broken_object(one_run_per_pod: list[Obj], prod: list[Obj]) -> None:
    scaler = copy.deepcopy(one(one_run_per_pod, "ScaledJob", "oa-machine-worker"))
    scaler["spec"]["rollout"]["strategy"] = "gradually"
    scaler["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert len(crd_errors(scaler)) == 2
    certificate = copy.deepcopy(one(prod, "Certificate", "oa-machine-tls"))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    assert crd_errors(certificate)


# KEDA trigger metadata is a map of strings in the CRD: its keys are checked against KEDA 2.x's
# documented parameters of the two scalers used.
RABBITMQ_METADATA = {
    "host", "hostFromEnv", "protocol", "queueName", "mode", "value", "activationValue",
    "vhostName", "excludeUnacknowledged", "useRegex", "pageSize", "operation", "timeout",
    "unsafeSsl",
}  # fmt: skip
METRICS_API_METADATA = {
    "url", "valueLocation", "targetValue", "activationTargetValue", "format", "authMode",
    "method", "unsafeSsl", "timeout",
}  # fmt: skip


def test_keda_trigger_metadata_uses_known_parameters(rendered: list[Obj]) -> None:
    known = {"metrics-api": METRICS_API_METADATA, "rabbitmq": RABBITMQ_METADATA}
    for obj in rendered:
        if group(obj["apiVersion"]) != "keda.sh":
            continue
        for trigger in obj["spec"].get("triggers", []):
            assert set(trigger["metadata"]) <= known[trigger["type"]], trigger


def test_keda_embedded_kubernetes_parts_match_the_schemas(rendered: list[Obj]) -> None:
    for obj in rendered:
        if obj["kind"] == "ScaledJob":
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": "x"},
                "spec": obj["spec"]["jobTargetRef"],
            }
            kubernetes_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)
        if obj["kind"] == "ScaledObject":
            behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "x"},
                "spec": {
                    "scaleTargetRef": obj["spec"]["scaleTargetRef"],
                    "maxReplicas": obj["spec"]["maxReplicaCount"],
                    "behavior": behavior,
                },
            }
            kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[0], strict=True)


# --- workloads -----------------------------------------------------------------------------------


def replicas_of(objects: list[Obj], deployment: Obj) -> int:
    """The replicas a Deployment runs at least: its own, or its autoscaler's minimum."""
    name = deployment["metadata"]["name"]
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"]["minReplicas"])
    for scaler in find(objects, "ScaledObject"):
        if scaler["spec"]["scaleTargetRef"]["name"] == name:
            return int(scaler["spec"]["minReplicaCount"])
    return int(deployment["spec"].get("replicas", 1))


def test_selectors_match_their_pods(rendered: list[Obj]) -> None:
    pod_labels = [template["metadata"]["labels"] for _, template in pod_templates(rendered)]
    workloads = find(rendered, "Deployment") + find(rendered, "StatefulSet")
    for obj in workloads:
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), obj["metadata"]["name"]
        others = [
            other
            for other in workloads
            if other is not obj
            and selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert not others, f"{obj['metadata']['name']}'s selector also takes other pods"
    for obj in find(rendered, "Service") + find(rendered, "PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matching = [labels for labels in pod_labels if selector.items() <= labels.items()]
        assert matching, f"{obj['kind']} {obj['metadata']['name']} selects no pod"


def test_every_deployment_has_a_disruption_budget(rendered: list[Obj]) -> None:
    budgets = find(rendered, "PodDisruptionBudget")
    for obj in find(rendered, "Deployment"):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        (budget,) = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items()
                     <= labels.items()]
        if "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] < replicas_of(rendered, obj), (
                "a budget allowing no eviction blocks drains"
            )


def test_replicated_services_spread_over_nodes(folder: Path, rendered: list[Obj]) -> None:
    for obj in find(rendered, "Deployment"):
        spec = obj["spec"]["template"]["spec"]
        (constraint,) = spec["topologySpreadConstraints"]
        assert constraint["topologyKey"] == "kubernetes.io/hostname"
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"] == obj["spec"]["selector"]["matchLabels"]
        component = obj["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        if folder == DEV:
            # One node on a laptop: spread where possible, never leave a replica pending.
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        elif component == "worker":
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        else:
            assert replicas_of(rendered, obj) >= 2, obj["metadata"]["name"]
            assert constraint["whenUnsatisfiable"] == "DoNotSchedule", (
                "two replicas on two nodes, not two on one"
            )


def test_the_webhook_scales_on_cpu_from_two(rendered: list[Obj]) -> None:
    hpa = one(rendered, "HorizontalPodAutoscaler", "oa-machine-webhook")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = one(rendered, target["kind"], target["name"])
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == ["webhook"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert quantity_cpu(container["resources"]["requests"]["cpu"]) > 0, "utilisation of a request"


def test_services_run_and_migrations_come_first(rendered: list[Obj]) -> None:
    """Every pod whose service reads PostgreSQL migrates it in an init container first, so a
    new image or ConfigMap is migrated on every apply, before its pods start (idempotent, under
    an advisory lock: tests/shared/test_db.py). No Job: its template could not change."""
    assert not [job for job in find(rendered, "Job") if is_app(job["spec"]["template"])]
    for owner, template in app_templates(rendered):
        spec = template["spec"]
        (container,) = spec["containers"]
        service = container["args"][0]
        assert service in SERVICES
        init = spec.get("initContainers", [])
        if "DATABASE_URL" in SERVICE_VARIABLES[service]:
            assert [c["args"] for c in init] == [["migrate"]], owner["metadata"]["name"]
            (migrate,) = init
            assert migrate["image"] == container["image"]
            assert migrate["envFrom"] == container["envFrom"], "the same database"
        else:
            assert not init, f"{service} does not use PostgreSQL: nothing to wait for"
    if find(rendered, "Deployment"):
        for service in SERVICES:
            if service != "worker" or not find(rendered, "ScaledJob"):
                one(rendered, "Deployment", f"oa-machine-{service}")


def test_containers_run_oa_machine_subcommands(rendered: list[Obj]) -> None:
    for owner, container in containers(rendered):
        # The image's ENTRYPOINT is `oa-machine`: containers pass the subcommand as args.
        assert container.get("command", ["oa-machine"]) == ["oa-machine"], owner["metadata"]["name"]
        assert container["args"][0] in SUBCOMMANDS, container["args"]


def test_one_image_for_everything(folder: Path, rendered: list[Obj]) -> None:
    images = {container["image"] for _, container in containers(rendered)}
    assert len(images) == 1, images
    (image,) = images
    if folder in (PROD, ONE_RUN_PER_POD, MONITORED):
        assert re.fullmatch(r"ghcr\.io/openaddresses/oa-machine@sha256:[0-9a-f]{64}", image), (
            "production runs the image by digest"
        )
    elif folder == DEV:
        assert image == "oa-machine:dev", "the image built on the laptop (README)"
    else:
        assert ":" in image.rsplit("/", 1)[-1], f"{image}: pin a tag or a digest"


def test_other_images_are_pinned(rendered: list[Obj]) -> None:
    for owner, template in pod_templates(rendered):
        if is_app(template):
            continue
        for container in all_containers(template):
            tag = container["image"].rsplit(":", 1)[-1]
            assert ":" in container["image"] and tag != "latest", owner["metadata"]["name"]


def test_pods_run_as_non_root(rendered: list[Obj]) -> None:
    for owner, template in pod_templates(rendered):
        spec = template["spec"]
        name = owner["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken", True) is False or any(
            sa.get("automountServiceAccountToken") is False
            for sa in find(rendered, "ServiceAccount", spec.get("serviceAccountName"))
        ), f"{name}: the pods call no Kubernetes API and need no token"
        for container in all_containers(template):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_oa_machine_runs_on_a_read_only_root(rendered: list[Obj]) -> None:
    for _owner, template in app_templates(rendered):
        for container in all_containers(template):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if container["args"][0] != "migrate":
                assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_every_container_has_requests_and_limits(rendered: list[Obj]) -> None:
    for owner, template in pod_templates(rendered):
        for container in all_containers(template):
            resources = container["resources"]
            request, limit = resources["requests"]["cpu"], resources["limits"]["cpu"]
            assert 0 < quantity_cpu(request) <= quantity_cpu(limit), owner["metadata"]["name"]
            request, limit = resources["requests"]["memory"], resources["limits"]["memory"]
            assert 0 < quantity_bytes(request) <= quantity_bytes(limit)


def test_worker_is_sized_for_gdal_work(rendered: list[Obj]) -> None:
    config = settings_of(rendered)
    workers = [
        (owner, template)
        for owner, template in app_templates(rendered)
        if template["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]
    assert len(workers) == 1
    _, template = workers[0]
    spec = template["spec"]
    (container,) = spec["containers"]
    limits = container["resources"]["limits"]
    # The child's address space is capped at RUN_MEMORY_BYTES; the parent needs room beside it.
    assert quantity_bytes(limits["memory"]) >= config.run_memory_bytes + 2**30
    assert quantity_cpu(container["resources"]["requests"]["cpu"]) >= 1
    # Downloads and unpacked archives go to WORK_DIR, on a volume large enough for them.
    (work,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config.work_dir)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == work["name"]]
    assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) > config.max_unpacked_bytes
    assert quantity_bytes(limits["ephemeral-storage"]) >= quantity_bytes(
        volume["emptyDir"]["sizeLimit"]
    )
    # Time to finish or hand back the run on SIGTERM (WORKER_GRACE_S) before the SIGKILL.
    assert spec["terminationGracePeriodSeconds"] >= config.worker_grace_s + 30
    assert "preStop" not in container.get("lifecycle", {}), "SIGTERM must reach the worker at once"
    env = {item["name"]: item for item in container.get("env", [])}
    assert env["WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == config.metrics_port


# --- probes --------------------------------------------------------------------------------------


def test_probes_never_ask_the_dependencies_for_liveness(rendered: list[Obj]) -> None:
    config = settings_of(rendered)
    for owner, template in app_templates(rendered):
        if owner["kind"] != "Deployment":
            continue
        (container,) = template["spec"]["containers"]
        name = container["args"][0]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        expected_port = config.http_port if name == "webhook" else config.metrics_port
        live = container["livenessProbe"]["httpGet"]
        ready = container["readinessProbe"]["httpGet"]
        # /health/live answers without PostgreSQL or RabbitMQ (shared/probes.py; tested in
        # tests/shared/test_probes.py): an outage of either must not restart every pod.
        assert (live["path"], ready["path"]) == ("/health/live", "/health/ready"), name
        for get in (live, ready):
            assert ports.get(get["port"], get["port"]) == expected_port, name


def test_webhook_service_reaches_its_http_port(rendered: list[Obj]) -> None:
    config = settings_of(rendered)
    assert config.http_host == "0.0.0.0", "listen beyond loopback, or no probe gets in"
    deployment = one(rendered, "Deployment", "oa-machine-webhook")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (service_port,) = one(rendered, "Service", "oa-machine-webhook")["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) == config.http_port


# --- settings and secrets ------------------------------------------------------------------------


def test_configmap_holds_valid_settings(folder: Path, rendered: list[Obj]) -> None:
    data = config_data(rendered)
    unknown = set(data) - SETTINGS_VARIABLES - AWS_VARIABLES
    assert not unknown, f"variables no service reads: {unknown}"
    settings = settings_from_environment(data)  # raises on a bad value
    assert settings.storage_url.startswith("s3://")
    assert settings.log_format == "json"
    assert settings.allow_private_urls is False
    assert (settings.s3_endpoint_url is not None) == (folder == DEV), "MinIO only in dev"


def test_every_setting_is_set_and_nothing_else(folder: Path, rendered: list[Obj]) -> None:
    """Each oa-machine container sees every variable the code reads (shared/config.py, and the
    AWS ones botocore reads), from the ConfigMap, the Secret or its own env, but for the
    settings left unset on purpose; and nothing that no code reads."""
    unset = {**UNSET_EVERYWHERE, **UNSET_IN[folder]}
    configmaps = {obj["metadata"]["name"]: set(obj["data"]) for obj in find(rendered, "ConfigMap")}
    for owner, container in containers(rendered):
        names: set[str] = set()
        for source in container["envFrom"]:
            if "configMapRef" in source:
                names |= configmaps[source["configMapRef"]["name"]]
            else:
                names |= secret_keys(rendered, source["secretRef"]["name"])
        names |= {item["name"] for item in container.get("env", [])}
        where = f"{owner['metadata']['name']}/{container['name']}"
        assert not names - SETTINGS_VARIABLES - AWS_VARIABLES, f"{where}: nothing reads those"
        left = dict(unset)
        if container["args"][0] != "worker":
            left["WORKER_NAME"] = "a worker's name (its pod's); other pods have none"
        missing = (SETTINGS_VARIABLES | AWS_VARIABLES) - names - set(left)
        assert not missing, f"{where}: not set: {sorted(missing)}"
        assert not names & set(left), f"{where}: set, though left unset on purpose"


def test_secrets_are_referenced_not_committed(folder: Path, rendered: list[Obj]) -> None:
    names: set[str] = set()
    for _, container in containers(rendered):
        names |= {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
    assert names == {"oa-machine-secrets"}
    secrets = {obj["metadata"]["name"] for obj in find(rendered, "Secret")}
    if folder == DEV:
        assert secrets == {"oa-machine-secrets", "oa-machine-dev-infrastructure"}, "demo values"
    else:
        assert not secrets, "the production Secret is made outside the repository"
    assert external_secret_keys() == {
        "DATABASE_URL", "AMQP_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN",
        "WEBHOOK_SECRETS",
    }  # fmt: skip


def test_dev_secrets_point_at_the_dev_infrastructure(dev: list[Obj]) -> None:
    def value(key: str) -> str:
        return secret_value(dev, "oa-machine-secrets", key)

    def infra(key: str) -> str:
        return secret_value(dev, "oa-machine-dev-infrastructure", key)

    def service_port(name: str, port_name: str) -> int:
        ports = one(dev, "Service", name)["spec"]["ports"]
        return int(next(p["port"] for p in ports if p["name"] == port_name))

    settings = settings_from_environment(
        {**config_data(dev), **{key: value(key) for key in ("DATABASE_URL", "AMQP_URL")}}
    )
    database = urlsplit(settings.database_url)
    postgres = one(dev, "StatefulSet", "oa-machine-postgres")["spec"]["template"]["spec"]
    (container,) = postgres["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert database.hostname == "oa-machine-postgres"
    assert database.port == service_port("oa-machine-postgres", "postgres")
    assert (database.username, database.password) == (
        infra("POSTGRES_USER"), infra("POSTGRES_PASSWORD"))
    assert database.path == "/" + env["POSTGRES_DB"]["value"]
    assert container["readinessProbe"]["exec"]["command"] == [
        "pg_isready", "-U", infra("POSTGRES_USER"), "-d", env["POSTGRES_DB"]["value"]]
    broker = urlsplit(settings.amqp_url)
    assert broker.hostname == "oa-machine-rabbitmq"
    assert broker.port == service_port("oa-machine-rabbitmq", "amqp")
    assert (broker.username, broker.password) == (
        infra("RABBITMQ_DEFAULT_USER"), infra("RABBITMQ_DEFAULT_PASS"))
    rabbitmq = one(dev, "StatefulSet", "oa-machine-rabbitmq")["spec"]["template"]["spec"]
    assert "management" in rabbitmq["containers"][0]["image"], "the management UI"
    assert service_port("oa-machine-rabbitmq", "management") == 15672
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    assert endpoint.hostname == "oa-machine-minio"
    assert endpoint.port == service_port("oa-machine-minio", "s3")
    assert (value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY")) == (
        infra("MINIO_ROOT_USER"), infra("MINIO_ROOT_PASSWORD"))
    bucket = urlsplit(settings.storage_url).netloc
    job = one(dev, "Job", "oa-machine-createbucket")["spec"]["template"]["spec"]
    script = " ".join(job["containers"][0]["args"])
    assert re.search(rf"mc mb --ignore-existing local/{re.escape(bucket)}(\s|$)", script)
    assert settings.public_base_url == "http://localhost:8080", "the port-forward of the README"
    for name in ("postgres", "rabbitmq", "minio"):
        statefulset = one(dev, "StatefulSet", f"oa-machine-{name}")
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert {m["name"] for m in container["volumeMounts"]} >= {claim["metadata"]["name"]}
        assert statefulset["spec"]["serviceName"] == f"oa-machine-{name}"
    assert one(dev, "Namespace", "oa-machine")
    assert not [obj for obj in dev if group(obj["apiVersion"]) in CRD_GROUPS], (
        "a laptop cluster needs no KEDA, cert-manager or prometheus-operator"
    )


# --- KEDA ----------------------------------------------------------------------------------------


def _check_rabbitmq_trigger(rendered: list[Obj], scaler: Obj) -> None:
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "rabbitmq"]
    metadata = trigger["metadata"]
    assert metadata["queueName"] == QUEUE_TASKS
    assert metadata["mode"] == "QueueLength"
    assert metadata["protocol"] in ("amqp", "auto")
    # One waiting task per run slot of a worker pod.
    assert int(metadata["value"]) == settings_of(rendered).worker_concurrency
    assert "host" not in metadata, "the broker URL holds a password: it comes from a Secret"
    auth = one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("host", "oa-machine-secrets", "AMQP_URL")


def test_scaled_object_scales_the_worker_deployment(folder: Path, rendered: list[Obj]) -> None:
    if folder in (DEV, ONE_RUN_PER_POD):
        assert not find(rendered, "ScaledObject")
        return
    scaler = one(rendered, "ScaledObject", "oa-machine-worker")
    target = scaler["spec"]["scaleTargetRef"]
    deployment = one(rendered, target.get("kind", "Deployment"), target["name"])
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert target.get("apiVersion", "apps/v1") == deployment["apiVersion"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the worker replica count"
    assert scaler["spec"]["minReplicaCount"] in (0, 1)
    assert scaler["spec"]["maxReplicaCount"] >= 10
    _check_rabbitmq_trigger(rendered, scaler)


def test_scaled_object_counts_running_work_from_the_dequeuer(
    folder: Path, rendered: list[Obj]
) -> None:
    """KEDA sees queued plus running runs, so the pool does not shrink under busy workers."""
    from services.dequeuer.service import SCALING_METRIC, SCALING_PATH

    if not find(rendered, "ScaledObject"):
        return
    scaler = one(rendered, "ScaledObject", "oa-machine-worker")
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "metrics-api"]
    metadata = trigger["metadata"]
    url = urlsplit(metadata["url"])
    host, namespace = url.hostname.split(".")[:2]  # type: ignore[union-attr]
    service = one(rendered, "Service", host)
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "dequeuer"
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    dequeuer = one(rendered, "Deployment", "oa-machine-dequeuer")
    (container,) = dequeuer["spec"]["template"]["spec"]["containers"]
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    config = settings_of(rendered)
    assert ports[port["targetPort"]] == config.metrics_port
    assert (url.path, metadata["valueLocation"]) == (SCALING_PATH, SCALING_METRIC)
    # KEDA calls from its own namespace: the URL names ours.
    assert namespace == (namespace_of(rendered) or "oa-machine")
    assert int(metadata["targetValue"]) == config.worker_concurrency


def test_one_run_per_pod_starts_a_job_per_task(one_run_per_pod: list[Obj]) -> None:
    assert not find(one_run_per_pod, "Deployment", "oa-machine-worker")
    assert not find(one_run_per_pod, "ScaledObject")
    assert not find(one_run_per_pod, "PodDisruptionBudget", "oa-machine-worker")
    scaler = one(one_run_per_pod, "ScaledJob", "oa-machine-worker")
    job = scaler["spec"]["jobTargetRef"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["backoffLimit"] == 0, "retries go through the run's deadline, with a count"
    assert job["activeDeadlineSeconds"] > settings_of(one_run_per_pod).run_timeout_s
    (container,) = job["template"]["spec"]["containers"]
    assert container["args"] == ["worker", "--once"]
    assert scaler["spec"]["maxReplicaCount"] >= 10
    _check_rabbitmq_trigger(one_run_per_pod, scaler)
    # A change to the ScaledJob leaves running Jobs alone, and no autoscaler evicts a run.
    assert scaler["spec"]["rollout"]["strategy"] == "gradual"
    assert job["template"]["metadata"]["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        "karpenter.sh/do-not-disrupt": "true",
    }


def test_one_run_per_pod_is_built_on_prod(one_run_per_pod: list[Obj], prod: list[Obj]) -> None:
    assert kustomization_file(ONE_RUN_PER_POD)["resources"][0] == "../prod"
    kept = {(o["kind"], o["metadata"]["name"]) for o in one_run_per_pod}
    removed = {("Deployment", "oa-machine-worker"), ("PodDisruptionBudget", "oa-machine-worker"),
               ("ScaledObject", "oa-machine-worker")}
    assert {(o["kind"], o["metadata"]["name"]) for o in prod} - removed <= kept


def test_worker_has_the_once_mode_the_overlay_runs() -> None:
    # The behaviour itself is tested in tests/worker/test_worker_once.py; here: the flag exists.
    from services import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", "--help"])
    assert exit_info.value.code == 0


# --- the way in: Ingress and TLS -----------------------------------------------------------------


def test_ingress_takes_the_hook_and_the_site_over_tls(folder: Path, rendered: list[Obj]) -> None:
    if folder in (BASE, DEV):
        assert not find(rendered, "Ingress"), "a laptop uses port-forward"
        return
    ingress = one(rendered, "Ingress", "oa-machine-webhook")
    annotations = ingress["metadata"]["annotations"]
    # The controller refuses nothing the webhook would take, and takes nothing it would refuse.
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == MAX_BODY_BYTES
    (rule,) = ingress["spec"]["rules"]
    paths = {path["path"]: path for path in rule["http"]["paths"]}
    assert set(paths) == {"/hook", "/"}
    assert paths["/"]["pathType"] == "Prefix"
    service = one(rendered, "Service", "oa-machine-webhook")
    for path in paths.values():
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == [rule["host"]]
    certificate = one(rendered, "Certificate", tls["secretName"])
    assert certificate["spec"]["secretName"] == tls["secretName"]
    assert certificate["spec"]["dnsNames"] == [rule["host"]]
    public = urlsplit(settings_of(rendered).public_base_url)
    assert (public.scheme, public.hostname) == ("https", rule["host"]), "links GitHub shows"


# --- Prometheus ----------------------------------------------------------------------------------


def test_a_service_monitor_per_service(monitored: list[Obj], prod: list[Obj]) -> None:
    assert not find(prod, "ServiceMonitor"), "optional: only with the component"
    config = settings_of(monitored)
    monitors = find(monitored, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted(
        f"oa-machine-{service}" for service in SERVICES
    )
    for monitor in monitors:
        (service,) = [
            s for s in find(monitored, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        ((_, template),) = [
            (o, t) for o, t in app_templates(monitored)
            if t["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = config.http_port if component == "webhook" else config.metrics_port
        assert ports[port["targetPort"]] == expected, monitor["metadata"]["name"]


# --- cross-check with the real kustomize, where there is one -------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_renderer_agrees_with_kubectl_kustomize(folder: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    real = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert normalise(render(folder)) == normalise(real)


def test_documents_are_yaml_mappings() -> None:
    for folder in FOLDERS:
        for path in folder.glob("*.yaml"):
            assert all(isinstance(doc, dict) for doc in load_documents(path)), path
