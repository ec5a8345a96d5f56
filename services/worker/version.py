"""The code version recorded in every run's state."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    CODE_VERSION = version("oa-machine")
except PackageNotFoundError:  # running from a checkout that was never installed
    CODE_VERSION = "0+unknown"
