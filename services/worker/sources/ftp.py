"""FTP download with stdlib ftplib: anonymous or user:password from the URL, with a timeout.

The host name is resolved and checked at each try, and the connection goes to the checked
address, so the name cannot resolve differently in between. Passive data connections go to the
control connection's address (ftplib ignores the address in the PASV answer), so a server
cannot point the data connection at another machine either.
"""

from __future__ import annotations

import ftplib
import hashlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import structlog

from services.worker.errors import RunError
from services.worker.sources.guard import UrlPolicy, check_url, redact, resolve_checked
from services.worker.sources.http import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUTS,
    Retry,
    SizeLimits,
    Timeouts,
)

log = structlog.get_logger(__name__)

DEFAULT_PORT = 21
BLOCK_BYTES = 256 * 1024


@dataclass(frozen=True)
class FtpResult:
    path: Path
    fingerprint: str
    size_bytes: int


@dataclass(frozen=True)
class FtpTarget:
    host: str
    port: int
    user: str
    password: str
    path: str

    @classmethod
    def parse(cls, url: str) -> FtpTarget:
        parts = urlsplit(url)
        if parts.scheme.lower() != "ftp" or not parts.hostname:
            raise RunError(f"not an ftp URL: {redact(url)!r}", "download_failed")
        path = unquote(parts.path)
        if not path or path.endswith("/"):
            raise RunError(f"ftp URL {redact(url)!r} names no file", "download_failed")
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            user=unquote(parts.username) if parts.username else "anonymous",
            # The customary anonymous password is an e-mail-like string.
            password=unquote(parts.password) if parts.password else "anonymous@",
            path=path,
        )


def _address(target: FtpTarget, policy: UrlPolicy) -> str:
    try:
        return resolve_checked(target.host, target.port, policy)[0]
    except RunError as exc:
        cause = exc.__cause__
        if isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_AGAIN:
            # "Temporary failure in name resolution": the retry loop's business.
            raise socket.gaierror(
                cause.errno, f"cannot resolve {target.host}: {cause.strerror}"
            ) from cause
        raise


def _retrieve_once(
    target: FtpTarget,
    address: str,
    dest: Path,
    timeout_s: float,
    progress: Callable[[int], None] | None,
    max_bytes: int,
    shown: str,
) -> FtpResult:
    md5 = hashlib.md5(usedforsecurity=False)
    size_bytes = 0
    with ftplib.FTP(timeout=timeout_s) as ftp, dest.open("wb") as out:
        ftp.connect(address, target.port)
        ftp.login(target.user, target.password)

        def write(block: bytes) -> None:
            nonlocal size_bytes
            size_bytes += len(block)
            if size_bytes > max_bytes:
                raise RunError(
                    f"download failed, {shown}: the file is larger than the limit of "
                    f"{max_bytes} bytes (MAX_DOWNLOAD_BYTES)",
                    "download_failed",
                    over_limit=True,
                )
            out.write(block)
            md5.update(block)
            if progress is not None:
                progress(size_bytes)

        try:
            ftp.retrbinary(f"RETR {target.path}", write, blocksize=BLOCK_BYTES)
        except RunError:
            # Closed without QUIT: the server's answer to the cut transfer is still queued,
            # and reading it as QUIT's answer could raise over our error.
            ftp.close()
            raise
    return FtpResult(dest, md5.hexdigest(), size_bytes)


def download(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
    limits: SizeLimits = DEFAULT_LIMITS,
) -> FtpResult:
    """Download an ``ftp://`` URL to ``dest``.

    Permanent FTP errors (5xx: no such file, login refused) fail at once; temporary ones and
    network errors are retried with backoff (``RunError.transient`` once the tries are used
    up). A file past ``limits.max_download_bytes`` fails at once (``RunError.over_limit``).
    Raises ``RunError`` with ``download_failed``; ``dest`` is removed then.
    """
    try:
        return _download(url, dest, policy, progress, timeouts, retry, limits)
    except RunError:
        # Half a file must not be mistaken for a download later.
        dest.unlink(missing_ok=True)
        raise


def _download(
    url: str,
    dest: Path,
    policy: UrlPolicy,
    progress: Callable[[int], None] | None,
    timeouts: Timeouts,
    retry: Retry,
    limits: SizeLimits,
) -> FtpResult:
    check_url(url, policy)
    target = FtpTarget.parse(url)
    shown = redact(url)
    # ftplib has one timeout for connect and for each read; the idle one is the larger.
    timeout_s = max(timeouts.connect_s, timeouts.sock_read_s)
    failures = 0
    while True:
        try:
            address = _address(target, policy)
            return _retrieve_once(
                target, address, dest, timeout_s, progress, limits.max_download_bytes, shown
            )
        except ftplib.error_perm as exc:
            raise RunError(f"download failed, {shown}: FTP {exc}", "download_failed") from exc
        except (ftplib.Error, OSError, EOFError) as exc:
            failures += 1
            if failures >= retry.tries:
                raise RunError(
                    f"download failed after {failures} tries, {shown}: {type(exc).__name__} {exc}",
                    "download_failed",
                    transient=True,
                ) from exc
            delay_s = retry.delay_s(failures)
            log.warning(
                "download.retry", what=shown, error=str(exc), failures=failures, delay_s=delay_s
            )
            time.sleep(delay_s)
