"""Offline validation of docker-compose.yml, the Dockerfile, .dockerignore and .env.example.

docker-compose.yml is validated against the Compose Specification JSON Schema, vendored here as
compose-spec.json: the copy bundled in the PyPI package check-jsonschema 0.39.0
(check_jsonschema/builtin_schemas/vendor/compose-spec.json, sha256 d549057e...0e64), which
comes from github.com/compose-spec/compose-spec (schema/compose-spec.json), licensed under the
Apache License 2.0: compose-spec.LICENSE beside it. Then the file is checked against the code
it runs: settings, the CLI, the services' dependencies, and the one Dockerfile.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from shared.config import Settings
from tests.deploy import (
    AWS_VARIABLES,
    REPO_ROOT,
    SERVICES,
    SETTINGS_VARIABLES,
    SUBCOMMANDS,
    cli_subcommands,
    settings_from_environment,
)

HERE = Path(__file__).resolve().parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SCHEMA_FILE = HERE / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

Obj = dict[str, Any]

# --- interpolation, as `docker compose` does it before validating --------------------------------

VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(node: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Substitute ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$ like compose does."""
    if isinstance(node, dict):
        return {key: interpolate(value, env, missing) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env, missing) for item in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = env.get(name), match["op"], match["arg"]
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return str(arg)
            return value
        assert op is None, f"${{{name}{op}...}} is not used in this file"
        if value is None:
            missing.add(name)
            return ""
        return value

    return VARIABLE.sub(substitute, node)


@cache
def raw_compose() -> Obj:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose(env: dict[str, str] | None = None) -> Obj:
    """docker-compose.yml as compose sees it with no `.env` (or with `env`)."""
    missing: set[str] = set()
    data = interpolate(copy.deepcopy(raw_compose()), env or {}, missing)
    assert not missing, f"variables without a default: {missing}; `docker compose up` warns"
    assert isinstance(data, dict)
    return data


def app_services(data: Obj) -> dict[str, Obj]:
    """The services built from our Dockerfile."""
    return {name: service for name, service in data["services"].items() if "build" in service}


def environment(service: Obj) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def env_file_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file, as compose reads unquoted values (comments skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            assert not value.startswith(("'", '"')), f"{path}: {key}: quoting is read differently"
            values[key.strip()] = value.strip()
    return values


def container_environment(service: Obj) -> dict[str, str]:
    """What the container gets with no `.env`: the required env files, then `environment`."""
    merged: dict[str, str] = {}
    for entry in service.get("env_file", []):
        if entry.get("required", True):
            merged.update(env_file_values(REPO_ROOT / entry["path"]))
    return {**merged, **environment(service)}


# --- the schema ----------------------------------------------------------------------------------


def test_vendored_schema_is_the_recorded_copy() -> None:
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256, "compose-spec.json changed: record its origin and new hash"
    assert (HERE / "compose-spec.LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize(
    "env",
    [{}, {"WORKER_REPLICAS": "4", "WEBHOOK_PORT": "9090", "WORKER_CONCURRENCY": "2"}],
    ids=["defaults", "overrides"],
)
def test_compose_file_matches_the_compose_spec(
    validator: jsonschema.protocols.Validator, env: dict[str, str]
) -> None:
    errors = [
        f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose(env))
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_catches_a_broken_file(validator: jsonschema.protocols.Validator) -> None:
    broken = compose()
    broken["services"]["worker"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["webhook"]["helthcheck"] = {}
    assert len(list(validator.iter_errors(broken))) >= 2


# --- the services --------------------------------------------------------------------------------


def test_every_dependency_exists_and_the_graph_has_no_cycle() -> None:
    services = compose()["services"]
    graph = {name: set(service.get("depends_on", {})) for name, service in services.items()}
    for name, needs in graph.items():
        assert needs <= services.keys(), f"{name} depends on unknown {needs - services.keys()}"
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {name for name, needs in graph.items() if name not in done and needs <= done}
        assert ready, f"dependency cycle among {set(graph) - done}"
        done |= ready


def test_dependency_conditions_fit_the_services() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for needed, rule in service.get("depends_on", {}).items():
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits on {needed}'s health"
            elif condition == "service_completed_successfully":
                assert services[needed].get("restart") == "no", f"{needed} is a one-shot"
    for infrastructure in ("postgres", "rabbitmq", "minio"):
        assert "healthcheck" in services[infrastructure]
    for name in (*SERVICES, "migrate"):
        needs = services[name]["depends_on"]
        assert needs["postgres"]["condition"] == "service_healthy"
    for name in SERVICES:
        needs = services[name]["depends_on"]
        assert needs["rabbitmq"]["condition"] == "service_healthy"
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["createbucket"]["condition"] == "service_completed_successfully"


def test_app_services_build_our_dockerfile_and_run_subcommands() -> None:
    data = compose()
    apps = app_services(data)
    assert set(apps) == {*SERVICES, "migrate"}
    images = {service["image"] for service in apps.values()}
    assert len(images) == 1, "one image for every service"
    for name, service in apps.items():
        build = service["build"]
        assert (REPO_ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).samefile(
            REPO_ROOT / "Dockerfile"
        )
        assert "entrypoint" not in service, "the image's ENTRYPOINT is oa-machine"
        command = service["command"]
        assert command[0] in SUBCOMMANDS, f"{name}: {command}"
        assert command[0] == name, f"service {name} runs `oa-machine {command[0]}`"
        assert service.get("init") is True, "tini forwards SIGTERM and reaps the run children"


def test_subcommands_match_cli() -> None:
    assert cli_subcommands() == SUBCOMMANDS
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["oa-machine"] == "services.cli:main"


def test_app_environment_names_real_settings_with_valid_values() -> None:
    for name, service in app_services(compose()).items():
        env = container_environment(service)
        unknown = set(env) - SETTINGS_VARIABLES - AWS_VARIABLES
        assert not unknown, f"{name}: no service reads {unknown}"
        settings = settings_from_environment(env)  # raises on a bad value
        assert settings.http_host == "0.0.0.0", "listen beyond loopback inside a container"
        assert settings.storage_url.startswith("s3://")
        assert not settings.demo_mode or "GITHUB_TOKEN" not in env, "no empty GITHUB_TOKEN"
        assert settings.webhook_secrets, "the webhook refuses to start without a secret"


#: Settings compose leaves to their default or to `.env`, and why.
COMPOSE_UNSET = {
    "GITHUB_TOKEN": "in `.env` or not at all (demo mode); an empty one is a bad token",
    "RABBITMQ_MANAGEMENT_URL": "read by `oa-machine up` only, which compose does not run",
    "USER_AGENT": "unset sends oa-machine/VERSION (+sources URL); empty is invalid",
    "WORKER_NAME": "unset means the container's host name and pid",
}


def test_every_setting_is_set_in_compose() -> None:
    """Each app container gets every variable the code reads, but for COMPOSE_UNSET."""
    for name, service in app_services(compose()).items():
        env = container_environment(service)
        missing = SETTINGS_VARIABLES | AWS_VARIABLES
        missing = missing - env.keys() - COMPOSE_UNSET.keys()
        assert not missing, f"{name}: not set: {sorted(missing)}"
        assert not env.keys() & COMPOSE_UNSET.keys(), name


def test_compose_states_its_minimum_version() -> None:
    # `env_file` entries with `path`/`required` arrived in Docker Compose 2.24.
    assert any("required" in entry for entry in raw_compose()["x-app"]["env_file"])
    for document in (COMPOSE_FILE, REPO_ROOT / "README.md", REPO_ROOT / "docs" / "deploy.md"):
        assert re.search(r"Compose 2\.24 or later", document.read_text()), document


def test_app_environment_points_at_the_compose_services() -> None:
    data = compose()
    services = data["services"]
    env = environment(services["worker"])
    settings = settings_from_environment(container_environment(services["worker"]))

    postgres = environment(services["postgres"])
    database = urlsplit(settings.database_url)
    assert database.hostname == "postgres" and database.port == 5432
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["POSTGRES_DB"]

    rabbitmq = environment(services["rabbitmq"])
    broker = urlsplit(settings.amqp_url)
    assert broker.hostname == "rabbitmq" and broker.port == 5672
    assert (broker.username, broker.password) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"],
        rabbitmq["RABBITMQ_DEFAULT_PASS"],
    )
    assert "15672:15672" in " ".join(services["rabbitmq"]["ports"]), "management UI published"
    assert "management" in services["rabbitmq"]["image"]

    minio = environment(services["minio"])
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    bucket = urlsplit(settings.storage_url).netloc
    script = " ".join(services["createbucket"]["command"])
    assert re.search(rf"mc mb (--ignore-existing |-p )*local/{re.escape(bucket)}(\s|$)", script)

    for name, service in app_services(data).items():
        assert environment(service) == {
            **environment(services["migrate"]),
            **environment(service),
        }, f"{name} and migrate see the same infrastructure"


def test_webhook_is_published_on_its_http_port() -> None:
    for env, host_port in (({}, "8080"), ({"WEBHOOK_PORT": "9090"}, "9090")):
        webhook = compose(env)["services"]["webhook"]
        http_port = settings_from_environment(environment(webhook)).http_port
        assert f"{host_port}:{http_port}" in webhook["ports"]
        probe = " ".join(webhook["healthcheck"]["test"])
        assert f"127.0.0.1:{http_port}/health" in probe


def test_worker_replicas_are_configurable() -> None:
    assert "${WORKER_REPLICAS" in raw_compose()["services"]["worker"]["deploy"]["replicas"]
    assert int(compose()["services"]["worker"]["deploy"]["replicas"]) >= 1
    worker = compose({"WORKER_REPLICAS": "6"})["services"]["worker"]
    assert int(worker["deploy"]["replicas"]) == 6
    assert "stop_grace_period" in worker, "time to hand a run back on SIGTERM"


# --- Dockerfile and .dockerignore ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]


def test_dockerfile_installs_the_locked_dependencies() -> None:
    instructions = dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert all(line.startswith("${PYTHON_IMAGE}") for line in froms) and len(froms) == 2
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("pip install --no-cache-dir uv==0.13.8" in run for run in runs)
    syncs = [i for i, (op, a) in enumerate(instructions) if op == "RUN" and "uv sync" in a]
    assert syncs and all("--frozen" in instructions[i][1] for i in syncs)
    assert all("--no-dev" in instructions[i][1] for i in syncs)
    copied_before_sync = " ".join(a for op, a in instructions[: syncs[0]] if op == "COPY")
    assert "pyproject.toml" in copied_before_sync and "uv.lock" in copied_before_sync
    assert not any(re.search(r"apt-get install.*gdal", run) for run in runs), "GDAL: wheels"


def test_dockerfile_runs_oa_machine_as_non_root() -> None:
    instructions = dockerfile_instructions()
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["oa-machine"]
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "/app/.venv/bin" in env and "HTTP_HOST=0.0.0.0" in env
    cmd = [args for op, args in instructions if op == "CMD"]
    assert json.loads(cmd[-1])[0] in SUBCOMMANDS


def dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins)."""
    allowed = True
    for rule in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(/.*)?", path):
            allowed = negate
    return allowed


def test_build_context_has_what_the_dockerfile_copies() -> None:
    sources = []
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    assert {"pyproject.toml", "uv.lock", "README.md", "shared", "services"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file"
        assert dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    for excluded in (".venv", ".git", "tests/deploy/test_compose.py", "shared/__pycache__/x.pyc"):
        assert not dockerignore_allows(excluded), f"{excluded} should stay out of the image"


# --- .env.example --------------------------------------------------------------------------------

ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
PATH_DEFAULTS = {"STORAGE_URL", "WORK_DIR"}  # depend on where the checkout is


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    previous = ""
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            name, value = match.groups()
            assert name not in values, f"{name} twice"
            assert ASSIGNMENT.match(previous) or previous.startswith("#"), f"{name}: comment it"
            values[name] = value
        previous = line
    return values


def test_env_example_lists_every_setting_with_its_default() -> None:
    values = env_example()
    assert SETTINGS_VARIABLES <= values.keys(), SETTINGS_VARIABLES - values.keys()
    assert AWS_VARIABLES <= values.keys()
    compose_variables = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE_FILE.read_text()))
    extra = values.keys() - SETTINGS_VARIABLES - AWS_VARIABLES - compose_variables
    assert not extra, f"variables nothing reads: {extra}"
    defaults = Settings.model_validate({})
    for name in sorted(SETTINGS_VARIABLES - PATH_DEFAULTS):
        field = name.lower()
        expected = getattr(defaults, field)
        if values[name] == "":
            assert expected in (None, []), f"{name}: its default is {expected!r}"
        else:
            shown = getattr(Settings.model_validate({field: values[name]}), field)
            assert shown == expected, f"{name}={values[name]} but the default is {expected!r}"


def test_env_example_assigns_nothing_by_default() -> None:
    # A copy to `.env` must change nothing: an empty GITHUB_TOKEN= is not an unset one.
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        assert not line.strip() or line.startswith("#"), f"uncommented: {line}"
