"""Facts about Arrow string arrays read straight off their buffers, without a kernel call.

Checking a batch's lengths is far cheaper than a kernel pass, so the conform and writer skip
work (a null-for-empty pass, the empty-skipping join) on batches where it would change nothing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


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
