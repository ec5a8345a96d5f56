"""Reading query strings and path parts into typed values; a bad one is a 400 naming it."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import urlencode

import pydantic
from aiohttp import web

M = TypeVar("M", bound=pydantic.BaseModel)


def parse(request: web.Request, model: type[M]) -> M:
    """The query string as ``model``; empty values (a form's blank field) count as absent."""
    given = {name: value for name, value in request.query.items() if value != ""}
    try:
        return model.model_validate(given)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "query"
        raise web.HTTPBadRequest(text=f"{where}: {first['msg']}") from exc


def integer_id(request: web.Request, name: str) -> int:
    """A numeric id from the path (the route's pattern allows digits only); too large for
    PostgreSQL's bigint means there is no such thing."""
    value = int(request.match_info[name])
    if value >= 2**63:
        raise web.HTTPNotFound(text=f"no {name.removesuffix('_id')} {value}")
    return value


def next_link(path: str, given: pydantic.BaseModel, **cursor: object) -> str:
    """The address of the next page: ``path`` with the same filters and the new cursor."""
    values = given.model_dump(exclude_none=True, exclude_defaults=True)
    values.update(cursor)
    return f"{path}?{urlencode(values)}"
