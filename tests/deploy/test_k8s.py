"""Offline validation of the Kustomize tree k8s/ (base and overlays).

No kubectl or kustomize is needed: :func:`render` builds a kustomization the way kustomize
does for the few features these files use (resources, images, configMapGenerator and
secretGenerator with literals, generatorOptions, configurations/nameReference, whole-object
`$patch: delete`, namespace) and refuses any other field, so a kustomization that grows a new
feature fails here until the renderer learns it. Where kubectl is installed, one more test
checks that `kubectl kustomize` renders the same objects.

Core objects are validated against the Kubernetes JSON schemas bundled by the PyPI package
kubernetes-validate (strict: unknown fields are errors). KEDA's objects have no bundled schema:
their spec fields are checked against the KEDA 2.x field lists below, and their embedded core
parts (the ScaledJob's Job spec, the ScaledObject's HPA behaviour) against the Kubernetes
schemas by wrapping them in a Job / HorizontalPodAutoscaler.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from shared.messages import QUEUE_TASKS
from tests.deploy import (
    AWS_VARIABLES,
    REPO_ROOT,
    SERVICES,
    SETTINGS_VARIABLES,
    SUBCOMMANDS,
    settings_from_environment,
)

K8S = REPO_ROOT / "k8s"
BASE = K8S / "base"
ONE_RUN_PER_POD = K8S / "overlays" / "one-run-per-pod"
KUSTOMIZATIONS = [BASE, ONE_RUN_PER_POD]

#: Oldest Kubernetes we claim to support, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29", "1.37")

Obj = dict[str, Any]

# --- a small kustomize ---------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "configurations",
    "patches",
    "namespace",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _walk(node: Any, path: list[str]) -> Iterator[tuple[Any, str]]:
    """Yield (parent mapping, key) for every place `path` reaches, fanning out over lists."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
        return
    if not isinstance(node, dict) or not path or path[0] not in node:
        return
    if len(path) == 1:
        yield node, path[0]
    else:
        yield from _walk(node[path[0]], path[1:])


def _builtin_references(obj: Obj, kind: str) -> Iterator[tuple[Any, str]]:
    """Where a workload names a ConfigMap (kind ConfigMap) or Secret, as kustomize knows them."""
    spec_path = POD_SPEC_PATHS.get(obj["kind"])
    if spec_path is None:
        return
    pod_spec: Any = obj
    for key in spec_path:
        pod_spec = pod_spec.get(key, {}) if isinstance(pod_spec, dict) else {}
    ref, key_ref, volume = (
        ("configMapRef", "configMapKeyRef", ["configMap", "name"])
        if kind == "ConfigMap"
        else ("secretRef", "secretKeyRef", ["secret", "secretName"])
    )
    for containers in ("containers", "initContainers"):
        yield from _walk(pod_spec, [containers, "envFrom", ref, "name"])
        yield from _walk(pod_spec, [containers, "env", "valueFrom", key_ref, "name"])
    yield from _walk(pod_spec, ["volumes", *volume])
    projected = "configMap" if kind == "ConfigMap" else "secret"
    yield from _walk(pod_spec, ["volumes", "projected", "sources", projected, "name"])


def _generate(kind: str, spec: Obj, options: Obj, folder: Path) -> Obj:
    unknown = set(spec) - {"name", "literals", "envs", "type"}
    assert not unknown, f"{folder}: generator fields not handled by this renderer: {unknown}"
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for env_file in spec.get("envs", []):
        for line in (folder / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["stringData"] = data
    else:
        obj["data"] = data
    if not options.get("disableNameSuffixHash", False):
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]
        obj["metadata"]["name"] = f"{spec['name']}-{digest}"
    return obj


def _load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _set_image(obj: Any, images: list[Obj]) -> None:
    if isinstance(obj, list):
        for item in obj:
            _set_image(item, images)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name = container.get("image", "").split("@")[0].split(":")[0]
                    for image in images:
                        if image["name"] == name:
                            new = image.get("newName", name)
                            if "digest" in image:
                                container["image"] = f"{new}@{image['digest']}"
                            elif "newTag" in image:
                                container["image"] = f"{new}:{image['newTag']}"
                            else:
                                container["image"] = new
            _set_image(value, images)


def _delete_patch(patch: Obj, resources: list[Obj], folder: Path) -> list[Obj]:
    assert patch.get("$patch") == "delete", (
        f"{folder}: only whole-object `$patch: delete` patches are handled by this renderer"
    )
    target = (_group(patch["apiVersion"]), patch["kind"], patch["metadata"]["name"])
    kept = [
        obj
        for obj in resources
        if (_group(obj["apiVersion"]), obj["kind"], obj["metadata"]["name"]) != target
    ]
    assert len(kept) == len(resources) - 1, f"{folder}: delete patch matches nothing: {target}"
    return kept


def render(folder: Path, renamed: dict[tuple[str, str], str] | None = None) -> list[Obj]:
    """The objects `kustomize build folder` would print (generated names hashed differently)."""
    renamed = {} if renamed is None else renamed
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}: kustomization fields not handled by this renderer: {unknown}"
    assert kustomization.get("kind", "Kustomization") == "Kustomization"

    resources: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder}: resource {entry} does not exist"
        if path.is_dir():
            resources.extend(render(path, renamed))
        else:
            resources.extend(_load_documents(path))

    options = kustomization.get("generatorOptions", {})
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in kustomization.get(field, []):
            obj = _generate(kind, spec, options, folder)
            renamed[(kind, spec["name"])] = obj["metadata"]["name"]
            resources.append(obj)

    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) <= {"patch", "path"}, f"{folder}: patch targets not handled"
        text = patch_entry.get("patch") or (folder / patch_entry["path"]).read_text()
        resources = _delete_patch(yaml.safe_load(text), resources, folder)

    _set_image(resources, kustomization.get("images", []))

    # Name references: kustomize's built-in paths, plus this level's `configurations`.
    field_specs: list[tuple[str, Obj]] = []
    for config_file in kustomization.get("configurations", []):
        config = yaml.safe_load((folder / config_file).read_text())
        assert set(config) <= {"nameReference"}, f"{folder}/{config_file}: not handled"
        for reference in config["nameReference"]:
            field_specs.extend((reference["kind"], spec) for spec in reference["fieldSpecs"])
    for obj in resources:
        places: list[tuple[str, Any, str]] = []
        for kind in ("ConfigMap", "Secret"):
            places.extend((kind, parent, key) for parent, key in _builtin_references(obj, kind))
        for kind, spec in field_specs:
            if obj["kind"] == spec["kind"] and _group(obj["apiVersion"]) == spec.get("group", ""):
                places.extend((kind, p, k) for p, k in _walk(obj, spec["path"].split("/")))
        for kind, parent, key in places:
            parent[key] = renamed.get((kind, parent[key]), parent[key])

    if "namespace" in kustomization:
        for obj in resources:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return resources


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda path: path.name)
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(BASE)


@pytest.fixture(scope="module")
def one_run_per_pod() -> list[Obj]:
    return render(ONE_RUN_PER_POD)


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
    """(owner object, pod template) for every Deployment, Job and KEDA ScaledJob."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]
        elif obj["kind"] == "ScaledJob":
            yield obj, obj["spec"]["jobTargetRef"]["template"]


def containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for owner, template in pod_templates(objects):
        for container in template["spec"].get("containers", []) + template["spec"].get(
            "initContainers", []
        ):
            yield owner, container


def config_data(objects: list[Obj]) -> dict[str, str]:
    (config,) = find(objects, "ConfigMap")
    return dict(config["data"])


def quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def quantity_cpu(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- the tree ------------------------------------------------------------------------------------


def test_every_yaml_file_in_a_kustomization_folder_is_used() -> None:
    for folder in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used = {"kustomization.yaml", *kustomization.get("resources", [])}
        used.update(kustomization.get("configurations", []))
        for path in folder.glob("*.y*ml"):
            assert path.name in used, f"{path} is in no kustomization: it would never be applied"


def test_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: [{name: x, count: 2}]\n")
    with pytest.raises(AssertionError, match="replicas"):
        render(tmp_path)


def test_objects_have_unique_names(rendered: list[Obj]) -> None:
    keys = [(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) for obj in rendered]
    assert len(keys) == len(set(keys))
    assert all(obj["metadata"]["name"].startswith("oa-machine") for obj in rendered), (
        "every object is named oa-machine-* so that it never collides in a shared namespace"
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(rendered: list[Obj], version: str) -> None:
    checked = 0
    for obj in rendered:
        if obj["apiVersion"].startswith("keda.sh/"):
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


# KEDA 2.x spec fields (keda.sh/v1alpha1), from its CRDs.
KEDA_SPEC_FIELDS = {
    "ScaledObject": {
        "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
        "triggers",
    },
    "ScaledJob": {
        "jobTargetRef", "pollingInterval", "successfulJobsHistoryLimit", "failedJobsHistoryLimit",
        "envSourceContainerName", "minReplicaCount", "maxReplicaCount", "rollout",
        "rolloutStrategy", "scalingStrategy", "triggers",
    },
    "TriggerAuthentication": {
        "podIdentity", "secretTargetRef", "env", "hashiCorpVault", "azureKeyVault",
        "awsSecretManager", "gcpSecretManager", "configMapTargetRef", "boundServiceAccountToken",
    },
}  # fmt: skip
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "useCachedMetrics", "metricType"}
RABBITMQ_METADATA = {
    "host", "hostFromEnv", "protocol", "queueName", "mode", "value", "activationValue",
    "vhostName", "excludeUnacknowledged", "useRegex", "pageSize", "operation", "timeout",
    "unsafeSsl",
}  # fmt: skip
METRICS_API_METADATA = {
    "url", "valueLocation", "targetValue", "activationTargetValue", "format", "authMode",
    "method", "unsafeSsl", "timeout",
}  # fmt: skip


def test_keda_objects_use_known_fields(rendered: list[Obj]) -> None:
    keda = [obj for obj in rendered if obj["apiVersion"].startswith("keda.sh/")]
    assert keda, "KEDA scales the workers in every variant"
    for obj in keda:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["kind"] in KEDA_SPEC_FIELDS, obj["kind"]
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
        assert set(obj["spec"]) <= KEDA_SPEC_FIELDS[obj["kind"]], obj["spec"].keys()
        for trigger in obj["spec"].get("triggers", []):
            assert set(trigger) <= TRIGGER_FIELDS
            if trigger["type"] == "metrics-api":
                assert set(trigger["metadata"]) <= METRICS_API_METADATA
            if trigger["type"] == "rabbitmq":
                assert set(trigger["metadata"]) <= RABBITMQ_METADATA
                assert all(isinstance(v, str) for v in trigger["metadata"].values()), (
                    "KEDA trigger metadata values are strings"
                )


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


def test_selectors_match_their_pods(rendered: list[Obj]) -> None:
    pod_labels = [template["metadata"]["labels"] for _, template in pod_templates(rendered)]
    for obj in find(rendered, "Deployment"):
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), obj["metadata"]["name"]
        others = [
            other
            for other in find(rendered, "Deployment")
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
    budgets = [
        pdb["spec"]["selector"]["matchLabels"] for pdb in find(rendered, "PodDisruptionBudget")
    ]
    for obj in find(rendered, "Deployment"):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(b.items() <= labels.items() for b in budgets), obj["metadata"]["name"]
    webhook = one(rendered, "PodDisruptionBudget", "oa-machine-webhook")
    replicas = one(rendered, "Deployment", "oa-machine-webhook")["spec"]["replicas"]
    assert webhook["spec"]["minAvailable"] < replicas, "a budget allowing no eviction blocks drains"


def test_base_runs_every_service_and_the_migration(base: list[Obj]) -> None:
    for service in SERVICES:
        deployment = one(base, "Deployment", f"oa-machine-{service}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == service
    job = one(base, "Job", "oa-machine-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_containers_run_oa_machine_subcommands(rendered: list[Obj]) -> None:
    for owner, container in containers(rendered):
        # The image's ENTRYPOINT is `oa-machine`: containers pass the subcommand as args.
        assert container.get("command", ["oa-machine"]) == ["oa-machine"], owner["metadata"]["name"]
        assert container["args"][0] in SUBCOMMANDS, container["args"]


def test_one_image_for_everything(rendered: list[Obj]) -> None:
    images = {container["image"] for _, container in containers(rendered)}
    assert len(images) == 1, images
    (image,) = images
    assert ":" in image.rsplit("/", 1)[-1] or "@" in image, f"{image}: pin a tag or a digest"


def test_pods_run_as_non_root_with_a_read_only_root(rendered: list[Obj]) -> None:
    for owner, template in pod_templates(rendered):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, owner["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec.get("automountServiceAccountToken", True) is False or any(
            sa.get("automountServiceAccountToken") is False
            for sa in find(rendered, "ServiceAccount", spec.get("serviceAccountName"))
        ), "the pods call no Kubernetes API and need no token"
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if container["args"][0] != "migrate":
                assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_every_container_has_requests_and_limits(rendered: list[Obj]) -> None:
    for owner, container in containers(rendered):
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            request, limit = resources["requests"][resource], resources["limits"][resource]
            if resource == "cpu":
                assert 0 < quantity_cpu(request) <= quantity_cpu(limit), owner["metadata"]["name"]
            else:
                assert 0 < quantity_bytes(request) <= quantity_bytes(limit)


def test_worker_is_sized_for_gdal_work(rendered: list[Obj]) -> None:
    config = settings_from_environment(config_data(rendered))
    workers = [
        (owner, template)
        for owner, template in pod_templates(rendered)
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


# --- the webhook ---------------------------------------------------------------------------------


def test_webhook_probes_hit_health_on_the_declared_port(base: list[Obj]) -> None:
    http_port = settings_from_environment(config_data(base)).http_port
    deployment = one(base, "Deployment", "oa-machine-webhook")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == http_port
    service = one(base, "Service", "oa-machine-webhook")
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) == http_port
    config = config_data(base)
    assert config["HTTP_HOST"] == "0.0.0.0", "listen beyond loopback, or no probe gets in"


# --- settings and secrets ------------------------------------------------------------------------


def test_configmap_holds_valid_settings(rendered: list[Obj]) -> None:
    data = config_data(rendered)
    unknown = set(data) - SETTINGS_VARIABLES - AWS_VARIABLES
    assert not unknown, f"variables no service reads: {unknown}"
    settings = settings_from_environment(data)  # raises on a bad value
    assert settings.storage_url.startswith("s3://")
    assert settings.log_format == "json"
    assert settings.allow_private_urls is False


def test_containers_read_the_config_and_the_external_secret(rendered: list[Obj]) -> None:
    configmaps = {obj["metadata"]["name"] for obj in find(rendered, "ConfigMap")}
    secret_names: set[str] = set()
    for owner, container in containers(rendered):
        sources = container["envFrom"]
        config_refs = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
        assert config_refs and all(name in configmaps for name in config_refs), (
            f"{owner['kind']} {owner['metadata']['name']} names a ConfigMap that is not rendered:"
            f" {config_refs} (a generated name must be rewritten: see `configurations`)"
        )
        secret_names.update(s["secretRef"]["name"] for s in sources if "secretRef" in s)
        for item in container.get("env", []):
            assert item["name"] in SETTINGS_VARIABLES | AWS_VARIABLES, item["name"]
    assert secret_names == {"oa-machine-secrets"}
    # No secret value is committed: the Secret is made outside the repository.
    assert not find(rendered, "Secret")


# --- KEDA ----------------------------------------------------------------------------------------


def test_every_service_has_probes_that_never_ask_the_dependencies_for_liveness(
    base: list[Obj],
) -> None:
    config = settings_from_environment(config_data(base))
    for name in ("webhook", "worker", "dequeuer", "scheduler"):
        deployment = one(base, "Deployment", f"oa-machine-{name}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        expected_port = config.http_port if name == "webhook" else config.metrics_port
        live = container["livenessProbe"]["httpGet"]
        ready = container["readinessProbe"]["httpGet"]
        # /health/live answers without PostgreSQL or RabbitMQ (shared/probes.py): an outage of
        # either must not restart every pod.
        assert (live["path"], ready["path"]) == ("/health/live", "/health/ready"), name
        for get in (live, ready):
            assert ports.get(get["port"], get["port"]) == expected_port, name


def _check_rabbitmq_trigger(rendered: list[Obj], scaler: Obj) -> None:
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "rabbitmq"]
    metadata = trigger["metadata"]
    assert metadata["queueName"] == QUEUE_TASKS
    assert metadata["mode"] == "QueueLength"
    assert metadata["protocol"] in ("amqp", "auto")
    # One waiting task per run slot of a worker pod.
    settings = settings_from_environment(config_data(rendered))
    assert int(metadata["value"]) == settings.worker_concurrency
    assert "host" not in metadata, "the broker URL holds a password: it comes from a Secret"
    auth = one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("host", "oa-machine-secrets", "AMQP_URL")


def test_scaled_object_scales_the_worker_deployment_on_the_tasks_queue(base: list[Obj]) -> None:
    scaler = one(base, "ScaledObject", "oa-machine-worker")
    target = scaler["spec"]["scaleTargetRef"]
    deployment = one(base, target.get("kind", "Deployment"), target["name"])
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert target.get("apiVersion", "apps/v1") == deployment["apiVersion"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the worker replica count"
    assert scaler["spec"]["minReplicaCount"] in (0, 1)
    assert scaler["spec"]["maxReplicaCount"] >= 10
    _check_rabbitmq_trigger(base, scaler)


def test_scaled_object_counts_running_work_from_the_dequeuer(base: list[Obj]) -> None:
    """KEDA sees queued plus running runs, so the pool does not shrink under busy workers."""
    from services.dequeuer.service import SCALING_METRIC, SCALING_PATH

    scaler = one(base, "ScaledObject", "oa-machine-worker")
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "metrics-api"]
    metadata = trigger["metadata"]
    url = urlsplit(metadata["url"])
    host, namespace = url.hostname.split(".")[:2]  # type: ignore[union-attr]
    service = one(base, "Service", host)
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "dequeuer"
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    dequeuer = one(base, "Deployment", "oa-machine-dequeuer")
    (container,) = dequeuer["spec"]["template"]["spec"]["containers"]
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    config = settings_from_environment(config_data(base))
    assert ports[port["targetPort"]] == config.metrics_port
    assert (url.path, metadata["valueLocation"]) == (SCALING_PATH, SCALING_METRIC)
    assert namespace == "oa-machine", "the namespace docs/deploy.md tells to use"
    assert int(metadata["targetValue"]) == config.worker_concurrency


def test_one_run_per_pod_starts_a_job_per_task(one_run_per_pod: list[Obj]) -> None:
    assert not find(one_run_per_pod, "Deployment", "oa-machine-worker")
    assert not find(one_run_per_pod, "ScaledObject")
    assert not find(one_run_per_pod, "PodDisruptionBudget", "oa-machine-worker")
    scaler = one(one_run_per_pod, "ScaledJob", "oa-machine-worker")
    job = scaler["spec"]["jobTargetRef"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["backoffLimit"] == 0, "retries go through the run's deadline, with a count"
    settings = settings_from_environment(config_data(one_run_per_pod))
    assert job["activeDeadlineSeconds"] > settings.run_timeout_s
    (container,) = job["template"]["spec"]["containers"]
    assert container["args"] == ["worker", "--once"]
    assert scaler["spec"]["maxReplicaCount"] >= 10
    _check_rabbitmq_trigger(one_run_per_pod, scaler)


def test_worker_has_the_once_mode_the_overlay_runs() -> None:
    # The behaviour itself is tested in tests/worker/test_worker_once.py; here: the flag exists.
    from services import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", "--help"])
    assert exit_info.value.code == 0


# --- cross-check with the real kustomize, where there is one -------------------------------------


def _normalise(objects: list[Obj]) -> list[str]:
    """Objects as sorted JSON, generated names stripped of their hash suffix."""
    generated = {
        obj["metadata"]["name"]: obj["metadata"]["name"].rsplit("-", 1)[0]
        for obj in objects
        if obj["kind"] in ("ConfigMap", "Secret")
    }
    text = json.dumps(objects, sort_keys=True)
    for name, plain in generated.items():
        text = text.replace(f'"{name}"', f'"{plain}"')
    return sorted(json.dumps(obj, sort_keys=True) for obj in json.loads(text))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_renderer_agrees_with_kubectl_kustomize(folder: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    real = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert _normalise(render(folder)) == _normalise(real)
