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


def run_service(main: Coroutine[Any, Any, None], *, stop: Callable[[], bool] | None = None) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives.

    Without ``stop`` the first signal cancels ``main`` (its ``finally`` blocks close
    connections). With ``stop``, the first signal calls it instead, so the service can wind
    down in its own time (the worker lets its runs finish, then hands back what is left), and a
    second signal cancels ``main``; ``stop`` returning False means "cancel now" all the same.
    """
    asyncio.run(_until_signal(main, stop))


async def _until_signal(
    main: Coroutine[Any, Any, None], stop: Callable[[], bool] | None
) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main)
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if stop is not None and signals == 1:
            log.info("service.stopping", signal=signal.Signals(signum).name)
            if stop():
                return
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("service.stopped")
