"""Settling results in batches: one transaction for the `done` messages that arrive together.

A transaction per result costs a handful of round trips to PostgreSQL and serialises on the job
row when many runs of one job finish together (a batch set's tail). The consumer's handlers
therefore hand each result to :class:`DoneBatcher` and wait for its outcome: the batcher takes
what has arrived (up to :data:`MAX_BATCH`), settles it in one transaction
(:func:`services.dequeuer.settle.settle_done_batch`) and answers every handler, which then acks
its message. The ack policy is unchanged: a message is acked only after the transaction that
settled it committed.

When a batch fails:

* an outage (PostgreSQL gone) is handed to every handler in it, which waits and tries again as
  the broker's ack policy says (:mod:`shared.broker`);
* anything else is retried message by message, so that one bad message fails alone and its
  neighbours still settle. A message PostgreSQL refuses as data (a NUL character in its error
  or in its ``index.json``, which ``text`` and ``jsonb`` cannot hold) is stored without those
  characters rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.dequeuer.recovery import Rules
from services.dequeuer.settle import Outcome, settle_done, settle_done_batch
from shared.logging import get_logger
from shared.messages import Done
from shared.outage import is_outage

log = get_logger(__name__)

#: Results settled in one transaction at most.
MAX_BATCH = 200


@dataclass
class _Item:
    done: Done
    answer: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DoneBatcher:
    """Collects `done` messages from concurrent handlers and settles them together."""

    def __init__(self, pool: asyncpg.Pool, rules: Rules) -> None:
        self.pool = pool
        self.rules = rules
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def settle(self, done: Done) -> Outcome:
        """Settle ``done`` with whatever else is waiting; raises what settling it raised."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        item = _Item(done)
        self._queue.put_nowait(item)
        return await item.answer

    async def close(self) -> None:
        """Stop the background task; waiting handlers are cancelled with it."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # No waiting on purpose: what arrived while the last batch was settled goes now;
            # under load batches grow by themselves, when idle a result is settled at once.
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [item for item in batch if not item.answer.done()]  # handler cancelled
            if batch:
                await self._settle(batch)

    async def _settle(self, batch: list[_Item]) -> None:
        try:
            outcomes = await settle_done_batch(self.pool, [item.done for item in batch],
                                               self.rules)
        except asyncio.CancelledError:
            for item in batch:
                item.answer.cancel()
            raise
        except Exception as exc:
            if is_outage(exc) or len(batch) == 1:
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(exc)
                return
            log.warning("dequeuer.batch_failed", size=len(batch), error=repr(exc))
            await self._one_by_one(batch)
            return
        for item, outcome in zip(batch, outcomes, strict=True):
            if not item.answer.done():
                item.answer.set_result(outcome)

    async def _one_by_one(self, batch: list[_Item]) -> None:
        for item in batch:
            try:
                try:
                    outcome = await settle_done(self.pool, item.done, self.rules)
                except asyncpg.PostgresError as exc:
                    if not (getattr(exc, "sqlstate", None) or "").startswith("22"):
                        raise
                    log.warning("dequeuer.done_sanitised", run_id=item.done.run_id,
                                error=repr(exc))
                    outcome = await settle_done(self.pool, without_nul(item.done), self.rules)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not item.answer.done():
                    item.answer.set_exception(exc)
            else:
                if not item.answer.done():
                    item.answer.set_result(outcome)


def without_nul(done: Done) -> Done:
    """``done`` without NUL characters anywhere (PostgreSQL text and jsonb cannot hold them)."""
    return Done.model_validate(_strip_nul(done.model_dump(mode="json")))


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip_nul(item) for item in value]
    if isinstance(value, dict):
        return {_strip_nul(key): _strip_nul(item) for key, item in value.items()}
    return value
