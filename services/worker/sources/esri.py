"""Dump an ArcGIS Feature/MapServer layer to line-delimited GeoJSON, a few pages at a time.

Strategy, most to least efficient (:mod:`services.worker.sources.esri_plans`): page by
``resultOffset`` when the layer says it supports pagination; else ask for every object id and
query the ids in chunks; else, when the id list is refused, query ``OBJECTID`` ranges between
the smallest and largest id; else one plain query (which the server may truncate; we warn). A
server that claims pagination but ignores ``resultOffset`` (the same page again) is caught
and dumped by ids instead.

Pages are fetched up to ESRI_HOST_LIMIT at once and written in page order
(:mod:`services.worker.sources.esri_pages`), so the file is the same as one page after another
gives; the page size is the layer's ``maxRecordCount``, halved when large pages fail. Memory
holds at most that many pages; GDAL reads the ``.geojsonl`` file as a stream. A page is held
within the size limits (its body on the wire and inflated), and so is the whole dump on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from services.worker.errors import RunError
from services.worker.sources.esri_client import JSON, LayerClient
from services.worker.sources.esri_geojson import (
    encode_lines,
    to_geojson_feature,
    to_geojson_geometry,
)
from services.worker.sources.esri_pages import Pager
from services.worker.sources.esri_plans import (
    IdPlan,
    OffsetPlan,
    PagingIgnoredError,
    RangePlan,
    oid_bounds,
)
from services.worker.sources.guard import UrlPolicy, redact
from services.worker.sources.hosts import SLOTS_FOLDER, HostLimit, HostSlots
from services.worker.sources.http import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUTS,
    Retry,
    SizeLimits,
    Timeouts,
    make_session,
)

__all__ = [
    "CONTENT_TYPE",
    "EsriResult",
    "HostLimit",
    "PagingIgnoredError",
    "dump",
    "dump_async",
    "to_geojson_feature",
    "to_geojson_geometry",
]

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/x-ndjson"
#: Page size of a layer that states no ``maxRecordCount``.
DEFAULT_PAGE_SIZE = 1000
#: Largest page asked for, whatever ``maxRecordCount`` says: a few servers allow tens of
#: thousands, and ``limit × page`` features are held in memory at once.
MAX_PAGE_SIZE = 5000
DEFAULT_HOST_LIMIT = HostLimit()


@dataclass(frozen=True)
class EsriResult:
    path: Path
    fingerprint: str
    size_bytes: int
    expected_count: int | None
    written_count: int


# --- output ------------------------------------------------------------------------------


class LineWriter:
    """Writes features one per line, hashing and counting as it goes.

    The dump is the run's download, so it may not grow past ``max_bytes`` (a server can page
    for ever).
    """

    def __init__(
        self,
        out: BinaryIO,
        progress: Callable[[int], None] | None,
        *,
        shown: str = "the layer",
        max_bytes: int = DEFAULT_LIMITS.max_download_bytes,
    ) -> None:
        self._out = out
        self._progress = progress
        self._shown = shown
        self._max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        self._out.seek(0)
        self._out.truncate()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size_bytes = 0
        self.count = 0

    def write(self, features: Sequence[Mapping[str, Any]]) -> None:
        self.write_lines(encode_lines(features), len(features))

    def write_lines(self, lines: bytes, count: int) -> None:
        """Append ``count`` features already encoded by ``encode_lines``."""
        if self.size_bytes + len(lines) > self._max_bytes:
            raise RunError(
                f"download failed, {self._shown}: the layer's features pass the limit of "
                f"{self._max_bytes} bytes (MAX_DOWNLOAD_BYTES)",
                "download_failed",
                over_limit=True,
            )
        self._out.write(lines)
        self.md5.update(lines)
        self.size_bytes += len(lines)
        self.count += count
        if self._progress is not None:
            self._progress(self.size_bytes)


# --- the dump ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    oid_field: str | None
    page_size: int
    supports_pagination: bool
    out_fields: str

    @classmethod
    def from_metadata(
        cls, meta: Mapping[str, Any], out_fields: Sequence[str] | None, max_page_size: int
    ) -> Layer:
        fields = [f for f in meta.get("fields") or [] if isinstance(f, dict)]
        oid_field = meta.get("objectIdField") or next(
            (f.get("name") for f in fields if f.get("type") == "esriFieldTypeOID"), None
        )
        advanced = meta.get("advancedQueryCapabilities") or {}
        supports = bool(advanced.get("supportsPagination") or meta.get("supportsPagination"))
        max_records = meta.get("maxRecordCount")
        # The server's own page size: asking for less only multiplies the round trips.
        stated = max_records if isinstance(max_records, int) and max_records > 0 else None
        page_size = min(stated or DEFAULT_PAGE_SIZE, max_page_size)
        return cls(oid_field, page_size, supports, _out_fields(fields, out_fields, oid_field))


def _out_fields(
    fields: Sequence[Mapping[str, Any]], wanted: Sequence[str] | None, oid_field: str | None
) -> str:
    """``outFields``: the wanted fields spelt as the server spells them, plus the object id.

    A field the layer does not have is left out (asking for it is an error on ArcGIS); the
    conform step reports it properly later.
    """
    if not wanted:
        return "*"
    names = [str(f.get("name")) for f in fields if f.get("name")]
    by_lower = {name.lower(): name for name in names}
    chosen = [by_lower.get(w.lower(), w if not names else "") for w in wanted]
    if oid_field:
        chosen.append(oid_field)
    return ",".join(dict.fromkeys(name for name in chosen if name)) or "*"


class Dumper:
    """One dump: the requests around the pages, and the choice of plan."""

    def __init__(self, client: LayerClient, layer: Layer, pager: Pager) -> None:
        self.client = client
        self.layer = layer
        self.pager = pager

    def _query_params(self) -> dict[str, str]:
        return {
            "where": "1=1",
            "outFields": self.layer.out_fields,
            "outSR": "4326",
            "returnGeometry": "true",
            "f": "json",
        }

    async def _optional(self, params: Mapping[str, str], event: str) -> JSON | None:
        """An answer the dump can do without: None when refused (not for want of a token)."""
        try:
            return await self.client.get("/query", params)
        except RunError as exc:
            if exc.problem == "no_esri_token" or exc.over_limit:
                raise
            log.warning(event, url=self.client.shown, error=str(exc))
            return None

    async def count(self) -> int | None:
        params = {"where": "1=1", "returnCountOnly": "true", "f": "json"}
        data = await self._optional(params, "esri.count_failed")
        count = data.get("count") if data else None
        return count if isinstance(count, int) else None

    async def object_ids(self) -> list[int] | None:
        params = {"where": "1=1", "returnIdsOnly": "true", "f": "json"}
        data = await self._optional(params, "esri.ids_failed")
        ids = data.get("objectIds") if data else None
        if data is None or not isinstance(ids, list):
            return None
        if data.get("objectIdFieldName") and not self.layer.oid_field:
            self.layer = replace(self.layer, oid_field=data["objectIdFieldName"])
        return sorted(i for i in ids if isinstance(i, int))

    async def run(self, expected: int | None) -> None:
        writer = self.pager.writer
        if self.layer.supports_pagination:
            params = self._query_params()
            if self.layer.oid_field:
                # A stable order, or pages may overlap and skip features.
                params["orderByFields"] = f"{self.layer.oid_field} ASC"
            try:
                await self.pager.run(OffsetPlan(self.client, params, expected))
                return
            except PagingIgnoredError:
                log.warning("esri.offset_ignored", url=self.client.shown)
                writer.reset()
        ids = await self.object_ids()
        if ids is not None:
            plan = IdPlan(self.client, self._query_params(), ids, self.layer.oid_field)
            await self.pager.run(plan)
            return
        oid_field = self.layer.oid_field
        bounds = await oid_bounds(self.client, oid_field) if oid_field else None
        if oid_field and bounds:
            log.info("esri.by_ranges", url=self.client.shown, low=bounds[0], high=bounds[1])
            plan_ranges = RangePlan(self.client, self._query_params(), oid_field, bounds, expected)
            await self.pager.run(plan_ranges)
            return
        data = await self.client.get("/query", self._query_params())
        if data.get("exceededTransferLimit"):
            log.warning("esri.truncated", url=self.client.shown)
        writer.write(data.get("features") or [])


async def dump_async(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    headers: Mapping[str, str] | None = None,
    out_fields: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
    max_page_size: int = MAX_PAGE_SIZE,
    limits: SizeLimits = DEFAULT_LIMITS,
    host_limit: HostLimit = DEFAULT_HOST_LIMIT,
    user_agent: str | None = None,
) -> EsriResult:
    """Dump the layer at ``url`` to ``dest``; see ``dump`` for the contract."""
    try:
        return await _dump(
            url,
            dest,
            policy=policy,
            headers=headers,
            out_fields=out_fields,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            max_page_size=max_page_size,
            limits=limits,
            host_limit=host_limit,
            user_agent=user_agent,
        )
    except RecursionError as exc:
        # Features nested just under the parser's limit can still be too deep to compare or
        # write (each level is a recursion there too).
        dest.unlink(missing_ok=True)
        raise RunError(
            f"download failed, {redact(url)}: the layer's features are nested too deeply",
            "download_failed",
        ) from exc
    except RunError:
        # Half a layer must not be mistaken for a dump later.
        dest.unlink(missing_ok=True)
        raise


async def _dump(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    headers: Mapping[str, str] | None,
    out_fields: Sequence[str] | None,
    progress: Callable[[int], None] | None,
    timeouts: Timeouts,
    retry: Retry,
    max_page_size: int,
    limits: SizeLimits,
    host_limit: HostLimit,
    user_agent: str | None,
) -> EsriResult:
    slots = HostSlots(host_limit.slots_dir or dest.parent / SLOTS_FOLDER, url, host_limit.limit)
    async with make_session(policy, timeouts, user_agent) as session:
        client = LayerClient(
            session,
            url,
            policy=policy,
            headers=headers or {},
            retry=retry,
            slots=slots,
            limits=limits,
        )
        meta = await client.get("", {"f": "json"})
        if "layers" in meta and "fields" not in meta:
            raise RunError(
                f"{client.shown} is a service, not a layer: add the layer number to the URL",
                "download_failed",
            )
        layer = Layer.from_metadata(meta, out_fields, max_page_size)
        # Blocking writes of one page at a time; the loop has little else to do meanwhile.
        with dest.open("w+b") as out:
            writer = LineWriter(
                out, progress, shown=client.shown, max_bytes=limits.max_download_bytes
            )
            pager = Pager(
                writer,
                size=layer.page_size,
                window=host_limit.limit,
                retry=retry,
                shown=client.shown,
            )
            dumper = Dumper(client, layer, pager)
            expected = await dumper.count()
            await dumper.run(expected)
    if expected is not None and writer.count != expected:
        log.warning(
            "esri.count_mismatch", url=client.shown, expected=expected, written=writer.count
        )
    return EsriResult(dest, writer.md5.hexdigest(), writer.size_bytes, expected, writer.count)


def dump(
    url: str,
    dest: Path,
    *,
    policy: UrlPolicy,
    headers: Mapping[str, str] | None = None,
    out_fields: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    retry: Retry = DEFAULT_RETRY,
    max_page_size: int = MAX_PAGE_SIZE,
    limits: SizeLimits = DEFAULT_LIMITS,
    host_limit: HostLimit = DEFAULT_HOST_LIMIT,
    user_agent: str | None = None,
) -> EsriResult:
    """Dump the layer at ``url`` to ``dest`` as GeoJSON lines in EPSG:4326 (blocking).

    At most ``host_limit.limit`` requests are in flight to the layer's host, counting every
    dump that shares ``host_limit.slots_dir``. ``user_agent`` None sends ours.

    Raises ``RunError``: ``no_esri_token`` for a token-protected layer, ``download_failed``
    otherwise (``transient`` when a page still failed with a 5xx, throttling or network error
    after two rounds of retries, naming the page; ``over_limit`` for a page or a dump past
    ``limits``). A written count that differs from the server's count is logged, not raised:
    the server's count is often off for live layers.
    """
    return asyncio.run(
        dump_async(
            url,
            dest,
            policy=policy,
            headers=headers,
            out_fields=out_fields,
            progress=progress,
            timeouts=timeouts,
            retry=retry,
            max_page_size=max_page_size,
            limits=limits,
            host_limit=host_limit,
            user_agent=user_agent,
        )
    )
