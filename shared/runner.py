"""Starting a service: settings, logging, signals, and one clear line when settings are bad."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.logging import configure_logging, get_logger

log = get_logger(__name__)


def start(service: str, run: Callable[[Settings], None]) -> None:
    """Load settings and logging, then ``run(settings)``; a bad setting exits 2 with one line."""
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level, service=service)
        run(settings)
    except ConfigError as exc:
        print(f"oa-machine {service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        # Nothing listening at DATABASE_URL or AMQP_URL at start: one line, not a traceback.
        print(f"oa-machine {service}: cannot connect: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives, then cancel it cleanly.

    Cancelling (rather than exiting) lets ``finally`` blocks close connections and lets a
    worker hand back its run.
    """
    asyncio.run(_until_signal(main))


async def _until_signal(main: Coroutine[Any, Any, None]) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("service.stopped")
