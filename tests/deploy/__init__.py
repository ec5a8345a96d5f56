"""Offline checks of the deployment files: Dockerfile, docker-compose.yml, k8s/, .env.example.

Nothing here builds an image or talks to a cluster: the files are parsed and validated against
vendored or packaged schemas, and against the code they deploy (settings, CLI, queue names).
"""

from __future__ import annotations

import ast
from pathlib import Path

from shared.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Subcommands of the `oa-machine` console script (services/cli.py); cross-checked there by
#: test_compose.test_subcommands_match_cli.
SUBCOMMANDS = frozenset(
    {"webhook", "worker", "dequeuer", "scheduler", "up", "migrate", "process-one",
     "dead-letters", "check-sources", "enqueue-sources", "clean-up", "collect"}
)

#: The long-running services, each its own container / Deployment.
SERVICES = ("webhook", "worker", "dequeuer", "scheduler")

#: Variables read by botocore itself rather than by Settings.
AWS_VARIABLES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"})

#: Every environment variable of shared/config.py.
SETTINGS_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)


def cli_subcommands() -> set[str]:
    """Names given to `add_parser` in services/cli.py, reading its SERVICES tuple too."""
    tree = ast.parse((REPO_ROOT / "services" / "cli.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "SERVICES" for target in node.targets
        ):
            names.update(ast.literal_eval(node.value))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_parser"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def settings_from_environment(environment: dict[str, str]) -> Settings:
    """Validate container environment values with the real Settings (not the process env)."""
    values = {
        name.lower(): value for name, value in environment.items() if name in SETTINGS_VARIABLES
    }
    # model_validate skips the settings sources: only these values and the defaults count.
    return Settings.model_validate(values)
