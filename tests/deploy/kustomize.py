"""A small kustomize, for rendering k8s/ in tests without kubectl.

It builds a kustomization the way kustomize does for the features k8s/ uses, and refuses any
other field, so that a kustomization growing a new feature fails the tests until this learns it:

* ``resources`` (files and folders), ``components`` (``kind: Component`` folders, applied to
  what the resources gave);
* ``configMapGenerator`` / ``secretGenerator`` with ``literals`` or ``envs``, ``behavior``
  (``create``, ``merge``), per-generator ``options`` and ``generatorOptions``
  (``disableNameSuffixHash``); generated names carry a content hash (not kustomize's own hash:
  tests compare names without it);
* ``patches``: whole-object ``$patch: delete`` and JSON 6902 operations (``add``, ``replace``,
  ``remove``) on a ``target`` (kind, name);
* ``replacements`` whose field paths are dotted, with ``[name=value]`` list selectors;
* ``images`` (``newName``, ``newTag``, ``digest``), ``configurations`` (``nameReference``),
  ``namespace``.

Order, as in kustomize: resources, components, generators, patches, images, name references,
namespace, replacements. Where kubectl is installed, test_k8s checks that `kubectl kustomize`
renders the same objects.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "resources", "components", "images", "configMapGenerator",
    "secretGenerator", "generatorOptions", "configurations", "patches", "replacements",
    "namespace",
}  # fmt: skip
COMPONENT_FIELDS = KUSTOMIZATION_FIELDS - {"namespace"}
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
GENERATED_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


class Generated(dict[int, str]):
    """Generated objects (by id) -> their generator's name; ``names``: every name each had."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[int, list[str]] = {}


def group(api_version: str) -> str:
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


def _generator_data(spec: Obj, folder: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for env_file in spec.get("envs", []):
        for line in (folder / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    return data


def _base64(value: str) -> str:
    """Base64 as kustomize writes it: past 70 characters, in lines of 70, each ending in \n."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _hashed(obj: Obj, name: str, options: Obj) -> None:
    if options.get("disableNameSuffixHash", False):
        obj["metadata"]["name"] = name
        return
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]
    obj["metadata"]["name"] = f"{name}-{digest}"


def _generate(
    kind: str, spec: Obj, options: Obj, folder: Path, resources: list[Obj], origin: Generated
) -> None:
    unknown = set(spec) - {"name", "literals", "envs", "type", "behavior", "options"}
    assert not unknown, f"{folder}: generator fields not handled by this renderer: {unknown}"
    options = {**options, **spec.get("options", {})}
    assert set(options) <= {"disableNameSuffixHash"}, f"{folder}: generator options {options}"
    data = _generator_data(spec, folder)
    if kind == "Secret":
        data = {key: _base64(value) for key, value in data.items()}
    behavior = spec.get("behavior", "create")
    if behavior == "merge":
        (existing,) = [
            obj for obj in resources if obj["kind"] == kind and origin.get(id(obj)) == spec["name"]
        ]
        existing["data"] = {**existing.get("data", {}), **data}
        _hashed(existing, spec["name"], options)
        return
    assert behavior == "create", f"{folder}: generator behavior {behavior} not handled"
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
    obj["data"] = data
    _hashed(obj, spec["name"], options)
    origin[id(obj)] = spec["name"]
    resources.append(obj)


def load_documents(path: Path) -> list[Obj]:
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


def _key(obj: Obj) -> tuple[str, str, str]:
    return group(obj["apiVersion"]), obj["kind"], obj["metadata"]["name"]


def _delete_patch(patch: Obj, resources: list[Obj], folder: Path) -> list[Obj]:
    assert patch.get("$patch") == "delete", (
        f"{folder}: of strategic-merge patches, only whole-object `$patch: delete` is handled"
    )
    target = (group(patch["apiVersion"]), patch["kind"], patch["metadata"]["name"])
    kept = [obj for obj in resources if _key(obj) != target]
    assert len(kept) == len(resources) - 1, f"{folder}: delete patch matches nothing: {target}"
    return kept


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(obj: Obj, operations: list[Obj], folder: Path) -> None:
    for operation in operations:
        op, parts = operation["op"], _pointer(operation["path"])
        assert op in ("add", "replace", "remove"), f"{folder}: JSON patch op {op} not handled"
        node: Any = obj
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[index] = copy.deepcopy(operation["value"])
            else:
                del node[index]
        else:
            if op in ("replace", "remove"):
                assert last in node, f"{folder}: {op} {operation['path']}: no such field"
            if op == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(operation["value"])


def _targets(target: Obj, resources: list[Obj], folder: Path) -> list[Obj]:
    assert set(target) <= {"kind", "name", "group", "version"}, f"{folder}: target {target}"
    found = [
        obj
        for obj in resources
        if obj["kind"] == target.get("kind", obj["kind"])
        and ("name" not in target or re.fullmatch(target["name"], obj["metadata"]["name"]))
        and group(obj["apiVersion"]) == target.get("group", group(obj["apiVersion"]))
    ]
    assert found, f"{folder}: patch target matches nothing: {target}"
    return found


def _apply_patches(kustomization: Obj, resources: list[Obj], folder: Path) -> list[Obj]:
    for entry in kustomization.get("patches", []):
        assert set(entry) <= {"patch", "path", "target"}, f"{folder}: patch fields {set(entry)}"
        patch = yaml.safe_load(entry.get("patch") or (folder / entry["path"]).read_text())
        if isinstance(patch, list):
            assert "target" in entry, f"{folder}: a JSON 6902 patch needs a target"
            for obj in _targets(entry["target"], resources, folder):
                _json_patch(obj, patch, folder)
        else:
            assert "target" not in entry, f"{folder}: targeted strategic merge not handled"
            resources = _delete_patch(patch, resources, folder)
    return resources


_SEGMENT = re.compile(r"^\[(?P<key>[^=\]]+)=(?P<value>[^\]]+)\]$")


def _field(obj: Obj, field_path: str) -> tuple[Any, Any]:
    """(parent, key) of a dotted kustomize field path with [name=value] list selectors."""
    node: Any = obj
    parts = field_path.split(".")
    for index, part in enumerate(parts):
        match = _SEGMENT.match(part)
        if match:
            (node,) = [item for item in node if str(item.get(match["key"])) == match["value"]]
            continue
        if index == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError(f"{field_path} ends with a selector")


def _replace(kustomization: Obj, resources: list[Obj], folder: Path) -> None:
    for replacement in kustomization.get("replacements", []):
        assert set(replacement) == {"source", "targets"}, f"{folder}: replacement {replacement}"
        source = replacement["source"]
        assert set(source) <= {"kind", "name", "fieldPath"}, f"{folder}: source {source}"
        (origin,) = _targets({k: source[k] for k in ("kind", "name")}, resources, folder)
        parent, key = _field(origin, source["fieldPath"])
        value = parent[key]
        for target in replacement["targets"]:
            assert set(target) <= {"select", "fieldPaths"}, f"{folder}: target {target}"
            for obj in _targets(target["select"], resources, folder):
                for path in target["fieldPaths"]:
                    place, name = _field(obj, path)
                    assert name in place, f"{folder}: replacement target {path} does not exist"
                    place[name] = copy.deepcopy(value)


def _name_references(
    kustomization: Obj, resources: list[Obj], folder: Path, renamed: dict[tuple[str, str], str]
) -> None:
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
            if obj["kind"] == spec["kind"] and group(obj["apiVersion"]) == spec.get("group", ""):
                places.extend((kind, p, k) for p, k in _walk(obj, spec["path"].split("/")))
        for kind, parent, key in places:
            parent[key] = renamed.get((kind, parent[key]), parent[key])


def kustomization_file(folder: Path) -> Obj:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def render(folder: Path, *, _origin: Generated | None = None) -> list[Obj]:
    """The objects `kustomize build folder` would print (generated names hashed differently)."""
    origin = Generated() if _origin is None else _origin
    kustomization = kustomization_file(folder)
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}: kustomization fields not handled by this renderer: {unknown}"
    assert kustomization.get("kind", "Kustomization") == "Kustomization", folder
    resources = _resources(kustomization, folder, origin)
    for entry in kustomization.get("components", []):
        resources = _component((folder / entry).resolve(), resources, origin)
    return _transform(kustomization, folder, resources, origin)


def _resources(kustomization: Obj, folder: Path, origin: Generated) -> list[Obj]:
    resources: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder}: resource {entry} does not exist"
        resources.extend(render(path, _origin=origin) if path.is_dir() else load_documents(path))
    return resources


def _component(folder: Path, resources: list[Obj], origin: Generated) -> list[Obj]:
    kustomization = kustomization_file(folder)
    assert kustomization["kind"] == "Component", f"{folder} is not a kustomize Component"
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    unknown = set(kustomization) - COMPONENT_FIELDS
    assert not unknown, f"{folder}: component fields not handled by this renderer: {unknown}"
    resources = resources + _resources(kustomization, folder, origin)
    return _transform(kustomization, folder, resources, origin)


def _transform(
    kustomization: Obj, folder: Path, resources: list[Obj], origin: Generated
) -> list[Obj]:
    options = kustomization.get("generatorOptions", {})
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in kustomization.get(field, []):
            _generate(kind, spec, options, folder, resources, origin)
    resources = _apply_patches(kustomization, resources, folder)
    _set_image(resources, kustomization.get("images", []))
    # A reference may hold the generator's name or a name given at a lower level (a merge
    # renames): both lead to the current name.
    renamed: dict[tuple[str, str], str] = {}
    for obj in resources:
        if id(obj) in origin:
            current = obj["metadata"]["name"]
            names = origin.names.setdefault(id(obj), [origin[id(obj)]])
            names.append(current)
            renamed.update({(obj["kind"], name): current for name in names})
    _name_references(kustomization, resources, folder, renamed)
    if "namespace" in kustomization:
        for obj in resources:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    _replace(kustomization, resources, folder)
    return resources


def normalise(objects: list[Obj]) -> list[str]:
    """Objects as sorted JSON, generated names stripped of their hash suffix (this renderer's
    hash is not kustomize's)."""
    generated = {
        obj["metadata"]["name"]: GENERATED_SUFFIX.sub("", obj["metadata"]["name"])
        for obj in objects
        if obj["kind"] in ("ConfigMap", "Secret")
        and GENERATED_SUFFIX.search(obj["metadata"]["name"])
    }
    text = json.dumps(objects, sort_keys=True)
    for name, plain in generated.items():
        text = text.replace(f'"{name}"', f'"{plain}"')
    return sorted(json.dumps(obj, sort_keys=True) for obj in json.loads(text))
