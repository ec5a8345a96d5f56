"""The per-row ``hash`` of conformed output: 16 hex characters, deterministic.

The reference Machine hashed SHA-1 over a random-or-cache fingerprint plus the JSON of the *raw*
source row, so its hashes changed whenever the cache changed (or on every run when there was no
fingerprint). Ours depends only on what we publish: the conformed attribute values and the
geometry. The same data gives the same hash on every run, machine and batch split.

The digest is XXH3-64 (xxHash 0.8, seed 0), written as 16 lowercase hex characters in its
canonical big-endian order, i.e. ``xxhash.xxh3_64_hexdigest(row)``. It identifies rows; it is not
a security boundary. Version 1 of this module used the first 8 bytes of SHA-1: hashlib costs
~0.7 µs a row with the GIL held, the largest single cost of conforming a CSV; XXH3 costs ~0.15.

Byte layout hashed per row (unchanged since version 1)::

    v(attr_1) US v(attr_2) US ... US v(attr_n) US geometry-bytes

* attributes in sorted name order, so callers' mapping order does not matter;
* ``v`` is the value with ``ESC`` (0x1E) written ``ESC '0'`` and ``US`` (0x1F) written
  ``ESC '1'``; null and ``""`` both mean "empty" and hash the same;
* geometry bytes are the IEEE-754 little-endian float64 of lon then lat (exact, independent of
  any number formatting), or the WKB as given.

Because every value is escaped and the attribute count is fixed, the layout is injective, so
two rows hash alike only through a 64-bit hash collision (about 1 in 2**32 at 2**16 rows).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from services.worker.conform.arrays import value_bytes

_ESC = "\x1e"
_US = "\x1f"
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DIGEST_BYTES = 8  # 16 hex characters, as in the reference
_HASH_SLICE = 2048


def _has_framing_bytes(values: pa.Array) -> bool:
    """Whether any value holds ESC or US, by one pass over the data buffer (no copy)."""
    # ESC and US are 0x1E and 0x1F: after subtracting 0x1E (wrapping), exactly they are <= 1.
    return bool(((value_bytes(values) - np.uint8(0x1E)) <= 1).any())


def _escaped(values: pa.Array) -> pa.Array:
    """``values`` as strings with the two framing bytes escaped (nulls stay null: the row
    join writes them as empty, like ``""``)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.string())
    # Replacing is the identity when neither byte occurs, so skipping it is only a shortcut
    # and cannot make a value's encoding depend on its batch.
    if _has_framing_bytes(values):
        values = pc.replace_substring(values, _ESC, _ESC + "0")
        values = pc.replace_substring(values, _US, _ESC + "1")
    return values


def _point_bytes(lon: np.ndarray, lat: np.ndarray) -> pa.Array:
    """One 16-byte binary per row: lon and lat as little-endian float64."""
    count = len(lon)
    pairs = np.empty((count, 2), dtype="<f8")
    pairs[:, 0] = lon
    pairs[:, 1] = lat
    offsets = np.arange(0, 16 * (count + 1), 16, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(pairs)]
    )


def _geometry_bytes(geometry: pa.Array | tuple[np.ndarray, np.ndarray]) -> pa.Array:
    if isinstance(geometry, tuple):
        lon, lat = geometry
        return _point_bytes(np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64))
    if isinstance(geometry, pa.ChunkedArray):
        geometry = geometry.combine_chunks()
    return geometry.cast(pa.binary())


def _hex(digests: bytes, count: int) -> pa.Array:
    """Pack ``count`` concatenated 8-byte digests into a string array of hex, without a loop."""
    raw = np.frombuffer(digests, dtype=np.uint8)
    text = np.empty(raw.size * 2, dtype=np.uint8)
    text[0::2] = _HEX_DIGITS[raw >> 4]
    text[1::2] = _HEX_DIGITS[raw & 0x0F]
    offsets = np.arange(0, 2 * _DIGEST_BYTES * (count + 1), 2 * _DIGEST_BYTES, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(text)]
    )


def row_bytes(
    attributes: Mapping[str, pa.Array], geometry: pa.Array | tuple[np.ndarray, np.ndarray]
) -> pa.Array:
    """The exact bytes hashed for each row (exposed for tests and debugging)."""
    parts = [_escaped(attributes[name]).cast(pa.binary()) for name in sorted(attributes)]
    # The geometry goes last: with a fixed number of escaped values before it, the separators
    # before it are unambiguous even though its own bytes may contain anything.
    parts.append(_geometry_bytes(geometry))
    return pc.binary_join_element_wise(
        *parts, _US.encode(), null_handling="replace", null_replacement=b""
    )


def hash_rows(
    attributes: Mapping[str, pa.Array], geometry: pa.Array | tuple[np.ndarray, np.ndarray]
) -> pa.Array:
    """A 16-hex-character XXH3-64 per row over attribute values and geometry.

    ``geometry`` is ``(lon, lat)`` float arrays for addresses or a WKB array for other layers.
    Row order is kept; the result is a ``pa.string()`` array with no nulls.
    """
    joined = row_bytes(attributes, geometry)
    count = len(joined)
    if count == 0:
        return pa.array([], type=pa.string())
    digest = xxhash.xxh3_64_intdigest
    digests = np.empty(count, dtype=np.uint64)
    # The per-row cost is the C call itself. The loop holds the GIL without a break, so it
    # goes in slices: between them the run's other threads (reader, writer) get the GIL back.
    for start in range(0, count, _HASH_SLICE):
        values = joined.slice(start, _HASH_SLICE).to_pylist()
        digests[start:start + len(values)] = np.fromiter(
            map(digest, values), dtype=np.uint64, count=len(values)
        )
    # Big-endian bytes are the canonical form, the order of xxh3_64_hexdigest.
    return _hex(digests.astype(">u8").tobytes(), count)
