"""Streamed http(s) download: timeouts, retries with backoff, source headers, conditional GET.

The body goes to disk chunk by chunk and is hashed on the way, so memory stays flat whatever
the file size. Redirects are followed here rather than by aiohttp so every hop is checked
against the URL policy (aiohttp connects to a literal address without asking the resolver).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from services.worker.errors import RunError
from services.worker.sources.guard import (
    UrlPolicy,
    check_url,
    connector_kwargs,
    redact,
)

if TYPE_CHECKING:
    import aiohttp

# aiohttp (and yarl) are imported inside the functions that use them: importing aiohttp costs
# ~0.12 s, and every run's child imports this module (through sources.fetch, for Timeouts and
# Retry) even when its data is a local file or an FTP URL.

log = structlog.get_logger(__name__)
T = TypeVar("T")

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Statuses worth asking again: the server is overloaded or briefly broken.
RETRY_STATUSES = frozenset({408, 425, 429})


def _version() -> str:
    try:
        return importlib.metadata.version("oa-machine")
    except importlib.metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"oa-machine/{_version()} (+https://github.com/openaddresses/openaddresses)"


@dataclass(frozen=True)
class Timeouts:
    """Network time limits; the run as a whole is bounded by the child's wall clock."""

    connect_s: float = 30.0
    #: Longest silence while reading a response before the attempt is abandoned.
    sock_read_s: float = 120.0
    #: Per attempt; None leaves it to the run's wall-clock limit.
    total_s: float | None = None

    def client_timeout(self) -> aiohttp.ClientTimeout:
        import aiohttp  # deferred, see the top of the module

        return aiohttp.ClientTimeout(
            total=self.total_s, sock_connect=self.connect_s, sock_read=self.sock_read_s
        )


@dataclass(frozen=True)
class Retry:
    """How often to try a request and how long to wait between tries (doubling each time)."""

    tries: int = 3
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def delay_s(self, failed_tries: int) -> float:
        return float(min(self.backoff_s * 2 ** (failed_tries - 1), self.backoff_max_s))


# Frozen, so one shared default instance is safe.
DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_RETRY = Retry()


@dataclass(frozen=True)
class HttpResult:
    """What one successful (or not-modified) download left on disk."""

    path: Path
    fingerprint: str
    size_bytes: int
    etag: str | None
    last_modified: str | None
    not_modified: bool
    content_type: str | None


class RetryableError(Exception):
    """One attempt failed in a way another attempt may not."""


def make_session(policy: UrlPolicy, timeouts: Timeouts) -> aiohttp.ClientSession:
    """A client session whose connector refuses addresses the policy forbids."""
    import aiohttp  # deferred, see the top of the module

    connector = aiohttp.TCPConnector(**connector_kwargs(policy))
    # trust_env stays off: a proxy from the environment would connect on our behalf and
    # bypass the address check.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeouts.client_timeout(),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )


def _next_hop(response: aiohttp.ClientResponse, url: str) -> str | None:
    from yarl import URL  # deferred with aiohttp, see the top of the module

    location = response.headers.get("Location")
    if response.status not in REDIRECT_STATUSES or not location:
        return None
    target = URL(url).join(URL(location))
    if target.scheme not in ("http", "https"):
        # Not even file:// with allow_files: a server must not choose what we read locally.
        raise RunError(
            f"{redact(url)} redirected to a {target.scheme or 'local'} URL", "download_failed"
        )
    return str(target)


@asynccontextmanager
async def open_response(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    policy: UrlPolicy,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """Send a request, following redirects with a policy check at each hop.

    Network failures come out as ``RetryableError``; the caller decides about statuses.
    """
    import aiohttp  # deferred, see the top of the module

    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, policy)
        try:
            response = await session.request(
                method, url, headers=dict(headers or {}), data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"{redact(url)}: {_describe(exc)}") from exc
        target = _next_hop(response, url)
        if target is None:
            try:
                yield response
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RetryableError(f"{redact(url)}: {_describe(exc)}") from exc
            finally:
                response.release()
            return
        response.release()
        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
            method, data = "GET", None
        url = target
    raise RunError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects", "download_failed")


def _describe(exc: BaseException) -> str:
    import aiohttp  # deferred, see the top of the module

    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return f"timed out ({exc or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def status_error(url: str, response: aiohttp.ClientResponse) -> Exception:
    """The error for a non-success status: retryable for 5xx and throttling, final otherwise."""
    message = f"{redact(url)}: HTTP {response.status} {response.reason or ''}".rstrip()
    if response.status >= 500 or response.status in RETRY_STATUSES:
        return RetryableError(message)
    return RunError(f"download failed, {message}", "download_failed")


async def with_retries(attempt: Callable[[], Awaitable[T]], retry: Retry, what: str) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or ``retry.tries`` are used up."""
    failures = 0
    while True:
        try:
            return await attempt()
        except RetryableError as exc:
            failures += 1
            if failures >= retry.tries:
                raise RunError(
                    f"download failed after {failures} tries, {exc}", "download_failed"
                ) from exc
            delay_s = retry.delay_s(failures)
            log.warning(
                "download.retry", what=what, error=str(exc), failures=failures, delay_s=delay_s
            )
            await asyncio.sleep(delay_s)


async def _stream_to(
    response: aiohttp.ClientResponse, dest: Path, progress: Callable[[int], None] | None
) -> tuple[str, int]:
    md5 = hashlib.md5(usedforsecurity=False)
    size_bytes = 0
    # Blocking writes of a quarter megabyte are short; a thread per chunk would cost more.
    with dest.open("wb") as out:
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            out.write(chunk)
            md5.update(chunk)
            size_bytes += len(chunk)
            if progress is not None:
                progress(size_bytes)
    return md5.hexdigest(), size_bytes


async def download_async(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
) -> HttpResult:
    """Download ``url`` to ``dest``; see ``download`` for the contract."""
    request_headers = dict(headers or {})
    if if_none_match:
        request_headers["If-None-Match"] = if_none_match
    if if_modified_since:
        request_headers["If-Modified-Since"] = if_modified_since
    conditional = bool(if_none_match or if_modified_since)

    async with make_session(policy, timeouts) as session:

        async def attempt() -> HttpResult:
            async with open_response(
                session, method, url, policy=policy, headers=request_headers
            ) as response:
                etag = response.headers.get("ETag")
                last_modified = response.headers.get("Last-Modified")
                if response.status == 304 and conditional:
                    return HttpResult(
                        dest,
                        "",
                        0,
                        etag or if_none_match,
                        last_modified or if_modified_since,
                        True,
                        None,
                    )
                if not 200 <= response.status < 300:
                    raise status_error(url, response)
                fingerprint, size_bytes = await _stream_to(response, dest, progress)
                return HttpResult(
                    dest,
                    fingerprint,
                    size_bytes,
                    etag,
                    last_modified,
                    False,
                    response.headers.get("Content-Type"),
                )

        return await with_retries(attempt, retry, redact(url))


def download(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
) -> HttpResult:
    """Download ``url`` to ``dest`` (blocking; runs its own event loop).

    5xx, throttling statuses, connection errors and timeouts are retried with exponential
    backoff; other 4xx fail at once. With ``if_none_match``/``if_modified_since`` a 304 answer
    gives ``not_modified=True`` and leaves ``dest`` untouched. Raises ``RunError`` with
    ``download_failed`` saying the URL and the status or error.
    """
    return asyncio.run(
        download_async(
            url,
            dest,
            policy=policy,
            method=method,
            headers=headers,
            if_none_match=if_none_match,
            if_modified_since=if_modified_since,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
        )
    )
