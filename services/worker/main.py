"""Entry point of the worker service."""

from __future__ import annotations

from shared.config import Settings
from shared.runner import run_service
from services.worker.consumer import serve


def run(settings: Settings) -> None:
    run_service(serve(settings))
