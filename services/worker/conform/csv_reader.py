"""Stream a delimited text file as raw Arrow batches of strings.

Conform keys read here:

``csvsplit``
    The delimiter (default ``,``). Quoting follows RFC 4180 (``"``, doubled to escape),
    values may hold newlines inside quotes.
``encoding``
    Any Python codec name (``CP949``, ``SHIFT_JISX0213``, ``ISO-8859-1``, ...). UTF-8 (with or
    without a byte-order mark) is decoded by Arrow itself; any other codec is recoded to UTF-8
    on the fly, a chunk at a time. Undecodable bytes become U+FFFD rather than failing the run:
    one stray byte in a national file should not cost every other address.
``headers``
    ``-1``: the file has no header row; columns are named ``COLUMN1..N`` from the width of the
    first row. ``N >= 1``: the header is physical line ``N`` (lines before it are skipped), as
    the reference Machine reads it. Absent or ``0``: the header is the first line after
    ``skiplines``.
``skiplines``
    Physical lines to skip before the header (or before the data when ``headers`` is ``-1``).
    When ``headers >= 1`` is also given, ``headers`` alone says where the header is; the
    reference requires the two to be equal in that case.

Rows whose column count differs from the header are skipped, counted in
:attr:`CsvReader.skipped_rows` and logged with their row number (the first few one by one,
then as a total when the file ends). The reference pads short rows with empty values and drops
long ones; a short row is just as likely to be a broken line as a row with empty trailing
fields, so both are skipped here, and the count makes the loss visible.

Empty cells stay empty strings (they are in the file); cleaning decides what empty means.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pyarrow as pa
import pyarrow.csv as pacsv
import pyproj
import structlog

from services.worker.errors import RunError

log = structlog.get_logger(__name__)

#: Arrow parses a CSV block by block and one row must fit in a block; the block grows
#: when a row does not fit, up to the maximum. Small blocks keep memory low: Arrow's
#: streaming reader reads several blocks ahead of the consumer, so peak memory is a multiple
#: of the block size (measured on 1M rows: Arrow's live bytes peak at 54 MiB with 1 MiB
#: blocks, 22 MiB with 256 KiB and 18 MiB with 128 KiB, at the same speed; on 3M rows 8 MiB
#: blocks peaked at 422 MiB RSS). The parsed blocks are regrouped into the run's batches.
INITIAL_BLOCK_BYTES = 256 << 10
MAX_BLOCK_BYTES = 1 << 30
#: Individual warnings for wrong-width rows before going quiet (the total is always logged).
_MAX_ROW_WARNINGS = 20
_RECODE_CHUNK_BYTES = 1 << 20
_UTF8_CODECS = frozenset({"utf-8", "utf-8-sig"})


class _Restart(Exception):
    """The stream must be reopened (bigger block or lenient decoding) and resumed."""


class Utf8Recoder(io.RawIOBase):
    """A read-only byte stream that recodes a file from ``encoding`` to UTF-8, chunk by chunk.

    Arrow's own transcoding fails on the first undecodable byte; this one replaces it.
    """

    def __init__(self, path: Path, encoding: str) -> None:
        super().__init__()
        self._raw = path.open("rb")
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._pending = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # Fill the whole buffer unless the file ends: Arrow takes one short read as a whole
        # block, and a block smaller than a row fails with "straddling object".
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._pending:
                if self._eof:
                    break
                chunk = self._raw.read(_RECODE_CHUNK_BYTES)
                self._eof = not chunk
                self._pending = self._decoder.decode(chunk, final=self._eof).encode("utf-8")
                continue
            size = min(len(view) - filled, len(self._pending))
            view[filled : filled + size] = self._pending[:size]
            self._pending = self._pending[size:]
            filled += size
        return filled

    def close(self) -> None:
        self._raw.close()
        super().close()


def _codec_name(encoding: str | None, path: Path) -> str:
    if not encoding:
        return "utf-8"
    try:
        return codecs.lookup(encoding).name
    except LookupError as exc:
        raise RunError(f"unknown encoding {encoding!r} for {path.name}", "conform_failed") from exc


def _lines_before_header(conform: Mapping[str, Any]) -> int:
    headers = int(conform.get("headers") or 0)
    skiplines = int(conform.get("skiplines") or 0)
    if headers >= 1:
        if skiplines and skiplines != headers:
            log.warning("csv.headers_skiplines_differ", headers=headers, skiplines=skiplines)
        return headers - 1
    return max(skiplines, 0)


class CsvReader:
    """A CSV file opened for streaming (see the module docstring for the conform keys)."""

    crs: pyproj.CRS | None = None
    geometry_type: str | None = None

    def __init__(self, path: Path, conform: Mapping[str, Any], *, batch_rows: int) -> None:
        self.path = path
        self.batch_rows = batch_rows
        #: Rows skipped because their column count differs from the header's.
        self.skipped_rows = 0
        self._delimiter = str(conform.get("csvsplit") or ",")
        if len(self._delimiter) != 1:
            raise RunError(
                f"csvsplit must be one character, got {self._delimiter!r} for {path.name}",
                "conform_failed",
            )
        self._codec = _codec_name(conform.get("encoding"), path)
        # Arrow decodes UTF-8 natively and fast; anything else, or UTF-8 that turns out
        # not to be, goes through Utf8Recoder.
        self._recode = self._codec not in _UTF8_CODECS
        self._no_header = int(conform.get("headers") or 0) == -1
        self._skip_lines = _lines_before_header(conform)
        self._block_bytes = INITIAL_BLOCK_BYTES
        # Row numbers of wrong-width rows are reported again after a restart; those at or
        # below this mark were counted before it.
        self._counted_through_row = 0
        self._seen_through_row = 0
        # Off while the header is read: that pass parses the first block, the data pass
        # parses it again.
        self._counting = False
        self._stream: pacsv.CSVStreamingReader | None = None
        self._source: io.RawIOBase | pa.NativeFile | None = None
        self.fields: list[str] = self._read_fields()
        self._counting = True

    # -- opening ---------------------------------------------------------------------------

    def _input(self) -> Any:
        if not self._recode:
            # An open file, not a path: given a path, Arrow picks a decompressor from the
            # extension, and a download named ".gz" may be plain text already (the client
            # inflated a Content-Encoding: gzip answer); archive.unpack decides compression.
            self._source = pa.OSFile(str(self.path), "rb")
            return self._source
        self._source = Utf8Recoder(self.path, self._codec)
        return pa.PythonFile(self._source, mode="r")

    def _open(self, *, names: list[str] | None) -> pacsv.CSVStreamingReader:
        """Open a fresh Arrow stream; ``names`` None reads (or generates) them from the file."""
        self._close_stream()
        read_options = pacsv.ReadOptions(
            skip_rows=self._skip_lines,
            block_size=self._block_bytes,
            # Threads would lose the row numbers of bad rows; the stream is serial anyway.
            use_threads=False,
            column_names=names if self._no_header else None,
            autogenerate_column_names=self._no_header and names is None,
        )
        parse_options = pacsv.ParseOptions(
            delimiter=self._delimiter,
            newlines_in_values=True,
            invalid_row_handler=self._on_invalid_row,
        )
        convert_options = pacsv.ConvertOptions(
            column_types=dict.fromkeys(names or [], pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        try:
            return self._guard(
                lambda: pacsv.open_csv(
                    self._input(),
                    read_options=read_options,
                    parse_options=parse_options,
                    convert_options=convert_options,
                )
            )
        except BaseException:
            self._close_stream()
            raise

    def _read_fields(self) -> list[str]:
        while True:
            try:
                stream = self._open(names=None)
            except _Restart:
                continue
            except pa.ArrowInvalid as exc:
                if "Empty CSV file" in str(exc):
                    return []
                raise self._error(exc) from exc
            names = list(stream.schema.names)
            self._close_stream()
            if self._no_header:
                return [f"COLUMN{n}" for n in range(1, len(names) + 1)]
            return self._unique(names)

    def _unique(self, names: list[str]) -> list[str]:
        """The header with each name once: batches are looked up by column name.

        The reference read rows as dicts, so of two columns named alike the last one answered
        to the name; it still does, and an earlier one is kept as ``NAME (n)``, ``n`` its
        1-based column number.
        """
        last = {name: index for index, name in enumerate(names)}
        if len(last) == len(names):
            return names
        unique = [n if last[n] == i else f"{n} ({i + 1})" for i, n in enumerate(names)]
        log.warning("csv.duplicate_columns", file=self.path.name,
                    renamed=[u for u, n in zip(unique, names, strict=True) if u != n])
        return unique

    # -- reading ---------------------------------------------------------------------------

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield batches of at most ``batch_rows`` rows (fewer when a 1 MiB block holds
        fewer), every column ``pa.string()``.

        Each call reads the file again from the start.
        """
        if not self.fields:
            return
        self.skipped_rows = 0
        self._counted_through_row = self._seen_through_row = 0
        schema = pa.schema([pa.field(name, pa.string()) for name in self.fields])
        emitted = 0
        while True:
            try:
                for batch in self._stream_from(emitted):
                    batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
                    for start in range(0, batch.num_rows, self.batch_rows):
                        piece = batch.slice(start, self.batch_rows)
                        emitted += piece.num_rows
                        yield piece
                break
            except _Restart:
                # Resume after the rows already handed out.
                self._counted_through_row = max(self._counted_through_row, self._seen_through_row)
                continue
        self._close_stream()
        if self.skipped_rows:
            log.warning(
                "csv.rows_skipped",
                file=self.path.name,
                rows=self.skipped_rows,
                reason="column count differs from the header",
            )

    def _stream_from(self, skip_rows: int) -> Iterator[pa.RecordBatch]:
        """The file's batches, dropping the first ``skip_rows`` data rows."""
        stream = self._open(names=self.fields)
        self._stream = stream
        while True:
            try:
                batch = self._guard(stream.read_next_batch)
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                raise self._error(exc) from exc
            if skip_rows >= batch.num_rows:
                skip_rows -= batch.num_rows
                continue
            if skip_rows:
                batch = batch.slice(skip_rows)
                skip_rows = 0
            yield batch

    def _guard(self, call: Any) -> Any:
        """Run an Arrow call; turn errors we can recover from into :class:`_Restart`."""
        try:
            return call()
        except pa.ArrowInvalid as exc:
            message = str(exc)
            if "straddling" in message or "straddles" in message:
                self._grow_block(exc)
                raise _Restart from exc
            if "invalid UTF8" in message and not self._recode:
                log.warning("csv.invalid_utf8", file=self.path.name, recoding="replace")
                self._recode = True
                raise _Restart from exc
            raise

    def _grow_block(self, exc: Exception) -> None:
        if self._block_bytes >= MAX_BLOCK_BYTES:
            raise RunError(
                f"a row of {self.path.name} is longer than {MAX_BLOCK_BYTES} bytes",
                "conform_failed",
            ) from exc
        self._block_bytes = min(self._block_bytes * 4, MAX_BLOCK_BYTES)
        log.info("csv.block_grown", file=self.path.name, block_bytes=self._block_bytes)

    def _on_invalid_row(self, row: pacsv.InvalidRow) -> str:
        if not self._counting:
            return "skip"
        number = row.number or 0
        self._seen_through_row = max(self._seen_through_row, number)
        if number and number <= self._counted_through_row:
            return "skip"
        self.skipped_rows += 1
        if self.skipped_rows <= _MAX_ROW_WARNINGS:
            log.warning(
                "csv.row_skipped",
                file=self.path.name,
                row=row.number,
                expected_columns=row.expected_columns,
                actual_columns=row.actual_columns,
                text=row.text[:200],
            )
        return "skip"

    def _error(self, exc: Exception) -> RunError:
        return RunError(f"cannot read {self.path.name} as CSV: {exc}", "conform_failed")

    # -- closing ---------------------------------------------------------------------------

    def _close_stream(self) -> None:
        self._stream = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def close(self) -> None:
        self._close_stream()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
