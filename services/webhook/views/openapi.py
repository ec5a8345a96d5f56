"""``/api/openapi.json``: the OpenAPI 3.1 document of the API, generated from
:data:`api.ENDPOINTS` and the pydantic models they answer with (never written by hand: a new
endpoint or field appears in it by being declared)."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from services.webhook.views.api import ENDPOINTS, Endpoint
from services.webhook.views.models import Id, Problem

REF = "#/components/schemas/{model}"
#: An id in a path: what ``params.integer_id`` accepts (the others are a 404).
_ID_SCHEMA = TypeAdapter(Id).json_schema()
_PLACEHOLDER = re.compile(r"\{(\w+)(?::[^{}]*)?\}")


def openapi_path(route: str) -> str:
    """aiohttp's ``/api/jobs/{job_id:\\d+}`` → OpenAPI's ``/api/jobs/{job_id}``."""
    return _PLACEHOLDER.sub(r"{\1}", route)


def _path_parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    found = []
    for match in _PLACEHOLDER.finditer(endpoint.route):
        name = match.group(1)
        numeric = "\\d+" in match.group(0)
        schema: dict[str, Any] = dict(_ID_SCHEMA) if numeric else {"type": "string"}
        description = "A source's name, e.g. us/ca/alameda (slashes as they are)" \
            if name == "name" else None
        parameter = {"name": name, "in": "path", "required": True, "schema": schema}
        if description:
            parameter["description"] = description
        found.append(parameter)
    return found


def _query_parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    if endpoint.query is None:
        return []
    schema = endpoint.query.model_json_schema(ref_template=REF)
    required = set(schema.get("required", []))
    found = []
    for name, field in schema["properties"].items():
        field = dict(field)
        description = field.pop("description", None)
        field.pop("title", None)
        parameter: dict[str, Any] = {"name": name, "in": "query",
                                     "required": name in required, "schema": field}
        if description:
            parameter["description"] = description
        found.append(parameter)
    return found


def _answer(model: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


@cache
def document() -> dict[str, Any]:
    """The whole document (built once: it changes only with the code)."""
    models = sorted({endpoint.answer for endpoint in ENDPOINTS} | {Problem},
                    key=lambda model: model.__name__)
    _, schemas = models_json_schema([(model, "serialization") for model in models],
                                    ref_template=REF)
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        responses = {"200": _answer(endpoint.answer.__name__, endpoint.summary)}
        if endpoint.query is not None:
            responses["400"] = _answer("Problem", "A parameter is not valid (it is named)")
        if endpoint.may_be_missing:
            responses["404"] = _answer("Problem", "There is no such thing")
        paths[openapi_path(endpoint.route)] = {"get": {
            "operationId": endpoint.name,
            "summary": endpoint.summary,
            "parameters": _path_parameters(endpoint) + _query_parameters(endpoint),
            "responses": responses,
        }}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OpenAddresses Machine",
            "version": "1",
            "description": "Jobs, runs, sets, sources and workers of the Machine. Lists page "
                           "by keyset: follow `next` (null on the last page).",
        },
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(document()), content_type="application/json")
