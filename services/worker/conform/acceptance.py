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


def _run_one(specs: Mapping[str, Any], needed: set[str], case: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute -> (expected, actual) for every expected attribute that came out different."""
    inputs = case.get("inputs") or {}
    batch = _input_batch(inputs, needed)
    values = Evaluator(specs, batch.schema.names).evaluate(batch)
    mismatches: dict[str, Any] = {}
    for attribute, wanted in (case.get("expected") or {}).items():
        key = attribute.casefold()
        actual = clean(key, values[key])[0].as_py() if key in values else None
        expected = _as_text(wanted) or ""
        if (actual or "") != expected:
            mismatches[attribute] = (expected, actual or "")
    return mismatches


def run_acceptance_tests(entry: Mapping[str, Any]) -> list[str]:
    """Failure descriptions of the entry's acceptance tests; empty when all pass or none run.

    A conform that cannot compile raises ``RunError(..., "conform_failed")`` as the run would.
    """
    test = entry.get("test")
    if not isinstance(test, Mapping) or test.get("enabled", True) is False:
        return []
    cases = test.get("acceptance-tests") or []
    conform = entry.get("conform") or {}
    # lon/lat are geometry, which acceptance tests do not cover.
    specs = {k: v for k, v in attribute_specs(conform).items() if k not in ("lon", "lat")}
    needed = referenced_fields(specs)
    failures: list[str] = []
    for number, case in enumerate(cases, 1):
        description = case.get("description") or f"test {number}"
        mismatches = _run_one(specs, needed, case)
        if mismatches:
            details = "; ".join(
                f"{attribute}: expected {json.dumps(expected, ensure_ascii=False)}, "
                f"got {json.dumps(actual, ensure_ascii=False)}"
                for attribute, (expected, actual) in mismatches.items()
            )
            failures.append(f"acceptance test {description!r} failed: {details}")
    return failures
