"""Reading query strings and path parts into typed values; a bad one is a 400 naming it, and a
path part no row can have is a 404.

Text PostgreSQL cannot hold (a NUL character) is refused here, at the door, for every query
value and every path part a view passes to SQL: asyncpg would otherwise fail the query and the
answer would be a 500.
"""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import urlencode

import pydantic
from aiohttp import web

from services.webhook.views.models import Id

M = TypeVar("M", bound=pydantic.BaseModel)

_ID = pydantic.TypeAdapter(Id)


def holds_in_text(value: str) -> bool:
    """Whether a PostgreSQL ``text`` can hold ``value``: anything but the NUL character."""
    return "\x00" not in value


def parse(request: web.Request, model: type[M]) -> M:
    """The query string as ``model``; empty values (a form's blank field) count as absent."""
    given = {name: value for name, value in request.query.items() if value != ""}
    for name, value in given.items():
        if not holds_in_text(name) or not holds_in_text(value):
            where = name if holds_in_text(name) else "query"
            raise web.HTTPBadRequest(text=f"{where}: a NUL character is not allowed")
    try:
        return model.model_validate(given)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "query"
        raise web.HTTPBadRequest(text=f"{where}: {first['msg']}") from exc


def integer_id(request: web.Request, name: str) -> int:
    """A numeric id from the path (the route's pattern allows digits only); one outside
    :data:`models.Id` (0, past PostgreSQL's bigint) means there is no such thing."""
    value = request.match_info[name]
    try:
        return _ID.validate_python(value)
    except pydantic.ValidationError as exc:
        shown = value if len(value) <= 30 else f"{value[:30]}…"
        raise web.HTTPNotFound(text=f"There is no {name.removesuffix('_id')} {shown}.") from exc


def path_text(value: str, missing: str) -> str:
    """``value``, a part of the path that a view looks up in SQL; a 404 saying ``missing`` when
    no row can have it (PostgreSQL's text cannot hold it)."""
    if not holds_in_text(value):
        raise web.HTTPNotFound(text=missing)
    return value


def next_link(path: str, given: pydantic.BaseModel, **cursor: object) -> str:
    """The address of the next page: ``path`` with the same filters and the new cursor."""
    values = given.model_dump(exclude_none=True, exclude_defaults=True)
    values.update(cursor)
    return f"{path}?{urlencode(values)}"
