"""Table tests of the value cleaning rules."""

from __future__ import annotations

import pyarrow as pa
import pytest

from services.worker.conform.arrays import ends_are_visible_ascii
from services.worker.conform.cleaning import clean


@pytest.mark.parametrize(
    ("attribute", "value", "expected"),
    [
        # every attribute is trimmed, Unicode whitespace included; empty is null
        ("street", "  Main St  ", "Main St"),
        ("city", "\u3000東京都\u3000", "東京都"),
        ("street", "Main St\u00a0", "Main St"),
        ("street", "\u2003Main St", "Main St"),
        ("street", "Main St\x0b", "Main St"),
        ("unit", "\t\n", None),
        ("city", "", None),
        ("region", None, None),
        # internal whitespace is kept, as the reference kept it
        ("street", "Rue  de   l'Église", "Rue  de   l'Église"),
        # house numbers lose one trailing ".0"
        ("number", "12.0", "12"),
        ("number", " 12.0 ", "12"),
        ("number", "12.5", "12.5"),
        ("number", "12.00", "12.00"),
        ("number", "12A", "12A"),
        ("number", ".0", None),
        ("addr_from_left", "100.0", "100"),
        ("addr_to_right", "198.0", "198"),
        # other attributes keep theirs
        ("postcode", "4700.0", "4700.0"),
        ("id", "5.0", "5.0"),
        # coordinates written with a decimal comma
        ("lon", " -71,2 ", "-71.2"),
        ("lat", "46.81", "46.81"),
        # accents and CJK untouched
        ("street", "Straße", "Straße"),
        ("number", "１２号", "１２号"),
    ],
)
def test_clean(attribute: str, value: str | None, expected: str | None) -> None:
    assert clean(attribute, pa.array([value], pa.string())).to_pylist() == [expected]


def test_clean_keeps_length_and_type_and_accepts_large_strings() -> None:
    values = pa.array(["1.0", None, " x ", ""], pa.large_string())
    cleaned = clean("number", values)
    assert cleaned.type == pa.string()
    assert cleaned.to_pylist() == ["1", None, "x", None]


def test_trimming_is_skipped_only_when_no_value_has_an_edge_to_trim() -> None:
    values = pa.array(["Main St", None, "", "Oak Ave ", "東京", "x"])
    assert ends_are_visible_ascii(values[0:3])
    assert not ends_are_visible_ascii(values[0:4])  # a trailing space
    assert not ends_are_visible_ascii(values[4:5])  # non-ASCII edges are left to the kernel
    assert ends_are_visible_ascii(values[5:6])
    assert ends_are_visible_ascii(pa.array([], pa.string()))
    assert ends_are_visible_ascii(pa.array([None, None], pa.string()))
    # the same rows cleaned in one batch or one at a time give the same values
    whole = clean("street", values).to_pylist()
    one_by_one = [clean("street", values[i:i + 1]).to_pylist()[0] for i in range(len(values))]
    assert whole == one_by_one
    assert whole == ["Main St", None, None, "Oak Ave", "東京", "x"]
