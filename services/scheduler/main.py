"""Entry point of the scheduler service."""

from __future__ import annotations

from services.scheduler.service import serve
from shared.config import Settings
from shared.runner import run_service


def run(settings: Settings) -> None:
    run_service(serve(settings))
