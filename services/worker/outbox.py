"""Messages a worker could not publish yet, kept on local disk until the broker takes them.

A run's result must never be dropped because RabbitMQ was away when the run ended: its outputs
are already in storage, and its `done` (or a `returned` of a stopping worker) is written here
first, as one file per message beside the runs' work folders (``WORK_DIR/outbox/``), then
published; the file is removed once the broker confirms. What is left (the broker is down, the
worker was killed or restarted) is published by :meth:`Outbox.flush`, which the worker runs at
start, after each reconnection, and every few seconds while anything is pending.

Files are written atomically (a temporary name, fsync, rename), so a crash leaves either a
whole message or none. A file that cannot be read back as a message (the disk lied) is moved to
``outbox/unreadable/`` with a log line, never published and never deleted. Publishing the same
message twice is harmless: the dequeuer settles each attempt once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.broker import Broker, PublishError
from shared.errors import MessageError
from shared.logging import get_logger
from shared.messages import ANY_MESSAGE, Message
from shared.outage import Backoff

log = get_logger(__name__)

_SUFFIX = ".json"


@dataclass(frozen=True)
class Pending:
    """One message waiting in the outbox."""

    path: Path
    exchange: str
    routing_key: str
    message: Message


class Outbox:
    """The folder of unsent messages of one worker (or of the workers sharing ``folder``)."""

    def __init__(self, folder: Path, broker: Broker) -> None:
        self.folder = folder
        self.broker = broker
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def put(
        self, exchange: str, routing_key: str, message: Message, *, wake: bool = True
    ) -> Path:
        """Write ``message`` durably; returns its file. Blocking, but small and local.

        ``wake`` asks the background loop to publish it soon.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        # Time first, so that names sort in the order messages were written.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        body = json.dumps({
            "exchange": exchange, "routing_key": routing_key,
            "message": json.loads(message.model_dump_json()),
        })
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(final)
        _fsync_dir(self.folder)
        if wake:
            self._wake.set()
        return final

    async def send(self, exchange: str, routing_key: str, message: Message) -> bool:
        """Keep ``message`` on disk, then publish it; True if the broker has it now.

        When it could not be published it stays in the outbox for :meth:`flush`.
        """
        # Under the lock, so that the background flush does not publish it a second time.
        async with self._lock:
            path = self.put(exchange, routing_key, message, wake=False)
            try:
                await self.broker.publish(exchange, routing_key, message)
            except PublishError as exc:
                log.warning("outbox.kept", file=path.name, kind=getattr(message, "kind", None),
                            error=str(exc))
                self._wake.set()
                return False
            path.unlink(missing_ok=True)
            return True

    def pending(self) -> list[Pending]:
        """Every readable message waiting, oldest first; unreadable files are moved aside."""
        if not self.folder.is_dir():
            return []
        found: list[Pending] = []
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            try:
                found.append(_read(path))
            except (OSError, ValueError, MessageError) as exc:
                self._quarantine(path, exc)
        return found

    async def flush(self) -> int:
        """Publish what is waiting, oldest first; stops at the first failure. Returns how many
        were published."""
        async with self._lock:
            sent = 0
            for item in self.pending():
                try:
                    await self.broker.publish(item.exchange, item.routing_key, item.message)
                except PublishError as exc:
                    log.info("outbox.waiting", pending=len(self.pending()), error=str(exc))
                    return sent
                item.path.unlink(missing_ok=True)
                sent += 1
                log.info("outbox.sent", file=item.path.name,
                         kind=getattr(item.message, "kind", None),
                         run_id=getattr(item.message, "run_id", None))
            return sent

    def wake(self) -> None:
        """Try again now (the broker is back)."""
        self._wake.set()

    async def run(self) -> None:
        """Flush whenever something is pending, backing off while the broker is away."""
        backoff = Backoff(first_s=1.0, max_s=15.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending():
                await self.flush()
                if not self.pending():
                    break
                try:
                    await asyncio.wait_for(self._wake.wait(), backoff.next_delay_s())
                except TimeoutError:
                    pass
                self._wake.clear()
            backoff.reset()

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        aside = self.folder / "unreadable"
        aside.mkdir(exist_ok=True)
        try:
            path.replace(aside / path.name)
        except OSError:
            pass
        log.error("outbox.unreadable", file=path.name, moved_to=str(aside), error=repr(exc))


def _read(path: Path) -> Pending:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    exchange, routing_key = data.get("exchange"), data.get("routing_key")
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        raise ValueError("exchange or routing_key missing")
    try:
        message = ANY_MESSAGE.validate_python(data.get("message"))
    except Exception as exc:
        raise MessageError(f"not a valid message: {exc}") from exc
    return Pending(path, exchange, routing_key, message)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
