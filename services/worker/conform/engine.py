"""Raw batches in, conformed batches out: attributes, cleaning, geometry and hash.

Compiled once per run (field resolution, regexes, the transformer), then applied batch by
batch, so the per-row work is Arrow's and NumPy's vectorised kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyproj

from services.worker.conform.cleaning import clean
from services.worker.conform.functions import Evaluator
from services.worker.conform.geometry import (
    lonlat_from_columns,
    lonlat_from_wkb,
    reproject_wkb,
    round_coordinates,
    source_crs,
    valid_coordinates,
)
from services.worker.conform.hashing import hash_rows
from services.worker.conform.layers import LAYER_ATTRIBUTES
from services.worker.errors import RunError
from shared.messages import Layer

GEOMETRY = "__geometry__"
#: Keys under which the conform's lon/lat specs are evaluated (not attributes of any layer).
_LON, _LAT = "__lon__", "__lat__"


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
        # A source with lon/lat specs takes its coordinates from them even when the file has
        # geometry (some CSV-like OGR sources carry an empty geometry column).
        self.from_columns = "lon" in conform and "lat" in conform
        if layer == "addresses" and self.from_columns:
            specs[_LON] = conform["lon"]
            specs[_LAT] = conform["lat"]
        elif not has_geometry:
            raise RunError(
                "the data has no geometry and the conform names no lon and lat fields",
                "conform_failed",
            )
        self.evaluator = Evaluator(specs, list(fields))
        self.crs = source_crs(conform, file_crs)
        self.dropped_rows = 0

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """One raw batch to one conformed batch (rows without usable geometry dropped)."""
        values = self.evaluator.evaluate(batch)
        size = batch.num_rows
        attributes = {
            name: clean(name, values[name]) if name in values else pa.nulls(size, pa.string())
            for name in self.attributes
        }
        if self.layer == "addresses":
            return self._points(batch, values, attributes)
        return self._shapes(batch, attributes)

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
