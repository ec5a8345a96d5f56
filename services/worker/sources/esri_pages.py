"""A layer's pages fetched a few at a time and written in page order.

A plan (:mod:`services.worker.sources.esri_plans`) cuts the layer into pages: offsets, object
id chunks or ``OBJECTID`` ranges. The pager keeps up to ``window`` pages between "asked for"
and "written" (the window is the host limit, so it never waits on its own requests), and
writes each page once every page before it is written: the file, and so its fingerprint, is
byte for byte what one page after another gives. Memory holds at most ``window`` pages, each
turned into GeoJSON lines as soon as it arrives (far smaller than the parsed answer).

A page that fails in a way a smaller page might not (a 500 or a timeout, twice at that size)
is split in two, and every later page is planned at the smaller size: it is kept for the
rest of the dump. A page whose tries are used up is tried again on its own after a pause, the
other pages waiting in the window; only when it fails that too does the run fail, naming it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

import structlog

from services.worker.errors import RunError
from services.worker.sources.esri_client import JSON, suggests_smaller_page
from services.worker.sources.esri_geojson import encode_lines
from services.worker.sources.http import Retry, RetryableError

log = structlog.get_logger(__name__)

#: How many times a page gets its tries (``Retry.tries`` each) before the run fails.
PAGE_ROUNDS = 2


class Page(Protocol):
    """A part of the layer one query (or a few, when the server answers short) brings."""

    @property
    def size(self) -> int:
        """The features it is expected to hold."""
        ...

    def describe(self) -> str:
        """What the page is, for a person (``offset 4000, 2000 features``)."""
        ...

    def split(self, size: int) -> Sequence[Self]:
        """The page as pages of at most ``size`` features, in order (itself if it cannot)."""
        ...


P = TypeVar("P", bound=Page)


@dataclass(frozen=True)
class Answer:
    """What a plan got for a page: features in order, and whether the server has more."""

    features: list[JSON]
    more: bool = False


@dataclass(frozen=True)
class Fetched:
    """A page ready to write."""

    lines: bytes
    count: int
    #: The first feature as the server sent it (to catch a server ignoring the offset).
    first: JSON | None
    more: bool


class TooManyFeatures(Exception):
    """The page matched more features than the server returns at once: ask in parts."""


class Plan(Protocol, Generic[P]):
    """A way of cutting a layer into pages."""

    def next_page(self, size: int) -> P | None:
        """The next page at ``size``, or None when there is none to ask for now."""
        ...

    async def fetch(self, page: P, pager: Pager) -> Answer:
        """One go at the page (raises ``RetryableError``, ``TooManyFeatures``, ``RunError``)."""
        ...

    def finished(self, page: P, got: Fetched) -> bool:
        """Called in page order once the page is written: is the layer done?"""
        ...


class PageFailed(Exception):
    def __init__(self, page: Page, cause: RetryableError) -> None:
        super().__init__(f"{page.describe()}: {cause}")
        self.page = page
        self.cause = cause


class Pager:
    """Runs plans for one dump; its page size only ever shrinks."""

    def __init__(
        self,
        writer: Any,
        *,
        size: int,
        window: int,
        retry: Retry,
        shown: str,
        rounds: int = PAGE_ROUNDS,
    ) -> None:
        self.writer = writer
        self.size = size
        self.window = window
        self.retry = retry
        self.shown = shown
        self.rounds = rounds

    def shrink(self, size: int, why: str) -> None:
        """Ask for pages of at most ``size`` from now on."""
        if 0 < size < self.size:
            log.info("esri.page_size", url=self.shown, size=size, was=self.size, why=why)
            self.size = size

    async def run(self, plan: Plan[P]) -> None:
        inflight: deque[tuple[P, asyncio.Task[Fetched]]] = deque()
        try:
            while True:
                while len(inflight) < self.window:
                    page = plan.next_page(self.size)
                    if page is None:
                        break
                    inflight.append((page, asyncio.create_task(self._page(plan, page))))
                if not inflight:
                    return
                page, task = inflight.popleft()
                got = await task
                self.writer.write_lines(got.lines, got.count)
                if plan.finished(page, got):
                    return
        finally:
            for _, task in inflight:
                task.cancel()
            await asyncio.gather(*(task for _, task in inflight), return_exceptions=True)

    async def _page(self, plan: Plan[P], page: P) -> Fetched:
        for round_ in range(1, self.rounds + 1):
            try:
                answer = await self._fetch(plan, page)
                break
            except PageFailed as exc:
                if round_ == self.rounds:
                    raise RunError(
                        f"download failed, {self.shown}: the page of {exc.page.describe()} "
                        f"still fails after {self.rounds} rounds of {self.retry.tries} tries: "
                        f"{exc.cause}",
                        "download_failed",
                        transient=True,
                    ) from exc
                pause_s = self.retry.backoff_max_s
                log.warning(
                    "esri.page_failed",
                    url=self.shown,
                    page=exc.page.describe(),
                    error=str(exc.cause),
                    again_in_s=pause_s,
                )
                await asyncio.sleep(pause_s)
        features = answer.features
        return Fetched(
            encode_lines(features), len(features), features[0] if features else None, answer.more
        )

    async def _fetch(self, plan: Plan[P], page: P) -> Answer:
        failures = 0
        while True:
            if page.size > self.size:
                # Planned before the size came down: ask in parts rather than fail again.
                parts = page.split(self.size)
                if len(parts) > 1:
                    return await self._parts(plan, parts)
            try:
                return await plan.fetch(page, self)
            except TooManyFeatures:
                parts = page.split(max(1, page.size // 2))
                if len(parts) > 1:
                    self.shrink(max(1, page.size // 2), "more features than one answer holds")
                    return await self._parts(plan, parts)
                raise RunError(
                    f"download failed, {self.shown}: {page.describe()} holds more features "
                    "than the server returns at once and cannot be split",
                    "download_failed",
                ) from None
            except RetryableError as exc:
                failures += 1
                # Twice at one size is not bad luck; halving costs little either way.
                if failures >= 2 and suggests_smaller_page(exc):
                    parts = page.split(max(1, page.size // 2))
                    if len(parts) > 1:
                        self.shrink(max(1, page.size // 2), str(exc))
                        return await self._parts(plan, parts)
                if failures >= self.retry.tries:
                    raise PageFailed(page, exc) from exc
                delay_s = self.retry.wait_s(failures, exc.retry_after_s)
                log.warning(
                    "download.retry",
                    what=self.shown,
                    page=page.describe(),
                    error=str(exc),
                    failures=failures,
                    delay_s=delay_s,
                )
                await asyncio.sleep(delay_s)

    async def _parts(self, plan: Plan[P], parts: Sequence[P]) -> Answer:
        # Together no larger than the page they replace, so the memory bound holds; the host
        # slots keep the requests within the limit.
        tasks = [asyncio.ensure_future(self._fetch(plan, part)) for part in parts]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return Answer(
            [feature for answer in answers for feature in answer.features], answers[-1].more
        )
