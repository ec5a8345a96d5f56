"""Entry point of the dequeuer service."""

from __future__ import annotations

from services.dequeuer.service import serve
from shared.config import Settings
from shared.runner import run_service


def run(settings: Settings) -> None:
    run_service(serve(settings))
