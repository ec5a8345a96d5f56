"""A fake ArcGIS REST server on 127.0.0.1: layer metadata, counts, paging, object ids, tokens.

It behaves like the real thing where the dumper cares (and can misbehave the way real
servers do)::

    with FakeArcGIS().running() as arcgis:
        url = arcgis.add_layer("parcels", FakeLayer(features=[point_feature(1, 2.0, 3.0)]))
        # url is .../arcgis/rest/services/parcels/FeatureServer/0

or ``async with FakeArcGIS() as arcgis:`` on the test's loop. Requests are recorded in
``arcgis.requests``; ``arcgis.params(request)`` gives a request's query or form parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from tests.support.dataserver import AppServer, RecordedRequest

OID = "OBJECTID"
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
        app = web.Application()
        base = "/arcgis/rest/services/{name}/FeatureServer/0"
        app.router.add_route("*", base.removesuffix("/0"), self._service)
        app.router.add_route("*", base, self._metadata)
        app.router.add_route("*", base + "/query", self._query)
        return app

    async def _prologue(
        self, request: web.Request
    ) -> tuple[FakeLayer, dict[str, str]] | web.Response:
        recorded = await self.record(request)
        layer = self.layers.get(request.match_info["name"])
        if layer is None:
            return _error(400, "Invalid URL", status=404)
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
            return _answer(layer, {"count": len(layer.features) + layer.count_error})
        if params.get("returnIdsOnly") == "true":
            ids = [f["attributes"][OID] for f in layer.features]
            return _answer(layer, {"objectIdFieldName": OID, "objectIds": ids})
        if "resultOffset" in params and not layer.supports_pagination:
            return _error(400, "Pagination is not supported.")
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


def _select(layer: FakeLayer, params: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
    """The features a query asks for, and whether more matched than were returned."""
    if "objectIds" in params:
        wanted = {int(i) for i in params["objectIds"].split(",") if i}
        matched = [f for f in layer.features if f["attributes"][OID] in wanted]
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
