"""Inline acceptance tests of a source entry (``test.acceptance-tests``).

Each test gives source field values (``inputs``) and the attribute values the conform must
make of them (``expected``). They run before any download: a one-row batch is built from the
inputs, evaluated and cleaned exactly as real rows are, and compared. The caller fails the run
with problem ``test_failed`` when any test fails.

As in the reference, a field the conform reads but the inputs leave out is missing (empty), an
attribute the conform does not set reads as ``""``, and an expected ``""`` matches a null.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from services.worker.conform.cleaning import clean
from services.worker.conform.fields import FieldResolver
from services.worker.conform.functions import Evaluator, attribute_specs, referenced_fields


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _input_batch(inputs: Mapping[str, Any], needed: set[str]) -> pa.RecordBatch:
    columns: dict[str, str | None] = {str(k): _as_text(v) for k, v in inputs.items()}
    given = FieldResolver(list(columns))
    for name in sorted(needed):
        if given.find(name) is None:
            columns[name] = None
    return pa.RecordBatch.from_pydict(
        {name: pa.array([value], pa.string()) for name, value in columns.items()}
    )


def _run_one(
    specs: Mapping[str, Any], needed: set[str], case: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Attribute -> (expected, actual) for every expected attribute that came out different."""
    inputs = case.get("inputs") or {}
    batch = _input_batch(inputs, needed)
    values = Evaluator(specs, batch.schema.names).evaluate(batch)
    mismatches: dict[str, tuple[str, str]] = {}
    for attribute, wanted in (case.get("expected") or {}).items():
        key = attribute.casefold()
        actual = clean(key, values[key])[0].as_py() if key in values else None
        expected = _as_text(wanted) or ""
        if (actual or "") != expected:
            mismatches[attribute] = (expected, actual or "")
    return mismatches


@dataclass(frozen=True)
class AcceptanceFailure:
    """One acceptance test that came out different: attribute -> (expected, actual)."""

    index: int  #: place in ``test.acceptance-tests`` (0-based, as in a JSON path)
    description: str
    mismatches: dict[str, tuple[str, str]]

    def __str__(self) -> str:
        details = "; ".join(
            f"{attribute}: expected {json.dumps(expected, ensure_ascii=False)}, "
            f"got {json.dumps(actual, ensure_ascii=False)}"
            for attribute, (expected, actual) in self.mismatches.items()
        )
        return f"acceptance test {self.description!r} failed: {details}"


@dataclass(frozen=True)
class AcceptanceResults:
    """How many acceptance tests of an entry ran, and which failed."""

    run: int
    failures: list[AcceptanceFailure]


def check_acceptance_tests(entry: Mapping[str, Any]) -> AcceptanceResults:
    """Run the entry's acceptance tests (none when there are none or ``enabled`` is false).

    A conform that cannot compile raises :class:`~services.worker.errors.ConformError` as the
    run would.
    """
    test = entry.get("test")
    if not isinstance(test, Mapping) or test.get("enabled", True) is False:
        return AcceptanceResults(0, [])
    cases = test.get("acceptance-tests") or []
    conform = entry.get("conform") or {}
    # lon/lat are geometry, which acceptance tests do not cover.
    specs = {k: v for k, v in attribute_specs(conform).items() if k not in ("lon", "lat")}
    needed = referenced_fields(specs)
    failures: list[AcceptanceFailure] = []
    for index, case in enumerate(cases):
        description = case.get("description") or f"test {index + 1}"
        mismatches = _run_one(specs, needed, case)
        if mismatches:
            failures.append(AcceptanceFailure(index, description, mismatches))
    return AcceptanceResults(len(cases), failures)


def run_acceptance_tests(entry: Mapping[str, Any]) -> list[str]:
    """Failure descriptions of the entry's acceptance tests; empty when all pass or none run."""
    return [str(failure) for failure in check_acceptance_tests(entry).failures]
