"""FTP download with stdlib ftplib: anonymous or user:password from the URL, with a timeout.

The host name is resolved and checked once, and the connection goes to the checked address,
so the name cannot resolve differently in between. Passive data connections go to the
control connection's address (ftplib ignores the address in the PASV answer), so a server
cannot point the data connection at another machine either.
"""

from __future__ import annotations

import ftplib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import structlog

from services.worker.errors import RunError
from services.worker.sources.guard import UrlPolicy, check_url, redact, resolve_checked
from services.worker.sources.http import DEFAULT_RETRY, DEFAULT_TIMEOUTS, Retry, Timeouts

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


def _retrieve_once(
    target: FtpTarget,
    address: str,
    dest: Path,
    timeout_s: float,
    progress: Callable[[int], None] | None,
) -> FtpResult:
    md5 = hashlib.md5(usedforsecurity=False)
    size_bytes = 0
    with ftplib.FTP(timeout=timeout_s) as ftp, dest.open("wb") as out:
        ftp.connect(address, target.port)
        ftp.login(target.user, target.password)

        def write(block: bytes) -> None:
            nonlocal size_bytes
            out.write(block)
            md5.update(block)
            size_bytes += len(block)
            if progress is not None:
                progress(size_bytes)

        ftp.retrbinary(f"RETR {target.path}", write, blocksize=BLOCK_BYTES)
    return FtpResult(dest, md5.hexdigest(), size_bytes)


def download(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
) -> FtpResult:
    """Download an ``ftp://`` URL to ``dest``.

    Permanent FTP errors (5xx: no such file, login refused) fail at once; temporary ones and
    network errors are retried with backoff. Raises ``RunError`` with ``download_failed``.
    """
    check_url(url, policy)
    target = FtpTarget.parse(url)
    shown = redact(url)
    address = resolve_checked(target.host, target.port, policy)[0]
    # ftplib has one timeout for connect and for each read; the idle one is the larger.
    timeout_s = max(timeouts.connect_s, timeouts.sock_read_s)
    failures = 0
    while True:
        try:
            return _retrieve_once(target, address, dest, timeout_s, progress)
        except ftplib.error_perm as exc:
            raise RunError(f"download failed, {shown}: FTP {exc}", "download_failed") from exc
        except (ftplib.Error, OSError, EOFError) as exc:
            failures += 1
            if failures >= retry.tries:
                raise RunError(
                    f"download failed after {failures} tries, {shown}: {type(exc).__name__} {exc}",
                    "download_failed",
                ) from exc
            delay_s = retry.delay_s(failures)
            log.warning(
                "download.retry", what=shown, error=str(exc), failures=failures, delay_s=delay_s
            )
            time.sleep(delay_s)
