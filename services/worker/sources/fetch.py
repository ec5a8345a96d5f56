"""Get one layer entry's data onto local disk: dispatch by protocol, return a ``Download``.

Synchronous on purpose: the run's child process is synchronous code; the http and ESRI paths
run their own event loop inside.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from services.worker.errors import RunError
from services.worker.sources import http
from services.worker.sources.guard import UrlPolicy, check_url, is_local_path
from services.worker.sources.http import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUTS,
    Retry,
    SizeLimits,
    Timeouts,
)

# esri and ftp are imported in their protocol branches: esri pulls in aiohttp (~0.12 s) and
# ftp pulls in ftplib, which a run of a local file or an http URL does not need. http itself
# imports aiohttp only when it downloads.

__all__ = ["Conditional", "Download", "Retry", "SizeLimits", "Timeouts", "fetch"]

DOWNLOAD_STEM = "download"
ESRI_FILE = "esri.geojsonl"
COPY_BLOCK_BYTES = 1024 * 1024
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")
# Used only when the URL's path has no usable extension.
_SUFFIX_BY_CONTENT_TYPE = {
    "application/zip": ".zip",
    "application/x-zip-compressed": ".zip",
    "application/gzip": ".gz",
    "application/x-gzip": ".gz",
    "text/csv": ".csv",
    "application/json": ".json",
    "application/geo+json": ".geojson",
    "application/xml": ".xml",
    "text/xml": ".xml",
}


@dataclass(frozen=True)
class Conditional:
    """Validators from an earlier successful run, for a conditional GET."""

    etag: str | None
    last_modified: str | None
    fingerprint: str | None


@dataclass(frozen=True)
class Download:
    """The raw download on disk.

    When ``not_modified`` is true the server answered 304: nothing was written, ``path`` does
    not exist, and the caller reuses the earlier run's outputs (``fingerprint`` is the earlier
    one).
    """

    path: Path
    fingerprint: str
    size_bytes: int
    etag: str | None
    last_modified: str | None
    not_modified: bool
    content_type: str | None


def fetch(
    entry: Mapping[str, Any],
    workdir: Path,
    *,
    policy: UrlPolicy,
    conditional: Conditional | None = None,
    out_fields: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
    limits: SizeLimits = DEFAULT_LIMITS,
    user_agent: str | None = None,
    esri_host_limit: int | None = None,
    host_slots_dir: Path | None = None,
) -> Download:
    """Download ``entry["data"]`` into ``workdir`` by ``entry["protocol"]``.

    ``user_agent`` (the USER_AGENT setting; None: ours) goes with every http and ESRI request.
    An ESRI dump keeps at most ``esri_host_limit`` requests in flight to the layer's host
    (None: ESRI_HOST_LIMIT's default), counted with every run sharing ``host_slots_dir``.

    Raises ``RunError``: ``unknown_protocol``, ``download_failed`` (saying URL and status,
    error or size limit; see ``RunError.transient`` and ``RunError.over_limit``),
    ``no_esri_token``. A local file (``process-one`` only) is copied whatever its size: the
    person running it chose it.
    """
    url = entry.get("data")
    if not isinstance(url, str) or not url.strip():
        raise RunError("the source entry has no data URL", "invalid_source")
    url = url.strip()
    protocol = str(entry.get("protocol") or "").lower()
    headers = _request_headers(entry)
    workdir.mkdir(parents=True, exist_ok=True)

    if protocol in ("http", "https"):
        if is_local_path(url):
            check_url(url, policy)
            return _copy_local(url, workdir, progress)
        if urlsplit(url).scheme.lower() == "ftp":
            # Older sources say "http" for any URL; the scheme knows better.
            protocol = "ftp"
    if protocol in ("http", "https"):
        return _fetch_http(
            url,
            workdir,
            policy=policy,
            entry=entry,
            headers=headers,
            conditional=conditional,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            limits=limits,
            user_agent=user_agent,
        )
    if protocol == "ftp":
        from services.worker.sources import ftp  # deferred, see the imports

        dest = workdir / (DOWNLOAD_STEM + _suffix_from_url(url, ".bin"))
        got = ftp.download(
            url,
            dest,
            policy=policy,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            limits=limits,
        )
        return Download(got.path, got.fingerprint, got.size_bytes, None, None, False, None)
    if protocol == "esri":
        from services.worker.sources import esri  # deferred, see the imports

        host_limit = esri.HostLimit(slots_dir=host_slots_dir)
        if esri_host_limit is not None:
            host_limit = esri.HostLimit(esri_host_limit, host_slots_dir)
        dumped = esri.dump(
            url,
            workdir / ESRI_FILE,
            policy=policy,
            headers=headers,
            out_fields=out_fields,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            limits=limits,
            host_limit=host_limit,
            user_agent=user_agent,
        )
        return Download(
            dumped.path, dumped.fingerprint, dumped.size_bytes, None, None, False, esri.CONTENT_TYPE
        )
    raise RunError(f"unknown protocol {entry.get('protocol')!r}", "unknown_protocol")


def _request_headers(entry: Mapping[str, Any]) -> dict[str, str]:
    request = entry.get("request")
    headers = request.get("headers") if isinstance(request, Mapping) else None
    if not isinstance(headers, Mapping):
        return {}
    return {str(name): str(value) for name, value in headers.items()}


def _request_method(entry: Mapping[str, Any]) -> str:
    request = entry.get("request")
    method = request.get("method") if isinstance(request, Mapping) else None
    return str(method or "GET").upper()


def _fetch_http(
    url: str,
    workdir: Path,
    *,
    policy: UrlPolicy,
    entry: Mapping[str, Any],
    headers: Mapping[str, str],
    conditional: Conditional | None,
    progress: Callable[[int], None] | None,
    timeouts: Timeouts,
    retry: Retry,
    limits: SizeLimits,
    user_agent: str | None,
) -> Download:
    part = workdir / (DOWNLOAD_STEM + ".part")
    try:
        got = http.download(
            url,
            part,
            policy=policy,
            method=_request_method(entry),
            headers=headers,
            if_none_match=conditional.etag if conditional else None,
            if_modified_since=conditional.last_modified if conditional else None,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            limits=limits,
            user_agent=user_agent,
        )
    except RunError:
        # A half-written body must not be mistaken for a download later.
        part.unlink(missing_ok=True)
        raise
    if got.not_modified:
        earlier = conditional.fingerprint if conditional else None
        return Download(part, earlier or "", 0, got.etag, got.last_modified, True, None)
    dest = workdir / (DOWNLOAD_STEM + _suffix(url, got.content_type))
    part.replace(dest)
    return Download(
        dest, got.fingerprint, got.size_bytes, got.etag, got.last_modified, False, got.content_type
    )


def _suffix_from_url(url: str, default: str) -> str:
    suffix = Path(urlsplit(url).path).suffix.lower()
    return suffix if _SUFFIX.match(suffix) else default


def _suffix(url: str, content_type: str | None) -> str:
    by_type = ""
    if content_type:
        by_type = _SUFFIX_BY_CONTENT_TYPE.get(content_type.split(";")[0].strip().lower(), "")
    return _suffix_from_url(url, by_type or ".bin")


def _local_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        return Path(url2pathname(parts.path))
    return Path(url)


def _copy_local(url: str, workdir: Path, progress: Callable[[int], None] | None) -> Download:
    # Copied rather than used in place: the run owns and may rename or delete its download.
    source = _local_path(url)
    if not source.is_file():
        raise RunError(f"download failed, no such file {source}", "download_failed")
    dest = workdir / (DOWNLOAD_STEM + (source.suffix.lower() or ".bin"))
    md5 = hashlib.md5(usedforsecurity=False)
    size_bytes = 0
    # Each block is written on a second thread while it is hashed here: both release the GIL,
    # so the copy costs the longer of the two instead of their sum.
    with (
        source.open("rb", buffering=0) as src,
        dest.open("wb") as out,  # buffered: its write() takes the whole block or raises
        ThreadPoolExecutor(1, thread_name_prefix="copy") as pool,
    ):
        while block := src.read(COPY_BLOCK_BYTES):
            written = pool.submit(out.write, block)
            md5.update(block)
            written.result()
            size_bytes += len(block)
            if progress is not None:
                progress(size_bytes)
    shutil.copystat(source, dest)
    return Download(dest, md5.hexdigest(), size_bytes, None, None, False, None)
