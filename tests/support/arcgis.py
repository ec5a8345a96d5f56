"""A fake ArcGIS REST server on 127.0.0.1: layer metadata, counts, paging, object ids, tokens,
``OBJECTID`` ranges and statistics; latency, errors on large pages, intermittent 500s, 429s.

It behaves like the real thing where the dumper cares (and can misbehave the way real
servers do)::

    with FakeArcGIS().running() as arcgis:
        url = arcgis.add_layer("parcels", FakeLayer(features=[point_feature(1, 2.0, 3.0)]))
        # url is .../arcgis/rest/services/parcels/FeatureServer/0

or ``async with FakeArcGIS() as arcgis:`` on the test's loop. Requests are recorded in
``arcgis.requests``; ``arcgis.params(request)`` gives a request's query or form parameters.

It also watches the client's manners: ``arcgis.peak_in_flight`` is the most requests it had
in flight at once to one host (this server); with ``arcgis.in_flight_limit`` set, each request
above it is recorded in ``arcgis.violations``, and so is each request that arrives while a
``Retry-After`` it sent is still running.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from tests.support.dataserver import AppServer, RecordedRequest

OID = "OBJECTID"
#: How long after a 429 requests that were already on their way may still arrive.
RETRY_AFTER_GRACE_S = 0.05
TOKEN = "secret-token"


def point_feature(oid: int, x: float, y: float, **attributes: Any) -> dict[str, Any]:
    return {"attributes": {OID: oid, **attributes}, "geometry": {"x": x, "y": y}}


@dataclass
class FakeLayer:
    """One layer's features (Esri JSON, each with an ``OBJECTID`` attribute) and quirks."""

    features: list[dict[str, Any]]
    geometry_type: str = "esriGeometryPoint"
    max_record_count: int = 1000
    supports_pagination: bool = True
    #: Answer every request with ``{"error": {"code": 499, ...}}`` unless ``token`` is sent.
    token_required: bool = False
    #: Return the first page whatever the ``resultOffset`` (a broken server).
    ignore_offset: bool = False
    #: Return ``max_record_count`` features whatever the ``resultRecordCount``.
    ignore_record_count: bool = False
    #: Added to the true count in ``returnCountOnly`` answers (a stale server count).
    count_error: int = 0
    #: ``maxRecordCount`` in the metadata when it differs from the real limit (a liar).
    advertised_max_record_count: int | None = None
    #: HTTP statuses answered, one per request, before normal answers.
    failures: list[int] = field(default_factory=list)
    #: Answer gzip-encoded, as most real servers do when the client accepts it.
    gzip: bool = False
    #: Seconds every request to the layer takes before it is answered.
    latency_s: float = 0.0
    #: A query for more features than this answers HTTP 500 (a page too large to build).
    error_above: int | None = None
    #: Every n-th feature query answers HTTP 500 (0: never).
    error_every: int = 0
    #: Every n-th feature query answers 429 with ``Retry-After: retry_after_s`` (0: never).
    throttle_every: int = 0
    retry_after_s: int = 1
    #: ``"name=value"`` of a query parameter → how many such queries answer ``fail_status``
    #: first (503 by default: a page that fails without being too large).
    fail_matching: dict[str, int] = field(default_factory=dict)
    fail_status: int = 503
    #: ``returnIdsOnly`` is refused when the layer has more ids than this.
    max_ids: int | None = None
    supports_statistics: bool = True
    #: Feature queries answered so far (what ``error_every`` and ``throttle_every`` count).
    queries_seen: int = 0

    @property
    def field_names(self) -> list[str]:
        names: dict[str, None] = {OID: None}
        for feature in self.features:
            names.update(dict.fromkeys(feature["attributes"]))
        return list(names)


class FakeArcGIS(AppServer):
    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, FakeLayer] = {}
        self.in_flight_limit: int | None = None
        self.peak_in_flight = 0
        self.violations: list[str] = []
        self._in_flight: dict[str, int] = {}
        #: Host → when (monotonic) it last answered with a Retry-After, and until when.
        self._retry_after: dict[str, tuple[float, float]] = {}

    def reset_watch(self, in_flight_limit: int | None = None) -> None:
        """Forget what was seen so far and watch for ``in_flight_limit`` from now on."""
        self.in_flight_limit = in_flight_limit
        self.peak_in_flight = 0
        self.violations = []
        self._retry_after.clear()

    def add_layer(self, name: str, layer: FakeLayer) -> str:
        self.layers[name] = layer
        return self.layer_url(name)

    def layer_url(self, name: str) -> str:
        return self.url(f"/arcgis/rest/services/{name}/FeatureServer/0")

    @staticmethod
    def params(request: RecordedRequest) -> dict[str, str]:
        if request.method == "POST":
            return {**request.query, **dict(parse_qsl(request.body.decode()))}
        return dict(request.query)

    def queries(self, name: str) -> list[dict[str, str]]:
        """Parameters of every ``/query`` request to layer ``name``."""
        path = f"/arcgis/rest/services/{name}/FeatureServer/0/query"
        return [self.params(r) for r in self.requests if r.path == path]

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._watch])
        base = "/arcgis/rest/services/{name}/FeatureServer/0"
        app.router.add_route("*", base.removesuffix("/0"), self._service)
        app.router.add_route("*", base, self._metadata)
        app.router.add_route("*", base + "/query", self._query)
        return app

    @web.middleware
    async def _watch(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        host = request.host
        now = time.monotonic()
        sent, until = self._retry_after.get(host, (0.0, 0.0))
        # Requests sent before the client read the 429 may still arrive just after it; and a
        # little slack for the clocks of two event loops at the end.
        if sent + RETRY_AFTER_GRACE_S < now < until - 0.02:
            self.violations.append(f"{host}: a request during Retry-After")
        self._in_flight[host] = in_flight = self._in_flight.get(host, 0) + 1
        self.peak_in_flight = max(self.peak_in_flight, in_flight)
        if self.in_flight_limit is not None and in_flight > self.in_flight_limit:
            self.violations.append(f"{host}: {in_flight} requests in flight")
        try:
            return await handler(request)
        finally:
            self._in_flight[host] -= 1

    async def _prologue(
        self, request: web.Request
    ) -> tuple[FakeLayer, dict[str, str]] | web.Response:
        recorded = await self.record(request)
        layer = self.layers.get(request.match_info["name"])
        if layer is None:
            return _error(400, "Invalid URL", status=404)
        if layer.latency_s:
            await asyncio.sleep(layer.latency_s)
        if layer.failures:
            return web.Response(status=layer.failures.pop(0), text="failure on purpose")
        params = self.params(recorded)
        if layer.token_required and params.get("token") != TOKEN:
            # Real servers answer 200 with the error in the body.
            return _error(499, "Token Required")
        return layer, params

    async def _service(self, request: web.Request) -> web.Response:
        await self.record(request)
        return _json({"currentVersion": 10.91, "layers": [{"id": 0, "name": "layer"}]})

    async def _metadata(self, request: web.Request) -> web.Response:
        got = await self._prologue(request)
        if isinstance(got, web.Response):
            return got
        layer, _ = got
        fields = [
            {"name": name, "type": "esriFieldTypeOID" if name == OID else "esriFieldTypeString"}
            for name in layer.field_names
        ]
        return _answer(
            layer,
            {
                "currentVersion": 10.91,
                "name": request.match_info["name"],
                "type": "Feature Layer",
                "geometryType": layer.geometry_type,
                "objectIdField": OID,
                "fields": fields,
                "capabilities": "Query",
                "maxRecordCount": layer.advertised_max_record_count or layer.max_record_count,
                "advancedQueryCapabilities": {"supportsPagination": layer.supports_pagination},
            },
        )

    async def _query(self, request: web.Request) -> web.Response:
        got = await self._prologue(request)
        if isinstance(got, web.Response):
            return got
        layer, params = got
        if params.get("returnCountOnly") == "true":
            matched = _where(layer.features, params.get("where", "1=1"))
            return _answer(layer, {"count": len(matched) + layer.count_error})
        if params.get("returnIdsOnly") == "true":
            ids = [f["attributes"][OID] for f in layer.features]
            if layer.max_ids is not None and len(ids) > layer.max_ids:
                return _error(400, "Requested operation exceeds the maximum number of ids.")
            return _answer(layer, {"objectIdFieldName": OID, "objectIds": ids})
        if "outStatistics" in params:
            return _statistics(layer, params)
        if "resultOffset" in params and not layer.supports_pagination:
            return _error(400, "Pagination is not supported.")
        refused = self._refuse(request, layer, params)
        if refused is not None:
            return refused
        features, more = _select(layer, params)
        answer: dict[str, Any] = {
            "objectIdFieldName": OID,
            "geometryType": layer.geometry_type,
            "spatialReference": {"wkid": 4326},
            "features": [_project(f, params.get("outFields", "*")) for f in features],
        }
        if more:
            answer["exceededTransferLimit"] = True
        return _answer(layer, answer)


    def _refuse(
        self, request: web.Request, layer: FakeLayer, params: dict[str, str]
    ) -> web.Response | None:
        """The failure this feature query gets on purpose, if any."""
        layer.queries_seen += 1
        for pair, left in layer.fail_matching.items():
            name, _, value = pair.partition("=")
            if left and params.get(name) == value:
                layer.fail_matching[pair] = left - 1
                return web.Response(status=layer.fail_status, text="failure on purpose")
        if layer.error_above is not None and _asked(layer, params) > layer.error_above:
            return web.Response(status=500, text="the page is too large to build in time")
        if layer.error_every and layer.queries_seen % layer.error_every == 0:
            return web.Response(status=500, text="failure on purpose")
        if layer.throttle_every and layer.queries_seen % layer.throttle_every == 0:
            now = time.monotonic()
            self._retry_after[request.host] = (now, now + layer.retry_after_s)
            return web.Response(
                status=429, text="slow down", headers={"Retry-After": str(layer.retry_after_s)}
            )
        return None


_RANGE = re.compile(rf"^{OID} >= (-?\d+) AND {OID} < (-?\d+)$")


def _where(features: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The features a ``where`` selects: ``1=1`` or an ``OBJECTID`` range."""
    if where.strip() == "1=1":
        return features
    match = _RANGE.match(where.strip())
    if match is None:
        raise ValueError(f"the fake server does not understand where={where!r}")
    low, high = int(match[1]), int(match[2])
    return [f for f in features if low <= f["attributes"][OID] < high]


def _asked(layer: FakeLayer, params: dict[str, str]) -> int:
    """How many features a query would have the server build."""
    if "objectIds" in params:
        return len([i for i in params["objectIds"].split(",") if i])
    if "resultRecordCount" in params:
        return int(params["resultRecordCount"])
    return len(_where(layer.features, params.get("where", "1=1")))


def _statistics(layer: FakeLayer, params: dict[str, str]) -> web.Response:
    if not layer.supports_statistics:
        return _error(400, "Statistics are not supported.")
    ids = [f["attributes"][OID] for f in layer.features]
    attributes = {
        wanted["outStatisticFieldName"]: (min if wanted["statisticType"] == "min" else max)(ids)
        for wanted in json.loads(params["outStatistics"])
    }
    return _answer(layer, {"features": [{"attributes": attributes}]})


def _select(layer: FakeLayer, params: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
    """The features a query asks for, and whether more matched than were returned."""
    if "objectIds" in params:
        wanted = {int(i) for i in params["objectIds"].split(",") if i}
        matched = [f for f in layer.features if f["attributes"][OID] in wanted]
        return matched[: layer.max_record_count], len(matched) > layer.max_record_count
    if "resultOffset" not in params:
        matched = _where(layer.features, params.get("where", "1=1"))
        return matched[: layer.max_record_count], len(matched) > layer.max_record_count
    offset = 0 if layer.ignore_offset else int(params.get("resultOffset", "0"))
    size = layer.max_record_count
    if "resultRecordCount" in params and not layer.ignore_record_count:
        size = min(size, int(params["resultRecordCount"]))
    page = layer.features[offset : offset + size]
    return page, offset + size < len(layer.features)


def _project(feature: dict[str, Any], out_fields: str) -> dict[str, Any]:
    if out_fields == "*":
        return feature
    wanted = {name.strip().lower() for name in out_fields.split(",")}
    attributes = {k: v for k, v in feature["attributes"].items() if k.lower() in wanted}
    return {**feature, "attributes": attributes}


def _json(body: dict[str, Any]) -> web.Response:
    # ArcGIS often labels JSON as text/plain; the client must not rely on the content type.
    return web.Response(text=json.dumps(body), content_type="text/plain")


def _answer(layer: FakeLayer, body: dict[str, Any]) -> web.Response:
    response = _json(body)
    if layer.gzip:
        response.enable_compression(web.ContentCoding.gzip)
    return response


def _error(code: int, message: str, *, status: int = 200) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": []}}
    return web.Response(status=status, text=json.dumps(body), content_type="text/plain")
