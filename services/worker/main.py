"""Entry point of the worker service."""

from __future__ import annotations

from services.worker.consumer import Worker, serve
from shared.config import Settings
from shared.runner import run_service


def run(settings: Settings, *, once: bool = False) -> None:
    """Serve; the first SIGTERM/SIGINT asks the worker to wind down (grace, hand-back)."""
    workers: list[Worker] = []

    def stop() -> bool:
        if not workers:
            return False  # not started yet: nothing to hand back, cancel at once
        workers[0].stop()
        return True

    run_service(serve(settings, workers, once=once), stop=stop)
