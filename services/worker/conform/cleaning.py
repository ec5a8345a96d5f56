"""Value cleaning applied to every attribute after the conform functions.

The reference Machine canonicalised a few address columns (``row_canonicalize_unit_and_number``):
number, street and unit were stripped of surrounding whitespace and a number ending in ``.0``
lost it, because house numbers often arrive through float columns (``"12.0"``). We apply the
same rules, widened where the reason holds just as well:

* every attribute is trimmed (Unicode whitespace), not only number/street/unit; an untrimmed
  city is never what the source meant;
* the ``.0`` rule applies to every attribute holding a house number, so also to the address
  ranges of centerlines;
* ``lon``/``lat`` written with a decimal comma are read with a point, as the reference did
  when it read coordinate columns;
* an empty value is null (the output writers turn it back into an empty cell).

Internal whitespace is left alone, as the reference left it.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from services.worker.conform.arrays import ends_are_visible_ascii, filled_everywhere

#: Attributes that hold house numbers.
HOUSE_NUMBER_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {"number", "addr_from_left", "addr_to_left", "addr_from_right", "addr_to_right"}
)
COORDINATE_ATTRIBUTES: Final[frozenset[str]] = frozenset({"lon", "lat"})

_NULL: Final = pa.scalar(None, pa.string())


def clean(attribute: str, values: pa.Array) -> pa.Array:
    """Cleaned ``pa.string()`` values of one attribute: trimmed, rules applied, empty as null."""
    if values.type != pa.string():
        values = values.cast(pa.string())
    if not ends_are_visible_ascii(values):
        values = pc.utf8_trim_whitespace(values)
    if attribute in HOUSE_NUMBER_ATTRIBUTES:
        # Only one ".0" goes, as in the reference; "12.00" is left for the source to fix.
        ends = pc.ends_with(values, ".0")
        if pc.any(ends).as_py():
            values = pc.if_else(ends, pc.utf8_slice_codeunits(values, 0, -2), values)
    elif attribute in COORDINATE_ATTRIBUTES:
        values = pc.replace_substring(values, ",", ".")
    if filled_everywhere(values):
        return values
    return pc.if_else(pc.equal(values, ""), _NULL, values)
