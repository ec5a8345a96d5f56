"""Entry point of the worker service."""

from __future__ import annotations

from services.worker.consumer import serve
from shared.config import Settings
from shared.runner import run_service


def run(settings: Settings, *, once: bool = False) -> None:
    run_service(serve(settings, once=once))
