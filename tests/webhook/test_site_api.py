"""The JSON API against its own OpenAPI document: the document is valid OpenAPI 3.1, it
describes every API route the app serves, and every answer (200s over the seeded world, with
their filters and following pages, and the 400/404 errors) validates against the schema the
document gives for that path and status."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import jsonschema
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from services.webhook.views import api
from services.webhook.views.openapi import document, openapi_path
from tests.webhook.site_data import World

Client = TestClient[Any, Any]


def test_openapi_document_is_valid() -> None:
    doc = document()
    validate(doc)  # raises on an invalid document
    assert doc["openapi"] == "3.1.0"
    # Every endpoint is in it, with a schema for its answer generated from its model.
    for endpoint in api.ENDPOINTS:
        operation = doc["paths"][openapi_path(endpoint.route)]["get"]
        ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{endpoint.answer.__name__}"
        if endpoint.may_be_missing:
            assert "404" in operation["responses"]
        if endpoint.query is not None:
            names = {parameter["name"] for parameter in operation["parameters"]
                     if parameter["in"] == "query"}
            assert names == set(endpoint.query.model_fields)


async def test_openapi_document_is_served_and_covers_every_api_route(
    site: Client, site_world: World
) -> None:
    response = await site.get("/api/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    served = await response.json()
    assert served == document()
    # Every GET route under /api/ but the document itself (and the deliveries', which belong
    # to the hook) is described.
    routes = {openapi_path(resource.canonical) for resource in site.app.router.resources()
              if resource.canonical.startswith("/api/") and resource.canonical not in
              ("/api/", "/api/openapi.json", "/api/deliveries/{delivery_id}")}
    assert routes == set(served["paths"])


class Checker:
    """Validates answers against the document: the schema of (path template, status)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.templates = [(template, re.compile(
            "^" + re.sub(r"\\\{(\w+)\\\}", lambda m: r"(?P<" + m.group(1) + r">.+)" if
                         m.group(1) == "name" else r"(?P<" + m.group(1) + r">[^/]+)",
                         re.escape(template)) + "$"))
            for template in doc["paths"]]
        self.checked: dict[tuple[str, int], int] = {}

    def template_of(self, path: str) -> str:
        bare = path.split("?", 1)[0]
        found = [template for template, pattern in self.templates if pattern.match(bare)]
        # /api/sources/{name} matches anything under it; the most specific wins.
        assert found, f"{bare} is not in the document"
        return max(found, key=lambda template: len(template.replace("{name}", "")))

    async def get(self, client: Client, path: str, status: int = 200) -> Any:
        response = await client.get(path)
        body = await response.json()
        assert response.status == status, (path, body)
        template = self.template_of(path)
        responses = self.doc["paths"][template]["get"]["responses"]
        assert str(status) in responses, f"{template} does not document {status}"
        schema = dict(responses[str(status)]["content"]["application/json"]["schema"])
        schema["components"] = self.doc["components"]
        jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        ).validate(body)
        key = (template, status)
        self.checked[key] = self.checked.get(key, 0) + 1
        return body

    async def walk(self, client: Client, path: str) -> int:
        """Follow ``next`` to the end, checking every page; the number of pages."""
        pages = 0
        next_path: str | None = path
        while next_path:
            body = await self.get(client, next_path)
            next_path = body["next"]
            pages += 1
        return pages


async def test_every_api_answer_matches_the_document(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    checker = Checker(document())
    world = site_world
    await checker.get(site, "/api/summary")
    await checker.get(site, "/api/workers")
    await checker.get(site, "/api/schedule")  # no slot recorded yet
    await db_pool.execute(
        "INSERT INTO schedule_runs (slot_id, entry, slot_at, outcome, detail, finished_at)"
        " VALUES ('batch:x', 'batch', now(), 'done', 'set 1', now()),"
        "        ('collections:x', 'collections', now(), NULL, NULL, NULL)")
    schedule = await checker.get(site, "/api/schedule")
    assert [item["last"] is not None for item in schedule["entries"]] == [True, True, False]
    for path in ("/api/jobs?limit=1", "/api/jobs?state=running", "/api/jobs?state=failure",
                 "/api/jobs?repo=openaddresses/openaddresses&pr=7",
                 "/api/runs?limit=2", "/api/runs?status=open", "/api/runs?status=failure",
                 f"/api/runs?job={world.jobs['pr']}", f"/api/runs?set={world.sets['open']}",
                 "/api/runs?source=us/ks/lane&limit=2", "/api/sets?limit=1",
                 "/api/sources?limit=2", f"/api/sets/{world.sets['open']}?limit=2",
                 f"/api/sets/{world.sets['open']}?state=success",
                 f"/api/sets/{world.sets['open']}?problem=download_failed",
                 "/api/sources/us/ks/lane?limit=2", "/api/workers?limit=1"):
        assert await checker.walk(site, path) >= 1
    for job_id in world.jobs.values():
        await checker.get(site, f"/api/jobs/{job_id}")
    for run_id in world.runs.values():
        await checker.get(site, f"/api/runs/{run_id}")
    for set_id in world.sets.values():
        await checker.get(site, f"/api/sets/{set_id}")
    for name in ("us/ca/alameda", "zz/xss", "us/ks/new", "us/wa/skip"):
        await checker.get(site, f"/api/sources/{name}")
    # Errors: 404 for what is not there, 400 for a bad parameter (named).
    for path in ("/api/jobs/987654", "/api/runs/987654", "/api/sets/987654",
                 "/api/sources/xx/nowhere", f"/api/jobs/{2**63}", "/api/sources/us/k%00s"):
        await checker.get(site, path, status=404)
    for path in ("/api/jobs?state=lost", "/api/runs?limit=500", "/api/sets?before=0",
                 f"/api/sets/{world.sets['open']}?after=x", "/api/sources?limit=abc",
                 "/api/sources/us/ks/lane?before=-1", "/api/runs?job=1&source=us/x",
                 f"/api/runs?job={2**63}", f"/api/jobs?repo=a&pr={2**31}",
                 "/api/runs?source=us%00", "/api/workers?limit=0"):
        await checker.get(site, path, status=400)
    # Every path of the document was answered and checked, with a 200 each.
    assert {template for template, status in checker.checked if status == 200} == \
        set(document()["paths"])


def _past_its_type(schema: dict[str, Any]) -> str | None:
    """A number one past what a query parameter's schema allows; None for text."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "integer":
            return str(option["maximum"] + 1)
    return None


async def test_every_parameter_refuses_what_postgresql_cannot_take(
    site: Client, site_world: World
) -> None:
    """Each query parameter of each endpoint, as the document lists them: a NUL character,
    and for a number one past its maximum (every integer has one), is a 400 naming it; each
    path id past bigint, each name holding a NUL, is a 404. Every answer as documented."""
    checker = Checker(document())
    world = site_world
    examples = {"job_id": world.jobs["pr"], "run_id": world.runs["set_good"],
                "set_id": world.sets["open"], "name": "us/ks/lane"}
    for template, item in document()["paths"].items():
        parameters = item["get"]["parameters"]
        in_path = {parameter["name"]: parameter["schema"] for parameter in parameters
                   if parameter["in"] == "path"}
        good = template.format(**examples)
        for name, schema in in_path.items():
            bad = "us/ks/la%00ne" if schema["type"] == "string" else str(schema["maximum"] + 1)
            body = await checker.get(site, template.format(**{**examples, name: bad}), 404)
            assert body["error"].startswith("There is no "), (template, body)
        for parameter in (parameter for parameter in parameters if parameter["in"] == "query"):
            name = parameter["name"]
            past = _past_its_type(parameter["schema"])
            for value in ("1%00" if past else "us%00", past):
                if value is None:
                    continue
                body = await checker.get(site, f"{good}?{name}={value}", 400)
                assert body["error"].startswith(f"{name}: "), (template, name, value, body)
