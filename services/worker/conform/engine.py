"""Raw batches in, conformed batches out: attributes, cleaning, geometry and hash.

Compiled once per run (field resolution, regexes, the transformer), then applied batch by
batch, so the per-row work is Arrow's and NumPy's vectorised kernels.

Older sources on geometry formats name their coordinates ``"lon": "X", "lat": "Y"``: the
reference turned every feature into a CSV row with ``X`` and ``Y`` columns (the point, or a
point inside a polygon or on a line, in the file's CRS) and conformed those like any field.
Here a file with geometry offers the two as fields when it has no attribute of that name (a
real attribute wins); ``lon``/``lat`` naming them take the geometry's point directly, and any
other spec naming them reads the numbers as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyproj

from services.worker.conform.cleaning import clean
from services.worker.conform.fields import FieldResolver
from services.worker.conform.functions import Evaluator
from services.worker.conform.geometry import (
    lonlat_from_columns,
    lonlat_from_wkb,
    reproject_wkb,
    round_coordinates,
    source_crs,
    valid_coordinates,
    xy_from_wkb,
)
from services.worker.conform.hashing import hash_rows
from services.worker.conform.layers import LAYER_ATTRIBUTES
from services.worker.errors import ConformError
from shared.messages import Layer

GEOMETRY = "__geometry__"
#: Keys under which the conform's lon/lat specs are evaluated: no layer has attributes of
#: these names, and an error in them names them as the conform does.
_LON, _LAT = "lon", "lat"
#: Fields a file with geometry offers from each feature's point (see the module docstring).
COORDINATE_FIELDS: Final = ("X", "Y")


class Conformer:
    """Turns the raw batches of one reader into conformed batches for one layer."""

    def __init__(
        self,
        layer: Layer,
        conform: Mapping[str, Any],
        fields: Sequence[str],
        file_crs: pyproj.CRS | None,
        *,
        has_geometry: bool,
    ) -> None:
        self.layer = layer
        self.attributes = LAYER_ATTRIBUTES[layer]
        specs: dict[str, Any] = {a: conform[a] for a in self.attributes if a in conform}
        resolver = FieldResolver(fields)
        #: Coordinate fields this file offers from its geometry (not shadowed by attributes).
        derived = [n for n in COORDINATE_FIELDS if has_geometry and resolver.find(n) is None]
        # A source with lon/lat specs takes its coordinates from them even when the file has
        # geometry (some CSV-like OGR sources carry an empty geometry column).
        self.from_columns = "lon" in conform and "lat" in conform
        if layer == "addresses" and self.from_columns:
            if _names_fields(conform["lon"], conform["lat"], derived):
                self.from_columns = False  # the geometry's own point, no detour through text
            else:
                specs[_LON] = conform["lon"]
                specs[_LAT] = conform["lat"]
        elif not has_geometry:
            message = "the data has no geometry and the conform names no lon and lat fields"
            raise ConformError("", message, message=message)
        self.evaluator = Evaluator(specs, [*fields, *derived])
        #: Derived coordinate fields some spec reads as text, added to each batch.
        self.derived_read = [n for n in derived if n in self.evaluator.columns]
        self.crs = source_crs(conform, file_crs)
        self.dropped_rows = 0

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """One raw batch to one conformed batch (rows without usable geometry dropped)."""
        if self.derived_read:
            batch = self._with_coordinate_fields(batch)
        values = self.evaluator.evaluate(batch)
        size = batch.num_rows
        attributes = {
            name: clean(name, values[name]) if name in values else pa.nulls(size, pa.string())
            for name in self.attributes
        }
        if self.layer == "addresses":
            return self._points(batch, values, attributes)
        return self._shapes(batch, attributes)

    def _with_coordinate_fields(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        x, y = xy_from_wkb(batch.column(GEOMETRY))
        for name, numbers in zip(COORDINATE_FIELDS, (x, y), strict=True):
            if name in self.derived_read:
                # Arrow prints the shortest text that reads back as the same double.
                text = pa.array(numbers, pa.float64(), from_pandas=True).cast(pa.string())
                batch = batch.append_column(name, text)
        return batch

    def _points(
        self, batch: pa.RecordBatch, values: dict[str, pa.Array], attributes: dict[str, pa.Array]
    ) -> pa.RecordBatch:
        if self.from_columns:
            lon, lat = lonlat_from_columns(values[_LON], values[_LAT], self.crs)
        else:
            lon, lat = lonlat_from_wkb(batch.column(GEOMETRY), self.crs)
        lon, lat = round_coordinates(lon, lat)
        keep = valid_coordinates(lon, lat)
        attributes, lon, lat = self._filter(keep, attributes, lon, lat)
        hashes = hash_rows(attributes, (lon, lat))
        columns = {**attributes, "hash": hashes, "lon": pa.array(lon), "lat": pa.array(lat)}
        return pa.RecordBatch.from_pydict(columns)

    def _shapes(self, batch: pa.RecordBatch, attributes: dict[str, pa.Array]) -> pa.RecordBatch:
        wkb = reproject_wkb(batch.column(GEOMETRY), self.crs)
        keep = np.asarray(wkb.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if not keep.all():
            self.dropped_rows += int((~keep).sum())
            mask = pa.array(keep)
            attributes = {name: array.filter(mask) for name, array in attributes.items()}
            wkb = wkb.filter(mask)
        hashes = hash_rows(attributes, wkb)
        return pa.RecordBatch.from_pydict({**attributes, "hash": hashes, GEOMETRY: wkb})

    def _filter(
        self,
        keep: np.ndarray,
        attributes: dict[str, pa.Array],
        lon: np.ndarray,
        lat: np.ndarray,
    ) -> tuple[dict[str, pa.Array], np.ndarray, np.ndarray]:
        if keep.all():
            return attributes, lon, lat
        self.dropped_rows += int((~keep).sum())
        mask = pa.array(keep)
        return {n: a.filter(mask) for n, a in attributes.items()}, lon[keep], lat[keep]


def _names_fields(lon: Any, lat: Any, fields: Sequence[str]) -> bool:
    """Whether ``lon`` and ``lat`` are exactly the derived X and Y fields (any case)."""
    if not isinstance(lon, str) or not isinstance(lat, str):
        return False
    derived = FieldResolver(fields)
    return derived.find(lon) == "X" and derived.find(lat) == "Y"
