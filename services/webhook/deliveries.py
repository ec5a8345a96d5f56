"""GitHub deliveries: stored at the door, made into jobs afterwards, never lost.

GitHub gives a delivery 10 seconds. ``POST /hook`` (``routes.py``) therefore only checks the
signature and the payload's shape, stores the delivery with :func:`store_delivery` (one
insert) and answers ``202``. The :class:`DeliveryProcessor` running in every webhook process
then takes stored deliveries one by one:

1. it *claims* one (``claimed_until``, under ``FOR UPDATE SKIP LOCKED``), so two webhook
   processes never work on the same delivery, and a delivery whose process died is taken over
   once the claim lapses;
2. it reads what changed from GitHub (``changes.py``) and, in one transaction, creates the job
   (``intake.py``) and records the delivery's outcome;
3. a GitHub failure puts the delivery back with a back-off (never before GitHub's
   ``Retry-After`` or rate-limit reset); after :data:`MAX_ATTEMPTS` tries, or at once for an
   answer no retry can change, the delivery ends as ``error`` and the commit gets an ``error``
   status naming the reason.

At start every unfinished delivery is picked up again. A redelivery of the same
``X-GitHub-Delivery`` finds the stored row and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from pydantic import ValidationError

from services.webhook.changes import Plan, plan_pull_request, plan_pull_request_event, plan_push
from services.webhook.events import IssueCommentEvent, PullRequestEvent, PushEvent
from services.webhook.intake import announce, create_job, queue_runs
from shared.broker import Broker
from shared.config import Settings
from shared.errors import GitHubError
from shared.github import GitHub, is_permanent, is_sha
from shared.jobs import queue_status
from shared.logging import get_logger
from shared.outage import Backoff, is_outage
from shared.outbox import send_statuses

log = get_logger(__name__)

#: Tries of one delivery before it ends as an error (backing off from 5 s to 10 min: ~40 min).
MAX_ATTEMPTS = 8
#: A process working on a delivery renews its claim every third of this; a process that died
#: leaves a claim that lapses after this, and another process takes the delivery over.
CLAIM = timedelta(seconds=30)
#: Deliveries worked on at once by one process.
CONCURRENCY = 8
#: The processor looks once no delivery has arrived for this long (see DeliveryProcessor.wake)
WAKE_DELAY_S = 0.02
#: ... but never later than this after the first delivery of a burst.
WAKE_MAX_DELAY_S = 0.25
#: How long stopping waits for the deliveries and publishes under way to end.
STOP_S = 10.0
#: Re-runs asked for in comments: at most one per pull request in this time.
RERUN_INTERVAL = timedelta(minutes=1)
#: The event of a job made for a re-run asked in a comment.
RERUN = "rerun"


@dataclass(frozen=True)
class Stored:
    """What :func:`store_delivery` did."""

    id: int
    duplicate: bool


async def store_delivery(pool: asyncpg.Pool, delivery_id: str, event: str, body: str) -> Stored:
    """Store a delivery once (one insert of its JSON body as received, checked to be JSON
    already); a redelivery returns the stored one."""
    row_id = await pool.fetchval(
        """
        INSERT INTO deliveries (delivery_id, event, payload) VALUES ($1, $2, $3::text::jsonb)
        ON CONFLICT (delivery_id) DO NOTHING RETURNING id
        """,
        delivery_id, event, body,
    )
    if row_id is not None:
        return Stored(int(row_id), duplicate=False)
    existing = await pool.fetchval(
        "SELECT id FROM deliveries WHERE delivery_id = $1", delivery_id
    )
    return Stored(int(existing), duplicate=True)


class Ignored(Exception):
    """The delivery asks for nothing after all (its reason is logged and stored)."""


class DeliveryProcessor:
    """Makes stored deliveries into jobs; see the module docstring."""

    def __init__(
        self, pool: asyncpg.Pool, broker: Broker, github: GitHub, settings: Settings
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.github = github
        self.settings = settings
        self._wake = asyncio.Event()
        self._wake_timer: asyncio.TimerHandle | None = None
        self._burst_started = 0.0
        self._queueing: set[asyncio.Task[int]] = set()

    def _queued(self, task: asyncio.Task[int]) -> None:
        self._queueing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("runs.queue_failed", error=repr(task.exception()))

    def wake(self) -> None:
        """A delivery was stored: look once the burst it belongs to is over.

        Deliveries come in bursts (a busy morning, a redelivery of many), and making them into
        jobs (reading files, checking them) is CPU work on the same event loop that answers
        ``POST /hook``. So the processor starts :data:`WAKE_DELAY_S` after the *last* delivery
        of a burst (each new one puts it off again), at most :data:`WAKE_MAX_DELAY_S` after
        the first: the whole burst is stored and answered before the heavier work begins.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._wake_timer is None:
            self._burst_started = now
        else:
            self._wake_timer.cancel()
        at = min(now + WAKE_DELAY_S, self._burst_started + WAKE_MAX_DELAY_S)

        def wake_now() -> None:
            self._wake_timer = None
            self._wake.set()

        self._wake_timer = loop.call_at(at, wake_now)

    async def run(self) -> None:
        """Process due deliveries for ever, waiting out database outages."""
        backoff = Backoff(first_s=1.0, max_s=30.0)
        slots = asyncio.Semaphore(CONCURRENCY)
        working: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._wake.clear()
                try:
                    claimed = await self._claim(CONCURRENCY - len(working))
                    # Woken again when a slot frees or a delivery arrives; only an idle loop
                    # needs to know when the next retry is due.
                    next_due_s = 60.0 if claimed or working else await self._next_due_s()
                    backoff.reset()
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    log.warning("deliveries.waiting", error=repr(exc))
                    await backoff.wait()
                    continue
                for row in claimed:
                    await slots.acquire()
                    task = asyncio.create_task(self._process_guarded(row))
                    working.add(task)

                    def finished(done: asyncio.Task[None]) -> None:
                        working.discard(done)
                        slots.release()
                        self._wake.set()  # a slot is free: there may be more to take

                    task.add_done_callback(finished)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), next_due_s)
        finally:
            stopping = {*working, *self._queueing}
            for pending in stopping:
                pending.cancel()
            if stopping:
                # Bounded: a task that does not stop must not keep the service from stopping
                # (its delivery's claim lapses and another process takes it over).
                _done, stuck = await asyncio.wait(stopping, timeout=STOP_S)
                if stuck:
                    log.warning("deliveries.stop_incomplete", tasks=len(stuck),
                                stuck=sorted(repr(task.get_coro()) for task in stuck))

    async def run_due(self) -> int:
        """Process every delivery due now, then return how many (tests, burst mode)."""
        done = 0
        while rows := await self._claim(CONCURRENCY):
            await asyncio.gather(*(self._process_guarded(row) for row in rows))
            done += len(rows)
        await asyncio.gather(*self._queueing, return_exceptions=True)
        return done

    async def _claim(self, limit: int) -> list[asyncpg.Record]:
        if limit <= 0:
            return []
        rows: list[asyncpg.Record] = await self.pool.fetch(
            """
            UPDATE deliveries SET claimed_until = now() + $2::interval, attempts = attempts + 1
            WHERE id IN (
                SELECT id FROM deliveries
                WHERE processed_at IS NULL AND next_try_at <= now()
                  AND (claimed_until IS NULL OR claimed_until < now())
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
            )
            RETURNING id, delivery_id, event, payload, attempts
            """,
            limit, CLAIM,
        )
        return sorted(rows, key=lambda row: row["id"])

    async def _next_due_s(self) -> float:
        wait = await self.pool.fetchval(
            """
            SELECT extract(epoch FROM min(greatest(next_try_at, coalesce(claimed_until,
                   next_try_at))) - now())
            FROM deliveries WHERE processed_at IS NULL
            """
        )
        return 60.0 if wait is None else min(max(float(wait), 0.05), 60.0)

    async def _process_guarded(self, row: asyncpg.Record) -> None:
        bound = log.bind(delivery=row["delivery_id"], event=row["event"])
        renewing = asyncio.create_task(self._renew_claim(row["id"]))
        try:
            await self._process_or_fail(row, bound)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _renew_claim(self, row_id: int) -> None:
        while True:
            await asyncio.sleep(CLAIM.total_seconds() / 3)
            with contextlib.suppress(Exception):  # an outage: the claim may lapse, harmlessly
                await self.pool.execute(
                    "UPDATE deliveries SET claimed_until = now() + $2::interval"
                    " WHERE id = $1 AND processed_at IS NULL", row_id, CLAIM)

    async def _process_or_fail(self, row: asyncpg.Record, bound: Any) -> None:
        try:
            await self.process(row)
        except asyncio.CancelledError:
            raise
        except GitHubError as exc:
            await self._failed(row, exc, permanent=is_permanent(exc), bound=bound)
        except Exception as exc:
            if is_outage(exc):
                # PostgreSQL or RabbitMQ went away mid-way: the claim lapses and it is retried.
                bound.warning("delivery.interrupted", error=repr(exc))
                with contextlib.suppress(Exception):
                    await self.pool.execute(
                        "UPDATE deliveries SET claimed_until = NULL, next_try_at = now() + "
                        "interval '5 seconds' WHERE id = $1 AND processed_at IS NULL", row["id"])
                return
            bound.exception("delivery.failed", error=repr(exc))
            await self._failed(row, exc, permanent=True, bound=bound)

    async def process(self, row: asyncpg.Record) -> None:
        """Make one stored delivery into a job (or an ignored outcome)."""
        payload = _payload_of(row)
        try:
            plan = await self._plan(row["event"], payload)
        except Ignored as reason:
            await self._ignore(row, str(reason))
            return
        async with self.pool.acquire() as conn, conn.transaction():
            still_open = await conn.fetchval(
                "SELECT 1 FROM deliveries WHERE id = $1 AND processed_at IS NULL FOR UPDATE",
                row["id"],
            )
            if not still_open:
                return
            too_soon = plan.event == RERUN and not await _mark_rerun(conn, plan)
            if not too_soon:
                result = await create_job(conn, plan, row["delivery_id"], self.settings)
                await conn.execute(
                    """
                    UPDATE deliveries SET processed_at = now(), outcome = 'job', job_id = $2,
                           claimed_until = NULL, last_error = NULL
                    WHERE id = $1
                    """,
                    row["id"], result.job_id,
                )
        if too_soon:
            # Another re-run of this pull request made its job while this one read GitHub.
            await self._ignore(row, _too_soon(plan.repo, plan.pr_number))
            return
        if result.job_id is not None and not result.duplicate:
            await announce(self.pool, self.github, self.settings, result.job_id)
            # Queued in the background: the next delivery need not wait for these publishes.
            # Should this process die first, the dequeuer's sweep queues them.
            queueing = asyncio.create_task(
                queue_runs(self.pool, self.broker, result.job_id, self.settings))
            self._queueing.add(queueing)
            queueing.add_done_callback(self._queued)

    async def _ignore(self, row: asyncpg.Record, reason: str) -> None:
        await self._finish(row, "ignored", None, reason)
        log.info("delivery.ignored", delivery=row["delivery_id"], reason=reason)

    async def _plan(self, event: str, payload: dict[str, Any]) -> Plan:
        try:
            if event == "push":
                return await plan_push(PushEvent.model_validate(payload), self.github)
            if event == "pull_request":
                pull = PullRequestEvent.model_validate(payload)
                await self._remember(pull)
                return await plan_pull_request_event(pull, self.github)
            if event == "issue_comment":
                return await self._plan_rerun(IssueCommentEvent.model_validate(payload))
        except ValidationError as exc:
            # Checked at the door already; a stored row of another version may still differ.
            raise Ignored(f"payload not understood: {exc.errors()[0]['msg']}") from exc
        raise Ignored(f"event {event!r} is not handled")

    async def _remember(self, pull: PullRequestEvent) -> None:
        """Keep the pull request's head and author, for its comment."""
        pr = pull.pull_request
        await self._keep_head(pull.repository.full_name, pull.number, pr.head.sha,
                              pull.head_repo, pr.base.sha, pr.base.ref, pr.user.login,
                              pr.updated)

    async def _keep_head(
        self, repo: str, number: int, head_sha: str, head_repo: str | None, base_sha: str,
        base_ref: str, author: str | None, at: datetime | None,
    ) -> None:
        # Ordered by GitHub's own time of the change (the pull request's updated_at), not by
        # when a delivery reached us: GitHub does not promise order, a delivery GitHub failed
        # to hand over may be sent again by hand later, and ours retries after a failure. An
        # older head must not be put back over a newer one. Without a time (None), it is kept.
        await self.pool.execute(
            """
            INSERT INTO pull_requests (repo, number, head_sha, head_repo, base_sha, base_ref,
                                       author, updated_at, head_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8)
            ON CONFLICT (repo, number) DO UPDATE SET head_sha = $3, head_repo = $4,
                   base_sha = $5, base_ref = $6, author = $7, updated_at = now(),
                   head_at = coalesce($8, pull_requests.head_at)
            WHERE $8::timestamptz IS NULL OR pull_requests.head_at IS NULL
               OR pull_requests.head_at <= $8
            """,
            repo, number, head_sha, head_repo, base_sha, base_ref, author, at,
        )

    async def _plan_rerun(self, comment: IssueCommentEvent) -> Plan:
        """A re-run of the pull request's current head, asked of GitHub (``GET pulls/{n}``):
        the head we last heard of may be older, and a pull request whose own deliveries never
        reached us (GitHub does not send a failed delivery again) can be checked this way.

        At most one a minute: checked here, and marked only in the transaction that makes its
        job (:func:`_mark_rerun`), so a re-run whose reading of GitHub failed and is tried
        again is not refused as its own repeat."""
        repo, number = comment.repository.full_name, comment.issue.number
        recent = await self.pool.fetchval(
            """
            SELECT last_rerun_at >= now() - $3::interval
            FROM pull_requests WHERE repo = $1 AND number = $2
            """,
            repo, number, RERUN_INTERVAL,
        )
        if recent:
            raise Ignored(_too_soon(repo, number))
        pull = await self.github.pull_request(repo, number)
        if not pull.open:
            raise Ignored(f"re-run of {repo}#{number}: the pull request is closed")
        await self._keep_head(repo, number, pull.head_sha, pull.head_repo, pull.base_sha,
                              pull.base_ref, pull.author, pull.updated_at)
        log.info("rerun.asked", repo=repo, pr=number, by=comment.comment.user.login,
                 head=pull.head_sha)
        return await plan_pull_request(
            self.github, repo=repo, number=number, head_repo=pull.head_repo or repo,
            head_sha=pull.head_sha, base_sha=pull.base_sha, ref=None,
            event=RERUN, reuse=False,
        )

    async def _failed(
        self, row: asyncpg.Record, exc: BaseException, *, permanent: bool, bound: Any
    ) -> None:
        attempts = int(row["attempts"])
        if not permanent and attempts < MAX_ATTEMPTS:
            delay = min(timedelta(seconds=5 * 2 ** (attempts - 1)), timedelta(minutes=10))
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:
                delay = max(delay, timedelta(seconds=float(retry_after)))
            await self.pool.execute(
                """
                UPDATE deliveries SET claimed_until = NULL, next_try_at = now() + $2::interval,
                       last_error = $3
                WHERE id = $1 AND processed_at IS NULL
                """,
                row["id"], delay, str(exc)[:1000],
            )
            bound.warning("delivery.retry", attempts=attempts, retry_in_s=delay.total_seconds(),
                          error=str(exc))
            return
        bound.error("delivery.gave_up", attempts=attempts, error=str(exc))
        # The status says first and briefly what went wrong; the delivery keeps the details.
        said = exc.reason if isinstance(exc, GitHubError) else str(exc)
        await self._finish(row, "error", None, str(exc), error_status=True, said=said)

    async def _finish(
        self, row: asyncpg.Record, outcome: str, job_id: int | None, reason: str, *,
        error_status: bool = False, said: str | None = None,
    ) -> None:
        target = await self._status_target(row) if error_status else None
        async with self.pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchval(
                """
                UPDATE deliveries SET processed_at = now(), outcome = $2, job_id = $3,
                       claimed_until = NULL, last_error = $4
                WHERE id = $1 AND processed_at IS NULL RETURNING id
                """,
                row["id"], outcome, job_id, reason[:1000],
            )
            queued = bool(updated and error_status and target is not None)
            if queued and target is not None:
                repo, sha = target
                await queue_status(
                    conn, job_id=None, repo=repo, sha=sha, state="error",
                    description=f"Could not check this commit: {said or reason}",
                    target_url=delivery_url(self.settings.public_base_url, row["delivery_id"]),
                    context=self.settings.status_context,
                )
        if queued:
            await send_statuses(self.pool, self.github,
                                public_base_url=self.settings.public_base_url)


    async def _status_target(self, row: asyncpg.Record) -> tuple[str, str] | None:
        """The repository and commit a delivery's statuses go to: named in a push or a pull
        request; for a re-run asked in a comment, the pull request's head we know."""
        payload = _payload_of(row)
        target = _commit_of(row["event"], payload)
        if target is not None or row["event"] != "issue_comment":
            return target
        with contextlib.suppress(ValidationError):
            comment = IssueCommentEvent.model_validate(payload)
            repo = comment.repository.full_name
            head = await self.pool.fetchval(
                "SELECT head_sha FROM pull_requests WHERE repo = $1 AND number = $2",
                repo, comment.issue.number)
            if isinstance(head, str) and is_sha(head):
                return repo, head
        return None


async def _mark_rerun(conn: asyncpg.Connection, plan: Plan) -> bool:
    """Mark the pull request's re-run as made now; False when another was made less than a
    minute ago (the check and the mark are one statement)."""
    marked = await conn.fetchval(
        """
        UPDATE pull_requests SET last_rerun_at = now()
        WHERE repo = $1 AND number = $2
          AND (last_rerun_at IS NULL OR last_rerun_at < now() - $3::interval)
        RETURNING 1
        """,
        plan.repo, plan.pr_number, RERUN_INTERVAL,
    )
    return marked is not None


def _too_soon(repo: str, number: int | None) -> str:
    return f"re-run of {repo}#{number}: one was asked for less than a minute ago"


def delivery_url(public_base_url: str, delivery_id: str) -> str:
    """What became of a delivery, as JSON (the target of an ``error`` status)."""
    return f"{public_base_url.rstrip('/')}/api/deliveries/{delivery_id}"


def _payload_of(row: asyncpg.Record) -> Any:
    """A stored delivery's payload; text when stored by a process without the JSON codec."""
    payload = row["payload"]
    return json.loads(payload) if isinstance(payload, str) else payload


def _commit_of(event: str, payload: Any) -> tuple[str, str] | None:
    """The repository and commit a delivery names, if any."""
    if not isinstance(payload, dict):
        return None
    repo = (payload.get("repository") or {}).get("full_name")
    sha: Any = None
    if event == "push":
        sha = payload.get("after")
    elif event == "pull_request":
        sha = ((payload.get("pull_request") or {}).get("head") or {}).get("sha")
    if isinstance(repo, str) and isinstance(sha, str) and is_sha(sha):
        return repo, sha
    return None
