"""Every SQL statement the site runs, named and registered in one catalogue.

A page never builds SQL of its own: it runs a :class:`Query` declared at import time, so that
``tests/webhook/test_site_plans.py`` can ``EXPLAIN`` every one of them over a seeded database
and prove that none reads ``runs`` from end to end (and the site benchmark does the same at a
million runs). A query with optional filters is declared once per combination of filters
(:func:`variants`) rather than with ``$n IS NULL OR ...`` clauses, which PostgreSQL cannot
serve from an index once it switches the prepared statement to a generic plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.webhook.views.models import BIGINT_MAX

#: Every query of the site, by name.
CATALOGUE: dict[str, Query] = {}

#: The cursor of a first page (``id < NO_CURSOR``): the largest id a bigint holds.
NO_CURSOR = BIGINT_MAX


@dataclass(frozen=True)
class Query:
    """One named statement. ``sample`` names the arguments the plan test passes: each is a
    key into the test's seeded values (``job_id``, ``set_id``, ``source_path``...)."""

    name: str
    text: str
    sample: tuple[str, ...] = field(default=())

    async def fetch(self, db: asyncpg.Pool | asyncpg.Connection, *args: Any) -> list[Any]:
        return list(await db.fetch(self.text, *args))

    async def fetchrow(self, db: asyncpg.Pool | asyncpg.Connection, *args: Any) -> Any:
        return await db.fetchrow(self.text, *args)

    async def fetchval(self, db: asyncpg.Pool | asyncpg.Connection, *args: Any) -> Any:
        return await db.fetchval(self.text, *args)


def query(name: str, text: str, *sample: str) -> Query:
    """Declare and register a query."""
    if name in CATALOGUE:
        raise RuntimeError(f"two site queries are named {name!r}")
    declared = Query(name, text, tuple(sample))
    CATALOGUE[name] = declared
    return declared


@dataclass(frozen=True)
class Filter:
    """An optional condition: its SQL, with ``{}`` where its parameter goes, and the sample
    value the plan test passes for it; ``sample`` None: a condition without a parameter (the
    value given for it only says whether it applies)."""

    sql: str
    sample: str | None = None


def variants(
    name: str, template: str, filters: Mapping[str, Filter], *sample: str,
    exclusive: Iterable[frozenset[str]] = (),
) -> dict[frozenset[str], Query]:
    """One query per combination of ``filters``: ``template`` holds ``{where}``, where the
    chosen conditions go (each as ``AND condition``); their parameters are numbered after the
    template's own ``$1..$n`` (one per name in ``sample``). Filters named together in an
    ``exclusive`` set are never combined."""
    apart = list(exclusive)
    found: dict[frozenset[str], Query] = {}
    names = sorted(filters)
    for size in range(len(names) + 1):
        for chosen in itertools.combinations(names, size):
            key = frozenset(chosen)
            if any(len(key & group) > 1 for group in apart):
                continue
            number = len(sample)
            conditions, samples = [], []
            for item in chosen:
                condition = filters[item]
                if condition.sample is None:
                    conditions.append(condition.sql)
                    continue
                number += 1
                conditions.append(condition.sql.replace("{}", f"${number}"))
                samples.append(condition.sample)
            where = "".join(f" AND {condition}" for condition in conditions)
            label = f"{name}[{','.join(chosen)}]" if chosen else name
            found[key] = query(label, template.replace("{where}", where), *sample, *samples)
    return found


def pick(
    choices: Mapping[frozenset[str], Query], given: Mapping[str, Any]
) -> tuple[Query, list[Any]]:
    """The variant for the filters ``given`` (those not None or False) and the values of its
    parameters, in the order the variant numbers them."""
    present = sorted(name for name, value in given.items()
                     if value is not None and value is not False)
    chosen = choices[frozenset(present)]
    values = [given[name] for name in present if given[name] is not True]
    return chosen, values


#: The columns of a run as lists show it (``models.Run.of``): the error is cut to what a list
#: can show; of the state, only the feature count (a column of its own, migration 0007).
RUN_COLUMNS = """r.id, r.job_id, r.set_id, r.source_path, r.layer, r.entry_name, r.status,
       r.source_problem, left(r.error, 2000) AS error, r.attempt, r.worker, r.created_at,
       r.started_at, r.finished_at, r.features, r.outputs, r.warning"""
