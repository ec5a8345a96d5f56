"""Streamed http(s) download: timeouts, retries with backoff, source headers, conditional GET.

The body goes to disk chunk by chunk and is hashed on the way, so memory stays flat whatever
the file size. Redirects are followed here rather than by aiohttp so every hop is checked
against the URL policy (aiohttp connects to a literal address without asking the resolver).

``Content-Encoding`` is undone here too, not by aiohttp: aiohttp inflates without any limit
(a 4 MB gzip body became a 4 GiB file). We ask for ``gzip, deflate`` only, and count the bytes
on the wire against ``max_download_bytes`` and the inflated bytes against
``max_unpacked_bytes``, failing the run as soon as either is passed.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import importlib.metadata
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
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
#: Statuses that ask every request to the host to wait, not just the one that got it.
THROTTLE_STATUSES = frozenset({429, 503})
#: The only content codings we ask for, and so the only ones we accept.
ACCEPT_ENCODING = "gzip, deflate"
_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
#: Most bytes one call to the inflater may produce: a 256 KiB chunk of a bomb inflates to
#: ~256 MiB in one go otherwise, before any limit could be checked.
INFLATE_STEP_BYTES = 1024 * 1024


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
    #: Longest ``Retry-After`` we wait out; a server asking for more gets this, then the
    #: retry (a run that still fails is run again later as a whole, see RUN_RETRY_DELAY_S).
    retry_after_max_s: float = 300.0

    def delay_s(self, failed_tries: int) -> float:
        return float(min(self.backoff_s * 2 ** (failed_tries - 1), self.backoff_max_s))

    def wait_s(self, failed_tries: int, retry_after_s: float | None = None) -> float:
        """The pause before the next try: our backoff, or longer when the server asked."""
        asked = min(retry_after_s or 0.0, self.retry_after_max_s)
        return max(self.delay_s(failed_tries), asked)


@dataclass(frozen=True)
class SizeLimits:
    """How large a download may get (settings MAX_DOWNLOAD_BYTES and MAX_UNPACKED_BYTES)."""

    #: Bytes received on the wire (FTP: the file; ESRI: each page and the whole dump).
    max_download_bytes: int = 10 * 1024**3
    #: Bytes a ``Content-Encoding: gzip/deflate`` body may inflate to.
    max_unpacked_bytes: int = 20 * 1024**3


# Frozen, so one shared default instance is safe.
DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_RETRY = Retry()
DEFAULT_LIMITS = SizeLimits()


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
    """One attempt failed in a way another attempt may not.

    ``status`` is the HTTP status (None for a network error or a bad body), ``retry_after_s``
    what the server's ``Retry-After`` asked, ``timed_out`` whether the attempt ran out of time.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.timed_out = timed_out

    @property
    def throttled(self) -> bool:
        """The server says it is overloaded or we ask too often: slow down, all of us."""
        return self.status in THROTTLE_STATUSES


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks us to wait (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def make_session(
    policy: UrlPolicy, timeouts: Timeouts, user_agent: str | None = None
) -> aiohttp.ClientSession:
    """A client session whose connector refuses addresses the policy forbids.

    ``user_agent`` is the USER_AGENT setting; None sends ours (``USER_AGENT``).
    """
    import aiohttp  # deferred, see the top of the module

    connector = aiohttp.TCPConnector(**connector_kwargs(policy))
    # trust_env stays off: a proxy from the environment would connect on our behalf and
    # bypass the address check. auto_decompress stays off: see the top of the module. Without
    # our own Accept-Encoding aiohttp would offer br and zstd when their libraries are there.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeouts.client_timeout(),
        headers={"User-Agent": user_agent or USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
        trust_env=False,
        auto_decompress=False,
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
            raise _network_error(url, exc) from exc
        target = _next_hop(response, url)
        if target is None:
            try:
                yield response
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _network_error(url, exc) from exc
            finally:
                response.release()
            return
        response.release()
        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
            method, data = "GET", None
        url = target
    raise RunError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects", "download_failed")


def _timed_out(exc: BaseException) -> bool:
    import aiohttp  # deferred, see the top of the module

    return isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError)


def _network_error(url: str, exc: BaseException) -> RetryableError:
    if _timed_out(exc):
        return RetryableError(
            f"{redact(url)}: timed out ({exc or type(exc).__name__})", timed_out=True
        )
    return RetryableError(f"{redact(url)}: {type(exc).__name__}: {exc}")


def status_error(url: str, response: aiohttp.ClientResponse) -> Exception:
    """The error for a non-success status: retryable for 5xx and throttling, final otherwise."""
    message = f"{redact(url)}: HTTP {response.status} {response.reason or ''}".rstrip()
    if response.status >= 500 or response.status in RETRY_STATUSES:
        return RetryableError(
            message,
            status=response.status,
            retry_after_s=retry_after_s(response.headers.get("Retry-After")),
        )
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
                    f"download failed after {failures} tries, {exc}",
                    "download_failed",
                    transient=True,
                ) from exc
            delay_s = retry.wait_s(failures, exc.retry_after_s)
            log.warning(
                "download.retry", what=what, error=str(exc), failures=failures, delay_s=delay_s
            )
            await asyncio.sleep(delay_s)


class BodyDecoder:
    """Undoes a response's ``Content-Encoding`` chunk by chunk, within the size limits.

    ``feed`` takes the bytes as they arrive on the wire and yields the decoded ones; ``finish``
    yields what the inflater still held. The fingerprint of a download is the md5 of the
    decoded bytes, exactly as it was when aiohttp decoded them: a deflate body is zlib-wrapped
    or raw (many servers send raw), told apart by its first byte as aiohttp did.
    """

    def __init__(self, url: str, content_encoding: str | None, limits: SizeLimits) -> None:
        self.shown = redact(url)
        self.limits = limits
        self.coding = _coding(self.shown, content_encoding)
        self.wire_bytes = 0
        self.decoded_bytes = 0
        self._inflater: zlib._Decompress | None = None
        self._trailing_warned = False

    def check_length(self, content_length: int | None) -> None:
        """Fail before reading a body whose announced length is over the download limit."""
        if content_length is not None and content_length > self.limits.max_download_bytes:
            raise self._too_large(f"announces {content_length} bytes, over")

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if not chunk:
            return
        self.wire_bytes += len(chunk)
        if self.wire_bytes > self.limits.max_download_bytes:
            raise self._too_large("is larger than")
        if self.coding is None:
            self.decoded_bytes += len(chunk)
            yield chunk
            return
        inflater = self._inflater
        if inflater is None:
            inflater = self._inflater = zlib.decompressobj(_wbits(self.coding, chunk))
        pending = chunk
        while True:
            if inflater.eof:
                self._ignore_trailing(pending or inflater.unused_data)
                return
            try:
                out = inflater.decompress(pending, INFLATE_STEP_BYTES)
            except zlib.error as exc:
                raise self._corrupt(exc) from exc
            yield self._counted(out)
            pending = inflater.unconsumed_tail
            # A full step may leave output inside the inflater even when the input is used up.
            if not pending and len(out) < INFLATE_STEP_BYTES:
                return

    def finish(self) -> Iterator[bytes]:
        inflater = self._inflater
        if inflater is None:
            return
        try:
            rest = inflater.flush()
        except zlib.error as exc:
            raise self._corrupt(exc) from exc
        if rest:
            yield self._counted(rest)
        if not inflater.eof:
            # The HTTP body was complete (aiohttp checks its length), the stream inside not:
            # what a connection cut inside a proxy looks like, so worth another try.
            raise RetryableError(f"{self.shown}: the {self.coding}-encoded body is truncated")
        self._ignore_trailing(inflater.unused_data)

    def _counted(self, out: bytes) -> bytes:
        self.decoded_bytes += len(out)
        if self.decoded_bytes > self.limits.max_unpacked_bytes:
            raise RunError(
                f"download failed, {self.shown}: the {self.coding}-encoded body inflates past "
                f"the limit of {self.limits.max_unpacked_bytes} bytes (MAX_UNPACKED_BYTES)",
                "download_failed",
                over_limit=True,
            )
        return out

    def _corrupt(self, exc: zlib.error) -> RunError:
        # Not retried: the HTTP body arrived whole, so the server sends broken data.
        return RunError(
            f"download failed, {self.shown}: the {self.coding}-encoded body is corrupt ({exc})",
            "download_failed",
        )

    def _too_large(self, what: str) -> RunError:
        return RunError(
            f"download failed, {self.shown}: the body {what} the limit of "
            f"{self.limits.max_download_bytes} bytes (MAX_DOWNLOAD_BYTES)",
            "download_failed",
            over_limit=True,
        )

    def _ignore_trailing(self, data: bytes) -> None:
        # As aiohttp did: only the first gzip member or deflate stream is the body.
        if data and not self._trailing_warned:
            self._trailing_warned = True
            log.warning("download.trailing_data_ignored", url=self.shown, coding=self.coding)


def _coding(shown: str, content_encoding: str | None) -> str | None:
    """``gzip``, ``deflate`` or None (identity) from a Content-Encoding header."""
    codings = [
        part.strip().lower()
        for part in (content_encoding or "").split(",")
        if part.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _CODINGS:
        return _CODINGS[codings[0]]
    raise RunError(
        f"download failed, {shown}: the server sent Content-Encoding {content_encoding!r}, "
        f"which we did not ask for (only {ACCEPT_ENCODING}) and cannot decode",
        "download_failed",
    )


def _wbits(coding: str, first_chunk: bytes) -> int:
    if coding == "gzip":
        return 16 + zlib.MAX_WBITS
    # RFC 1950: the low four bits of a zlib header's first byte are 8 (deflate); a raw deflate
    # stream is what many servers send as "deflate".
    return zlib.MAX_WBITS if first_chunk[0] & 0x0F == 8 else -zlib.MAX_WBITS


async def decoded_body(
    response: aiohttp.ClientResponse, url: str, limits: SizeLimits
) -> AsyncIterator[bytes]:
    """The response's body with its Content-Encoding undone, within ``limits``.

    Raises ``RunError`` (``download_failed``) for a body over a limit (``over_limit``), an
    encoding we cannot decode, or a corrupt encoded body.
    """
    decoder = BodyDecoder(url, response.headers.get("Content-Encoding"), limits)
    decoder.check_length(response.content_length)
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        for piece in decoder.feed(chunk):
            if piece:
                yield piece
    for piece in decoder.finish():
        yield piece


async def read_body(response: aiohttp.ClientResponse, url: str, limits: SizeLimits) -> bytes:
    """The whole decoded body in memory (for JSON answers), within ``limits``."""
    return b"".join([piece async for piece in decoded_body(response, url, limits)])


async def _stream_to(
    response: aiohttp.ClientResponse,
    url: str,
    dest: Path,
    limits: SizeLimits,
    progress: Callable[[int], None] | None,
) -> tuple[str, int]:
    md5 = hashlib.md5(usedforsecurity=False)
    size_bytes = 0
    # Blocking writes of a quarter megabyte are short; a thread per chunk would cost more.
    with dest.open("wb") as out:
        async for chunk in decoded_body(response, url, limits):
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
    limits: SizeLimits = DEFAULT_LIMITS,
    user_agent: str | None = None,
) -> HttpResult:
    """Download ``url`` to ``dest``; see ``download`` for the contract."""
    request_headers = dict(headers or {})
    if if_none_match:
        request_headers["If-None-Match"] = if_none_match
    if if_modified_since:
        request_headers["If-Modified-Since"] = if_modified_since
    conditional = bool(if_none_match or if_modified_since)

    async with make_session(policy, timeouts, user_agent) as session:

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
                fingerprint, size_bytes = await _stream_to(response, url, dest, limits, progress)
                return HttpResult(
                    dest,
                    fingerprint,
                    size_bytes,
                    etag,
                    last_modified,
                    False,
                    response.headers.get("Content-Type"),
                )

        try:
            return await with_retries(attempt, retry, redact(url))
        except RunError:
            # A half-written body must not be mistaken for a download later.
            dest.unlink(missing_ok=True)
            raise


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
    limits: SizeLimits = DEFAULT_LIMITS,
    user_agent: str | None = None,
) -> HttpResult:
    """Download ``url`` to ``dest`` (blocking; runs its own event loop).

    5xx, throttling statuses, connection errors and timeouts are retried with exponential
    backoff (``RunError.transient`` once the tries are used up); other 4xx fail at once. With
    ``if_none_match``/``if_modified_since`` a 304 answer gives ``not_modified=True`` and leaves
    ``dest`` untouched. A gzip or deflate ``Content-Encoding`` is undone; a body past
    ``limits`` fails at once (``RunError.over_limit``) and ``dest`` is removed. A
    ``Retry-After`` on a 429 or 5xx is waited out (up to ``retry.retry_after_max_s``).
    ``user_agent`` None sends ours. Raises ``RunError`` with ``download_failed`` saying the URL
    and the status, error or limit.
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
            limits=limits,
            user_agent=user_agent,
        )
    )
