"""hash_rows: 16 hex characters, deterministic, independent of batch splits, sensitive to data."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import shapely
import xxhash

from services.worker.conform.hashing import hash_rows, row_bytes

ATTRIBUTES = {
    "number": pa.array(["12", "5", None, "7"]),
    "street": pa.array(["MAIN ST", 'Élysée, "Rd"', "OAK\nAVE", "MAIN ST"]),
    "unit": pa.array([None, None, "2", ""]),
}
LON = np.array([-122.4194155, 1.0, 0.0, -122.4194155])
LAT = np.array([37.7749, 2.0, 0.0, 37.7749])


def _slice(start: int, stop: int) -> tuple[dict[str, pa.Array], tuple[np.ndarray, np.ndarray]]:
    return {k: v[start:stop] for k, v in ATTRIBUTES.items()}, (LON[start:stop], LAT[start:stop])


def test_sixteen_lowercase_hex_characters_per_row() -> None:
    hashes = hash_rows(ATTRIBUTES, (LON, LAT))
    assert hashes.type == pa.string()
    assert hashes.null_count == 0
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes.to_pylist())


PINNED = "3a7789a648b21686"
ROW0 = b"12\x1fMAIN ST\x1f\x1f" + np.array([-122.4194155, 37.7749], dtype="<f8").tobytes()


def test_value_is_xxh3_64_of_the_documented_layout() -> None:
    assert row_bytes(*_slice(0, 1)).to_pylist() == [ROW0]
    assert hash_rows(*_slice(0, 1)).to_pylist() == [xxhash.xxh3_64_hexdigest(ROW0)]


def test_definition_is_pinned() -> None:
    # A literal, so that a change of algorithm, seed, byte order or layout cannot pass unseen:
    # published hashes would all change. Computed once with xxhash 4.1.0 (XXH3 of xxHash 0.8).
    assert hash_rows(*_slice(0, 1)).to_pylist() == [PINNED]


def test_many_rows_across_slices_match_one_by_one() -> None:
    count = 5000  # more than one slice of the loop
    numbers = pa.array([str(i) for i in range(count)])
    lon, lat = np.linspace(-1, 1, count), np.linspace(2, 3, count)
    hashes = hash_rows({"number": numbers}, (lon, lat)).to_pylist()
    rows = row_bytes({"number": numbers}, (lon, lat)).to_pylist()
    assert hashes == [xxhash.xxh3_64_hexdigest(row) for row in rows]


def test_same_hash_whatever_the_batch_split() -> None:
    whole = hash_rows(ATTRIBUTES, (LON, LAT)).to_pylist()
    for split in range(1, 4):
        head, tail = hash_rows(*_slice(0, split)), hash_rows(*_slice(split, 4))
        assert head.to_pylist() + tail.to_pylist() == whole


def test_same_hash_when_rerun_and_attribute_order_changes() -> None:
    reordered = {k: ATTRIBUTES[k] for k in reversed(list(ATTRIBUTES))}
    assert hash_rows(reordered, (LON, LAT)) == hash_rows(ATTRIBUTES, (LON, LAT))


def test_null_and_empty_string_hash_alike() -> None:
    # With the same number, rows 0 and 3 differ only in unit: null versus "".
    same_number = {**ATTRIBUTES, "number": pa.array(["7", "5", None, "7"])}
    hashes = hash_rows(same_number, (LON, LAT)).to_pylist()
    assert hashes[0] == hashes[3]


@pytest.mark.parametrize(
    ("column", "value"),
    [("number", "13"), ("street", "MAIN  ST"), ("unit", "1"), ("street", "main st")],
)
def test_any_attribute_change_changes_the_hash(column: str, value: str) -> None:
    changed = {**ATTRIBUTES, column: pa.array([value, *ATTRIBUTES[column].to_pylist()[1:]])}
    assert hash_rows(changed, (LON, LAT))[0] != hash_rows(ATTRIBUTES, (LON, LAT))[0]


def test_geometry_change_changes_the_hash() -> None:
    moved = LON.copy()
    moved[0] += 1e-7
    assert hash_rows(ATTRIBUTES, (moved, LAT))[0] != hash_rows(ATTRIBUTES, (LON, LAT))[0]


def test_values_cannot_shift_across_the_separator() -> None:
    # Without escaping, "a\x1f" + "b" and "a" + "\x1fb" would be the same bytes.
    first = {"number": pa.array(["a\x1f"]), "street": pa.array(["b"])}
    second = {"number": pa.array(["a"]), "street": pa.array(["\x1fb"])}
    point = (np.array([1.0]), np.array([2.0]))
    assert row_bytes(first, point) != row_bytes(second, point)
    assert hash_rows(first, point) != hash_rows(second, point)


def test_wkb_geometry_is_hashed() -> None:
    wkb = pa.array(shapely.to_wkb(shapely.points([[1.0, 2.0], [1.0, 2.5]])).tolist(), pa.binary())
    attributes = {"pid": pa.array(["P1", "P1"])}
    hashes = hash_rows(attributes, wkb).to_pylist()
    assert hashes[0] != hashes[1]
    assert hash_rows(attributes, wkb).to_pylist() == hashes


def test_empty_input_gives_empty_result() -> None:
    empty = hash_rows({"number": pa.array([], pa.string())}, (np.array([]), np.array([])))
    assert len(empty) == 0
    assert empty.type == pa.string()
