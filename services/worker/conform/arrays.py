"""Arrow string arrays read and cut straight off their buffers, mostly without a kernel call.

Checking a batch's lengths is far cheaper than a kernel pass, so the conform and writer skip
work (a null-for-empty pass, the empty-skipping join) on batches where it would change nothing;
and row-wise operations Arrow has no kernel for (every row its own prefix) are done with numpy
over the UTF-8 bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def value_lengths(values: pa.Array) -> np.ndarray:
    """Byte length of each slot of a ``string``/``binary`` array (any offset), zero-copy."""
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    return np.diff(offsets[values.offset:values.offset + len(values) + 1])


def value_bytes(values: pa.Array) -> np.ndarray:
    """The bytes of a ``string``/``binary`` array's values (any offset), as a zero-copy uint8
    view."""
    data = values.buffers()[2]
    if data is None or len(values) == 0:
        return np.empty(0, dtype=np.uint8)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    start, end = int(offsets[values.offset]), int(offsets[values.offset + len(values)])
    return np.frombuffer(data, dtype=np.uint8)[start:end]


def count_filled(values: pa.Array) -> int:
    """How many values are neither null nor empty."""
    if values.null_count == len(values):
        return 0
    nonempty = value_lengths(values) > 0
    if values.null_count:
        # A null slot's length is usually 0, but the format allows any: mask it.
        nonempty &= values.is_valid().to_numpy(zero_copy_only=False)
    return int(np.count_nonzero(nonempty))


def filled_everywhere(values: pa.Array) -> bool:
    """Whether no value is null or empty (true for an empty array)."""
    if len(values) == 0:
        return True
    return values.null_count == 0 and bool(value_lengths(values).min() > 0)


def ends_are_visible_ascii(values: pa.Array) -> bool:
    """Whether every non-empty value starts and ends with a printable ASCII byte (0x21-0x7E),
    so trimming whitespace, ASCII or Unicode, would change nothing."""
    data = values.buffers()[2] if len(values) else None
    if data is None:
        return True
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    starts = offsets[values.offset:values.offset + len(values)]
    ends = offsets[values.offset + 1:values.offset + len(values) + 1]
    nonempty = ends > starts
    text = np.frombuffer(data, dtype=np.uint8)
    edges = np.concatenate([text[starts[nonempty]], text[ends[nonempty] - 1]])
    return bool(((edges - np.uint8(0x21)) < 0x5E).all())


def as_text(values: pa.Array) -> pa.Array:
    """Strings with nulls read as '' (the reference saw missing values as empty CSV cells)."""
    if values.type != pa.string():
        values = values.cast(pa.string())
    return pc.fill_null(values, "") if values.null_count else values


def utf8_bytes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64 rebased to this slice's rows, data bytes) of a null-free string array."""
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[
        values.offset : values.offset + len(values) + 1
    ].astype(np.int64)
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.empty(0, dtype=np.uint8)
    )
    return offsets, data


def is_ascii(values: pa.Array) -> bool:
    """Whether a null-free string array holds only ASCII, by one numpy pass over its bytes."""
    offsets, data = utf8_bytes(values)
    text = data[int(offsets[0]) : int(offsets[-1])] if len(offsets) else data[:0]
    return not len(text) or int(text.max()) < 0x80


def affix_matches(values: pa.Array, affixes: pa.Array, at_end: bool) -> np.ndarray:
    """Row-wise ``value.startswith(affix)`` (or endswith), compared as UTF-8 bytes.

    Arrow's starts_with takes one pattern for the whole array; here every row has its own.
    Byte comparison is exact because UTF-8 never lets one character's encoding end inside
    another's.
    """
    value_offsets, value_data = utf8_bytes(values)
    affix_offsets, affix_data = utf8_bytes(affixes)
    value_lengths = np.diff(value_offsets)
    affix_lengths = np.diff(affix_offsets)
    fits = affix_lengths <= value_lengths
    rows = np.nonzero(fits & (affix_lengths > 0))[0]
    counts = affix_lengths[rows]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    each_row = np.repeat(rows, counts)
    value_starts = value_offsets[1:] - affix_lengths if at_end else value_offsets[:-1]
    differs = (
        value_data[value_starts[each_row] + within]
        != affix_data[affix_offsets[:-1][each_row] + within]
    )
    mismatched = np.zeros(len(values), dtype=bool)
    mismatched[each_row[differs]] = True
    return np.asarray(fits & ~mismatched)


def cut_bytes(values: pa.Array, head: np.ndarray, tail: np.ndarray) -> pa.Array:
    """Drop ``head[i]`` bytes from the start and ``tail[i]`` from the end of row ``i``."""
    offsets, data = utf8_bytes(values)
    keep = np.diff(offsets) - head - tail
    new_offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    source = np.repeat(offsets[:-1] + head - new_offsets[:-1], keep) + np.arange(new_offsets[-1])
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(new_offsets.astype(np.int32)), pa.py_buffer(data[source])
    )
