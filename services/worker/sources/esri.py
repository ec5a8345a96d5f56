"""Dump an ArcGIS Feature/MapServer layer to line-delimited GeoJSON.

Strategy, most to least efficient: page by ``resultOffset`` when the layer says it supports
pagination; else ask for every object id and query the ids in chunks; else one plain query
(which the server may truncate; we warn). A server that claims pagination but ignores
``resultOffset`` (the same page again) is caught and dumped by ids instead.

Each feature is written as one GeoJSON line as soon as its page arrives, so memory holds one
page at a time; GDAL reads the ``.geojsonl`` file as a stream. A page is held within the size
limits (its body on the wire and inflated), and so is the whole dump on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp
import structlog
from yarl import URL

from services.worker.errors import RunError
from services.worker.sources.guard import UrlPolicy, redact
from services.worker.sources.http import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUTS,
    Retry,
    RetryableError,
    SizeLimits,
    Timeouts,
    make_session,
    open_response,
    read_body,
    status_error,
    with_retries,
)

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/x-ndjson"
DEFAULT_PAGE_SIZE = 1000
# Past this many characters of object ids a GET URL risks a 414 from the server or a proxy.
MAX_GET_IDS_CHARS = 1500
TOKEN_ERROR_CODES = frozenset({498, 499})

JSON = dict[str, Any]
Position = list[float]
Ring = list[Position]


@dataclass(frozen=True)
class EsriResult:
    path: Path
    fingerprint: str
    size_bytes: int
    expected_count: int | None
    written_count: int


class PagingIgnoredError(Exception):
    """The server answered a later offset with the first page again."""


# --- geometry ----------------------------------------------------------------------------


def _position(raw: Any) -> Position | None:
    if not isinstance(raw, list | tuple) or len(raw) < 2:
        return None
    x, y = raw[0], raw[1]
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        return None
    if math.isnan(x) or math.isnan(y):
        return None
    return [float(x), float(y)]


def _positions(raw: Any) -> list[Position]:
    return [p for p in (_position(item) for item in raw or []) if p is not None]


def _closed(ring: Ring) -> Ring:
    return ring if ring[0] == ring[-1] else [*ring, ring[0]]


def _signed_area(ring: Ring) -> float:
    """Twice the signed area; negative means clockwise (x east, y north)."""
    return sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in itertools.pairwise(ring))


def _contains(ring: Ring, point: Position) -> bool:
    # Even-odd ray casting; good enough to decide which outer ring a hole belongs to.
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def _polygons(rings_raw: Any) -> list[list[Ring]]:
    """Group Esri rings (outer clockwise, holes counter-clockwise) into GeoJSON polygons
    (outer counter-clockwise, holes clockwise, as RFC 7946 asks)."""
    rings = [_closed(r) for r in (_positions(raw) for raw in rings_raw or []) if len(r) >= 3]
    rings = [r for r in rings if len(r) >= 4]
    outers = [r for r in rings if _signed_area(r) < 0]
    holes = [r for r in rings if _signed_area(r) >= 0]
    polygons: list[list[Ring]] = [[outer[::-1]] for outer in outers]
    for hole in holes:
        owner = next(
            (p for p, o in zip(polygons, outers, strict=True) if _contains(o, hole[0])), None
        )
        if owner is None:
            # A counter-clockwise ring inside nothing: a server that got the winding wrong.
            polygons.append([hole])
            outers.append(hole[::-1])
        else:
            owner.append(hole[::-1])
    return polygons


def to_geojson_geometry(geometry: Mapping[str, Any] | None) -> JSON | None:
    """Convert an Esri JSON geometry to a GeoJSON one; None when missing or empty."""
    if not geometry:
        return None
    if "x" in geometry:
        point = _position([geometry.get("x"), geometry.get("y")])
        return {"type": "Point", "coordinates": point} if point else None
    if "points" in geometry:
        points = _positions(geometry["points"])
        if not points:
            return None
        if len(points) == 1:
            return {"type": "Point", "coordinates": points[0]}
        return {"type": "MultiPoint", "coordinates": points}
    if "paths" in geometry:
        paths = [p for p in (_positions(raw) for raw in geometry["paths"] or []) if len(p) >= 2]
        if not paths:
            return None
        if len(paths) == 1:
            return {"type": "LineString", "coordinates": paths[0]}
        return {"type": "MultiLineString", "coordinates": paths}
    if "rings" in geometry:
        polygons = _polygons(geometry["rings"])
        if not polygons:
            return None
        if len(polygons) == 1:
            return {"type": "Polygon", "coordinates": polygons[0]}
        return {"type": "MultiPolygon", "coordinates": polygons}
    return None


def to_geojson_feature(feature: Mapping[str, Any]) -> JSON:
    return {
        "type": "Feature",
        "properties": dict(feature.get("attributes") or {}),
        "geometry": to_geojson_geometry(feature.get("geometry")),
    }


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
        lines = b"".join(
            json.dumps(to_geojson_feature(f), ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n"
            for f in features
        )
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
        self.count += len(features)
        if self._progress is not None:
            self._progress(self.size_bytes)


# --- the server --------------------------------------------------------------------------


def _is_token_error(error: Mapping[str, Any]) -> bool:
    message = f"{error.get('message', '')} {error.get('details', '')}".lower()
    return error.get("code") in TOKEN_ERROR_CODES or "token" in message


class LayerClient:
    """JSON requests to one layer, with retries and ArcGIS error handling."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        policy: UrlPolicy,
        headers: Mapping[str, str],
        retry: Retry,
        limits: SizeLimits = DEFAULT_LIMITS,
    ) -> None:
        parts = urlsplit(url)
        # A query string in the source URL (a token, a definition query) goes on every request.
        self.base_params = dict(parse_qsl(parts.query))
        self.layer_url = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.shown = redact(self.layer_url)
        self._session = session
        self._policy = policy
        self._headers = dict(headers)
        self._retry = retry
        self._limits = limits

    async def get(self, path: str, params: Mapping[str, str], *, post: bool = False) -> JSON:
        url = self.layer_url + path
        query = {**self.base_params, **params}

        async def attempt() -> JSON:
            method = "POST" if post else "GET"
            async with open_response(
                self._session,
                method,
                url if post else _with_query(url, query),
                policy=self._policy,
                headers=self._headers,
                data=query if post else None,
            ) as response:
                # Bounded: a page is held in memory whole.
                body = await read_body(response, self.shown, self._limits)
                return self._parse(response, body)

        return await with_retries(attempt, self._retry, self.shown)

    def _parse(self, response: aiohttp.ClientResponse, body: bytes) -> JSON:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        except RecursionError as exc:
            # No layer nests its JSON hundreds deep; this is a broken or hostile server.
            raise RunError(
                f"download failed, {self.shown}: the answer is JSON nested too deeply to read",
                "download_failed",
            ) from exc
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            self._raise_arcgis_error(data["error"])
        if response.status >= 400:
            raise status_error(self.shown, response)
        if not isinstance(data, dict):
            # Often a truncated answer or an HTML error page from a proxy: try again.
            raise RetryableError(f"{self.shown}: the answer is not a JSON object")
        return data

    def _raise_arcgis_error(self, error: Mapping[str, Any]) -> None:
        code = error.get("code")
        message = f"{self.shown}: ArcGIS error {code}: {error.get('message', '')}"
        if _is_token_error(error):
            raise RunError(f"the layer needs a token, {message}", "no_esri_token")
        if isinstance(code, int) and code >= 500:
            raise RetryableError(message)
        raise RunError(f"download failed, {message}", "download_failed")


def _with_query(url: str, params: Mapping[str, str]) -> str:
    return str(URL(url).with_query(dict(params)))


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
        page_size = (
            min(max_records, max_page_size)
            if isinstance(max_records, int) and max_records > 0
            else max_page_size
        )
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


def _chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


class Dumper:
    def __init__(self, client: LayerClient, layer: Layer, writer: LineWriter) -> None:
        self.client = client
        self.layer = layer
        self.writer = writer

    def _query_params(self) -> dict[str, str]:
        return {
            "where": "1=1",
            "outFields": self.layer.out_fields,
            "outSR": "4326",
            "returnGeometry": "true",
            "f": "json",
        }

    async def count(self) -> int | None:
        try:
            data = await self.client.get(
                "/query", {"where": "1=1", "returnCountOnly": "true", "f": "json"}
            )
        except RunError as exc:
            if exc.problem == "no_esri_token" or exc.over_limit:
                raise
            log.warning("esri.count_failed", url=self.client.shown, error=str(exc))
            return None
        count = data.get("count")
        return count if isinstance(count, int) else None

    def _oid(self, feature: Mapping[str, Any]) -> Any:
        attributes = feature.get("attributes") or {}
        return attributes.get(self.layer.oid_field) if self.layer.oid_field else None

    async def by_offset(self, expected: int | None) -> None:
        offset = 0
        first: Mapping[str, Any] | None = None
        while True:
            params = {
                **self._query_params(),
                "resultOffset": str(offset),
                "resultRecordCount": str(self.layer.page_size),
            }
            if self.layer.oid_field:
                # A stable order, or pages may overlap and skip features.
                params["orderByFields"] = f"{self.layer.oid_field} ASC"
            data = await self.client.get("/query", params)
            features = data.get("features") or []
            if not features:
                return
            # The whole first feature, not just its id: a layer may have no id field.
            if first is None:
                first = features[0]
            elif features[0] == first:
                raise PagingIgnoredError
            self.writer.write(features)
            # Advance by what came back: some servers return fewer than asked (their own
            # limit) or more (they ignore resultRecordCount).
            offset += len(features)
            more = bool(data.get("exceededTransferLimit"))
            if expected is not None and offset >= expected and not more:
                return
            if expected is None and len(features) < self.layer.page_size and not more:
                return

    async def object_ids(self) -> list[int] | None:
        try:
            data = await self.client.get(
                "/query", {"where": "1=1", "returnIdsOnly": "true", "f": "json"}
            )
        except RunError as exc:
            if exc.problem == "no_esri_token" or exc.over_limit:
                raise
            log.warning("esri.ids_failed", url=self.client.shown, error=str(exc))
            return None
        ids = data.get("objectIds")
        if not isinstance(ids, list):
            return None
        if data.get("objectIdFieldName") and not self.layer.oid_field:
            self.layer = Layer(
                data["objectIdFieldName"],
                self.layer.page_size,
                self.layer.supports_pagination,
                self.layer.out_fields,
            )
        return sorted(i for i in ids if isinstance(i, int))

    async def by_ids(self, ids: Sequence[int]) -> None:
        for chunk in _chunks(ids, self.layer.page_size):
            pending = chunk
            while pending:
                got = await self._query_ids(pending)
                self.writer.write(got)
                returned = {self._oid(f) for f in got}
                # The server returned less than asked (a lower limit than it reported): ask
                # again for the rest, as long as each answer makes progress.
                rest = [i for i in pending if i not in returned]
                if len(rest) == len(pending):
                    log.warning("esri.ids_missing", url=self.client.shown, missing=len(rest))
                    break
                pending = rest

    async def _query_ids(self, ids: Sequence[int]) -> list[JSON]:
        joined = ",".join(str(i) for i in ids)
        params = {**self._query_params(), "objectIds": joined}
        del params["where"]
        data = await self.client.get("/query", params, post=len(joined) > MAX_GET_IDS_CHARS)
        return list(data.get("features") or [])

    async def in_one_query(self) -> None:
        data = await self.client.get("/query", self._query_params())
        if data.get("exceededTransferLimit"):
            log.warning("esri.truncated", url=self.client.shown)
        self.writer.write(data.get("features") or [])


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
    max_page_size: int = DEFAULT_PAGE_SIZE,
    limits: SizeLimits = DEFAULT_LIMITS,
) -> EsriResult:
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
) -> EsriResult:
    async with make_session(policy, timeouts) as session:
        client = LayerClient(
            session, url, policy=policy, headers=headers or {}, retry=retry, limits=limits
        )
        meta = await client.get("", {"f": "json"})
        if "layers" in meta and "fields" not in meta:
            raise RunError(
                f"{client.shown} is a service, not a layer: add the layer number to the URL",
                "download_failed",
            )
        layer = Layer.from_metadata(meta, out_fields, max_page_size)
        # Blocking writes of one page at a time; the loop has nothing else to do meanwhile.
        with dest.open("w+b") as out:
            writer = LineWriter(
                out, progress, shown=client.shown, max_bytes=limits.max_download_bytes
            )
            dumper = Dumper(client, layer, writer)
            expected = await dumper.count()
            await _run_strategy(dumper, expected)
            writer = dumper.writer
    if expected is not None and writer.count != expected:
        log.warning(
            "esri.count_mismatch", url=client.shown, expected=expected, written=writer.count
        )
    return EsriResult(dest, writer.md5.hexdigest(), writer.size_bytes, expected, writer.count)


async def _run_strategy(dumper: Dumper, expected: int | None) -> None:
    if dumper.layer.supports_pagination:
        try:
            await dumper.by_offset(expected)
            return
        except PagingIgnoredError:
            log.warning("esri.offset_ignored", url=dumper.client.shown)
            dumper.writer.reset()
    ids = await dumper.object_ids()
    if ids is not None:
        await dumper.by_ids(ids)
    else:
        await dumper.in_one_query()


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
    max_page_size: int = DEFAULT_PAGE_SIZE,
    limits: SizeLimits = DEFAULT_LIMITS,
) -> EsriResult:
    """Dump the layer at ``url`` to ``dest`` as GeoJSON lines in EPSG:4326 (blocking).

    Raises ``RunError``: ``no_esri_token`` for a token-protected layer, ``download_failed``
    otherwise (``transient`` when the retries of a 5xx, throttling or network error were used
    up; ``over_limit`` for a page or a dump past ``limits``). A written count that differs
    from the server's count is logged, not raised: the server's count is often off for live
    layers.
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
        )
    )
