"""structlog set-up: readable lines on a terminal, one JSON object per line elsewhere.

Every service calls :func:`configure_logging` once at start. Log events are named by the state
change they record (``run.started``, ``run.failed``, ...) and bound with ``run_id``, ``job_id``,
``source`` where they apply.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]


def configure_logging(
    log_format: LogFormat | None = None,
    level: str = "info",
    *,
    service: str | None = None,
    handler: logging.Handler | None = None,
) -> None:
    """Route structlog and the standard library's logging through one renderer.

    ``log_format`` None picks console on a terminal and JSON otherwise (containers).
    ``service`` is bound to every event so the logs of `oa-machine up` can be told apart.
    ``handler`` is where the rendered lines go (default: stderr); its formatter is replaced.
    """
    chosen: LogFormat = log_format or ("console" if sys.stderr.isatty() else "json")
    numeric_level = logging.getLevelName(level.upper())
    shared_processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.typing.Processor
    if chosen == "json":
        shared_processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared_processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = handler if handler is not None else logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Libraries that log every request or frame would drown the state changes we care about.
    for noisy in ("aiormq", "aio_pika", "botocore", "aiobotocore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger; ``name`` is usually ``__name__``."""
    return structlog.stdlib.get_logger(name)
