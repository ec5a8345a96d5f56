"""What a conform value spec may read: the batch's columns and the variables set before it.

Three kinds of name, resolved once when a conform is compiled:

* a source field, case-insensitively (:class:`~services.worker.conform.fields.FieldResolver`);
* ``oa:<attribute>``: an attribute computed earlier in the conform, and ``oa:<variable>``: a
  ``chain`` variable, readable from the chain's first step on (``''`` until written);
* a chain variable by its plain name (``"field": "full_zip"``), as the reference read it: its
  chain stored each step's result in the row under that name, so from the chain's second step
  on, and in every spec after the chain, the name reads the variable. Before it is written
  (the chain's first step, or an earlier spec) it reads the source column of that name when
  there is one, else the variable (``''``). So a real column named like the variable is read
  until the variable is set, and the variable wins from then on.

Nothing here looks at data: ``Env`` is what the compiled steps read while a batch is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from services.worker.conform.fields import FieldResolver
from services.worker.errors import ConformError, RunError


@dataclass(frozen=True)
class Where:
    """Where in a conform a spec is: its attribute and the chain steps leading to it."""

    attribute: str
    steps: tuple[int, ...] = ()

    def step(self, number: int) -> Where:
        return Where(self.attribute, (*self.steps, number))

    def fail(self, message: str) -> ConformError:
        """The error for a spec at this place (raise it)."""
        path = "".join(f"chain step {n}: " for n in self.steps)
        return ConformError(self.attribute, path + message)


class Env:
    """What one batch's evaluation can read: its columns and the variables set so far."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.length: int = batch.num_rows
        self.variables: dict[str, pa.Array] = {}
        #: Results shared between specs within this batch, keyed by (pattern, column).
        self.cache: dict[tuple[str, str], list[pa.Array]] = {}
        self._names = set(batch.schema.names)

    def column(self, name: str) -> pa.Array:
        if name not in self._names:
            # A field declared by the reader but absent from this batch is missing everywhere.
            return pa.nulls(self.length, pa.string())
        values = self.batch.column(name)
        return values if values.type == pa.string() else values.cast(pa.string())

    def variable(self, key: str) -> pa.Array:
        found = self.variables.get(key)
        return found if found is not None else pa.repeat(pa.scalar("", pa.string()), self.length)


Step = Callable[[Env], pa.Array]
Compiler = Callable[[Mapping[str, Any], "Scope", Where], Step]


def variable_key(name: str) -> str:
    """The key a variable or attribute value is kept under while a batch is evaluated."""
    return "oa:" + name.casefold()


class Scope:
    """The names a spec may read at the point of the conform being compiled."""

    def __init__(self, resolver: FieldResolver) -> None:
        self.resolver = resolver
        #: ``oa:`` keys readable so far (attributes computed, chain variables declared).
        self.variables: set[str] = set()
        #: Chain variables (casefolded plain names) declared so far, and those written so far.
        self._declared: set[str] = set()
        self._written: set[str] = set()
        #: The source columns the compiled specs read.
        self.columns_read: set[str] = set()

    def declare(self, variable: str) -> None:
        """A chain starts writing ``variable``: ``oa:<variable>`` reads it from now on."""
        self.variables.add(variable_key(variable))
        self._declared.add(variable.casefold())

    def written(self, variable: str) -> None:
        """A chain step has written ``variable``: its plain name reads it from now on."""
        self._written.add(variable.casefold())

    def variable_of(self, name: str) -> str | None:
        """The variable key ``name`` reads, or None when it reads a source column."""
        folded = name.casefold()
        if folded in self.variables:
            return folded
        if folded in self._written:
            return variable_key(name)
        if folded in self._declared and self.resolver.find(name) is None:
            return variable_key(name)
        return None

    def column_of(self, name: str) -> str | None:
        """The column ``name`` reads, or None when it reads a variable (or nothing)."""
        return None if self.variable_of(name) is not None else self.resolver.find(name)

    def reader(self, name: Any, where: Where) -> Step:
        if not isinstance(name, str):
            raise where.fail(f"a field name must be a string, not {name!r}")
        key = self.variable_of(name)
        if key is not None:
            return lambda env: env.variable(key)
        try:
            column = self.resolver.resolve(name)
        except RunError as exc:
            raise where.fail(str(exc)) from None
        self.columns_read.add(column)
        return lambda env: env.column(column)
