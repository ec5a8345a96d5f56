"""A limit on the requests in flight to one host, held across the runs of a worker.

Each run of a worker is its own child process (forked by the zygote, see
:mod:`services.worker.zygote`), with its own event loop, so an ``asyncio.Semaphore`` would
limit one run only: eight runs of one county's layers would hit its server eight times over.
The limit is therefore a set of slot files per host in a folder every run of the worker
sees (``WORK_DIR/host-slots``): a request holds one slot, an exclusive ``flock`` on one of
``limit`` files, for as long as it is in flight.

What "the same worker" can guarantee: every process that uses the same folder on the same
machine shares the limit, so all the runs of one worker process (whatever WORKER_CONCURRENCY)
and also several workers started on one machine with one WORK_DIR. Workers on other machines
or pods each have their own folder, and so their own limit. A lock belongs to its open file
and goes when the process ends however it ends (a run killed at its time limit included), so
no slot is ever lost. flock locks of two ``open`` calls conflict even within one process, so
the pages of one dump are limited by the same files.

A throttled host (429, 503) asks everyone to wait: the time until which requests to it wait is
kept in a file beside the slots, so the other runs of the worker slow down too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from shared.config import DEFAULT_ESRI_HOST_LIMIT

log = structlog.get_logger(__name__)

#: First and longest pause between two looks for a free slot; the wait doubles in between.
#: A slot frees when another request ends, which takes tens of milliseconds at least.
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.1
#: The folder, under WORK_DIR, where the worker keeps its slot files.
SLOTS_FOLDER = "host-slots"


@dataclass(frozen=True)
class HostLimit:
    """How many requests may be in flight to one host, and where the slots are kept.

    ``slots_dir`` None keeps the slots beside the download, which limits that download only
    (``process-one``, tests).
    """

    limit: int = DEFAULT_ESRI_HOST_LIMIT
    slots_dir: Path | None = None


def host_key(url: str) -> str:
    """The host and port of ``url``, as one file-name-safe word."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    plain = f"{host}:{port}"
    # Readable, and a hash so that two names that read the same after cleaning stay apart.
    digest = hashlib.sha1(plain.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{re.sub(r'[^a-z0-9.-]', '_', host)[:64]}-{port}-{digest}"


class HostSlots:
    """The ``limit`` request slots of one host; ``async with slots.slot():`` around a request."""

    def __init__(self, directory: Path, url: str, limit: int) -> None:
        if limit < 1:
            raise ValueError("a host needs at least one slot")
        self.limit = limit
        key = host_key(url)
        directory.mkdir(parents=True, exist_ok=True)
        self._paths = [directory / f"{key}.{index}.slot" for index in range(limit)]
        self._pause_path = directory / f"{key}.pause"

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        poll_s = POLL_FIRST_S
        while True:
            await self._wait_pause()
            fd = self._try_lock()
            if fd is not None:
                break
            # Jittered, so that waiting runs do not all look at the same moment.
            await asyncio.sleep(poll_s * random.uniform(0.5, 1.5))
            poll_s = min(poll_s * 2, POLL_MAX_S)
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def pause(self, seconds: float) -> None:
        """Hold every request to the host (of every run that shares the folder) for a while."""
        until = time.time() + seconds
        if until <= self._paused_until():
            return
        temporary = self._pause_path.with_name(f"{self._pause_path.name}.{os.getpid()}")
        temporary.write_text(repr(until))
        temporary.replace(self._pause_path)
        log.info("host.paused", host=self._pause_path.stem, seconds=round(seconds, 3))

    def _try_lock(self) -> int | None:
        # Starting at a random slot spreads the processes over the files: fewer failed tries.
        start = random.randrange(self.limit)
        for index in range(self.limit):
            path = self._paths[(start + index) % self.limit]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return fd
        return None

    def _paused_until(self) -> float:
        try:
            return float(self._pause_path.read_text())
        except (OSError, ValueError):
            return 0.0

    async def _wait_pause(self) -> None:
        while (left_s := self._paused_until() - time.time()) > 0:
            await asyncio.sleep(left_s)
