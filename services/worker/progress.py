"""What a run is doing as it happens, for a person watching `oa-machine process-one`.

The run reports its real counters (bytes downloaded, rows read, rows conformed) and the stage
it is in to a :class:`Progress`. The worker service passes :data:`SILENT`; ``process-one`` on a
terminal passes a :class:`TerminalProgress`, which draws one tqdm line per stage on the
terminal and leaves each with its final figures when the next stage starts.
"""

from __future__ import annotations

import os
import time
from typing import Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    """Where a run reports its progress; every count is the total so far."""

    def stage(self, name: str) -> None:
        """The run enters stage ``name`` (download, unpack, conform, write)."""

    def downloaded(self, size_bytes: int) -> None: ...

    def read(self, rows: int) -> None:
        """Rows read from the data (called from the reading thread)."""

    def conformed(self, rows: int) -> None:
        """Rows through the conform, written or dropped."""

    def close(self) -> None: ...


class _Silent:
    def stage(self, name: str) -> None:
        pass

    def downloaded(self, size_bytes: int) -> None:
        pass

    def read(self, rows: int) -> None:
        pass

    def conformed(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


#: Reports nothing: the worker service, and `process-one` when not on a terminal.
SILENT: Progress = _Silent()


class TerminalProgress:
    """tqdm lines on ``stream``: bytes and rate while downloading, rows read and conformed
    per second while conforming, the time spent in the other stages."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: tqdm[None] | None = None
        self._stage = ""
        self._rows_read = 0
        self._rows_conformed = 0
        self._stage_started = time.monotonic()

    def stage(self, name: str) -> None:
        self.close()
        self._stage, self._stage_started = name, time.monotonic()
        if name == "download":
            self._bar = self._new(unit="B", unit_scale=True)
        elif name == "conform":
            self._bar = self._new(bar_format="{desc}")
            self._bar.set_description_str(self._rows_text(), refresh=True)
        else:
            self._bar = self._new(bar_format="{desc}: {elapsed}")

    def _new(self, **options: object) -> tqdm[None]:
        # A terminal that reports no size (some pseudo-terminals) would get empty lines.
        columns, lines = _size(self._stream)
        return tqdm(desc=self._stage, file=self._stream, leave=True,
                    dynamic_ncols=bool(columns), ncols=columns or 80, nrows=lines or 24,
                    **options)

    def downloaded(self, size_bytes: int) -> None:
        if self._bar is not None and self._stage == "download":
            self._bar.update(size_bytes - self._bar.n)

    def read(self, rows: int) -> None:
        # Only stored: the reading thread never draws; conformed() shows it.
        self._rows_read = rows

    def conformed(self, rows: int) -> None:
        self._rows_conformed = rows
        if self._bar is not None and self._stage == "conform":
            self._bar.set_description_str(self._rows_text(), refresh=False)
            self._bar.update(rows - self._bar.n)  # redraws at most every 0.1 s

    def _rows_text(self) -> str:
        elapsed_s = max(time.monotonic() - self._stage_started, 1e-9)
        read, done = self._rows_read, self._rows_conformed
        return (f"conform: {_number(read)} rows read ({_number(read / elapsed_s)}/s), "
                f"{_number(done)} conformed ({_number(done / elapsed_s)}/s)")

    def close(self) -> None:
        if self._bar is not None:
            if self._stage == "conform":
                self._bar.set_description_str(self._rows_text(), refresh=False)
            self._bar.close()
            self._bar = None


def _number(value: float) -> str:
    """``240``, ``12.3k``, ``1.02M``: whole numbers below a thousand stay whole."""
    return f"{value:.0f}" if value < 1000 else tqdm.format_sizeof(value)


def _size(stream: TextIO) -> tuple[int, int]:
    """Columns and lines of the terminal; zeros when it does not say."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return 0, 0
    return size.columns, size.lines
