"""Case-insensitive field resolution over an Arrow schema.

Source authors write field names in whatever case they saw in a viewer, and the reference
Machine lowercased every name on both sides before looking anything up. We keep the file's own
names in the batches and resolve each conform name once, before the first batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from services.worker.errors import RunError

#: Columns the readers add themselves; never offered to a conform as a source field.
_INTERNAL_COLUMNS: Final[frozenset[str]] = frozenset({"__geometry__"})


class FieldResolver:
    """Case-insensitive field lookup over an Arrow schema.

    An exact match wins over a case-insensitive one.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._names: tuple[str, ...] = tuple(n for n in names if n not in _INTERNAL_COLUMNS)
        self._exact: frozenset[str] = frozenset(self._names)
        self._folded: dict[str, str] = {}
        for name in self._names:
            # The first of two names that differ only in case wins: the file's column order
            # is the only stable tie-break we have.
            self._folded.setdefault(name.casefold(), name)

    @property
    def names(self) -> tuple[str, ...]:
        """The source fields, in file order."""
        return self._names

    def find(self, name: str) -> str | None:
        """The actual column name for ``name``, or None when the source has no such field."""
        if name in self._exact:
            return name
        return self._folded.get(name.casefold())

    def resolve(self, name: str) -> str:
        """The actual column name for ``name``; a ``conform_failed`` RunError when it is missing."""
        found = self.find(name)
        if found is None:
            available = ", ".join(repr(n) for n in self._names) or "(none)"
            raise RunError(
                f"conform names field {name!r}, which the source does not have; "
                f"available fields: {available}",
                "conform_failed",
            )
        return found
