"""The attributes each layer's output carries, in output order."""

from __future__ import annotations

from typing import Final

from shared.messages import Layer

LAYER_ATTRIBUTES: Final[dict[Layer, tuple[str, ...]]] = {
    "addresses": (
        "number", "street", "unit", "city", "district", "region", "postcode", "id", "accuracy",
    ),
    "parcels": ("pid",),
    "buildings": ("id", "height", "levels"),
    "centerlines": (
        "id", "name", "oneway", "speed", "classification", "surface",
        "addr_from_left", "addr_to_left", "addr_from_right", "addr_to_right",
        "zip_left", "zip_right",
    ),
}

#: Column order of the addresses CSV, kept from the reference Machine for its consumers.
CSV_HEADER: Final[tuple[str, ...]] = (
    "LON", "LAT", "NUMBER", "STREET", "UNIT", "CITY", "DISTRICT", "REGION", "POSTCODE", "ID",
    "HASH",
)
