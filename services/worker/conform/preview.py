"""preview.png: the features of a run drawn on a plain background, from a bounded sample.

The writer feeds every batch into a :class:`PreviewSample`, which keeps a uniform reservoir
sample of point coordinates and of shape outlines, so memory stays flat however big the run.
:func:`render_preview` then draws that sample; there is no basemap and no network access.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import shapely

# Pillow is imported by render_preview, once the run's batches are written: its ~7 MiB are
# then not on top of the batches in flight.

PREVIEW_WIDTH_PX: Final = 1000
_MIN_HEIGHT_PX: Final = 200
_MAX_HEIGHT_PX: Final = 1600
_BACKGROUND: Final = (246, 244, 239)
_POINT_COLOUR: Final = (24, 84, 150)
_OUTLINE_COLOUR: Final = (190, 60, 40)
_MARGIN_FRACTION: Final = 0.05
_MIN_SPAN_DEG: Final = 0.002  # about 200 m: a lone point still gets a sensible frame
_ROBUST_MIN_COUNT: Final = 1000  # below this, percentiles would clip real features
_LOW_PERCENTILE: Final = 0.5
_HIGH_PERCENTILE: Final = 99.5
_MAX_OUTLINE_VERTICES: Final = 256
_DENSE_POINT_COUNT: Final = 100_000
_DRAW_CHUNK: Final = 65_536
_PNG_COMPRESS_LEVEL: Final = 3


def _reservoir_moves(
    rng: np.random.Generator, count: int, capacity: int, seen: int
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R for a whole batch at once: (source indices, destination slots).

    Items ``seen .. seen+count-1`` of the stream; the first ones fill empty slots, each later
    item ``i`` replaces slot ``j ~ U[0, i]`` when ``j < capacity``. numpy applies repeated slot
    assignments in order, so a later item wins exactly as in the sequential algorithm.
    """
    fill = max(0, min(count, capacity - seen))
    sources = np.arange(fill)
    slots = np.arange(seen, seen + fill)
    if fill < count:
        positions = np.arange(seen + fill, seen + count)
        draws = rng.integers(0, positions + 1)
        keep = draws < capacity
        sources = np.concatenate([sources, np.nonzero(keep)[0] + fill])
        slots = np.concatenate([slots, draws[keep]])
    return sources, slots


def _outline_parts(geometry: shapely.Geometry) -> list[np.ndarray]:
    """The lines to draw for one shape, each at most a few hundred vertices."""
    lines = geometry if shapely.get_dimensions(geometry) == 1 else shapely.boundary(geometry)
    parts: list[np.ndarray] = []
    for part in shapely.get_parts(lines):
        coordinates = shapely.get_coordinates(part)
        if len(coordinates) > _MAX_OUTLINE_VERTICES:
            # Decimate instead of simplifying: at preview scale one vertex in k is invisible,
            # and it bounds the memory of a single huge boundary.
            step = -(-len(coordinates) // _MAX_OUTLINE_VERTICES)
            coordinates = np.vstack([coordinates[::step], coordinates[-1:]])
        if len(coordinates) >= 2:
            parts.append(coordinates)
    return parts


@dataclass
class PreviewSample:
    """A bounded uniform sample of what a run wrote, for drawing."""

    max_points: int = 500_000
    max_shapes: int = 10_000
    seed: int = 20240601  # fixed, so the same data always gives the same picture
    points_seen: int = 0
    shapes_seen: int = 0
    #: Slots 0.._filled-1 of this buffer hold the sample; it grows by doubling.
    #: float32 (about a metre at longitude 180, far below a pixel): the reservoir of a big
    #: run then takes 4 MB instead of 8, and it is live while the batches stream.
    _points: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.float32))
    _filled: int = 0
    _shapes: list[list[np.ndarray]] = field(default_factory=list)
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def points(self) -> np.ndarray:
        """Sampled point coordinates, shape (k, 2), lon then lat."""
        return self._points[: self._filled]

    @property
    def outlines(self) -> list[np.ndarray]:
        """Sampled outline polylines, each shape (m, 2)."""
        return [part for shape in self._shapes for part in shape]

    def __len__(self) -> int:
        return self._filled + len(self._shapes)

    def add_points(self, lon: np.ndarray, lat: np.ndarray) -> None:
        coordinates = np.column_stack([lon, lat]).astype(np.float32)
        coordinates = coordinates[np.isfinite(coordinates).all(axis=1)]
        sources, slots = _reservoir_moves(
            self._rng, len(coordinates), self.max_points, self.points_seen
        )
        self.points_seen += len(coordinates)
        needed = int(slots.max()) + 1 if len(slots) else 0
        if needed > len(self._points):
            # Doubling: a copy per batch of the whole sample cost more than the sampling.
            capacity = min(self.max_points, max(needed, 2 * len(self._points)))
            grown = np.empty((capacity, 2), dtype=np.float32)
            grown[: self._filled] = self._points[: self._filled]
            self._points = grown
        self._filled = max(self._filled, needed)
        self._points[slots] = coordinates[sources]

    def add_geometries(self, geometries: np.ndarray) -> None:
        """Add shapely geometries: points go to the point sample, others to the outlines."""
        geometries = geometries[~shapely.is_missing(geometries) & ~shapely.is_empty(geometries)]
        is_point = shapely.get_dimensions(geometries) == 0
        if is_point.any():
            coordinates = shapely.get_coordinates(geometries[is_point])
            self.add_points(coordinates[:, 0], coordinates[:, 1])
        shapes = geometries[~is_point]
        sources, slots = _reservoir_moves(self._rng, len(shapes), self.max_shapes, self.shapes_seen)
        self.shapes_seen += len(shapes)
        # Per shape Python, but only for shapes entering the reservoir: ~capacity*ln(n/capacity).
        for source, slot in zip(sources.tolist(), slots.tolist(), strict=True):
            parts = _outline_parts(shapes[source])
            if slot == len(self._shapes):
                self._shapes.append(parts)
            else:
                self._shapes[slot] = parts


@dataclass(frozen=True)
class _Frame:
    """Maps lon/lat to pixels: equirectangular, x scaled by cos(mid latitude)."""

    min_lon: float
    max_lat: float
    x_scale: float
    scale: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    def pixels(self, coordinates: np.ndarray) -> np.ndarray:
        x = (coordinates[:, 0] - self.min_lon) * self.x_scale * self.scale + self.offset_x
        y = (self.max_lat - coordinates[:, 1]) * self.scale + self.offset_y
        return np.column_stack([x, y])


def _robust_bounds(coordinates: np.ndarray) -> tuple[float, float, float, float]:
    if len(coordinates) >= _ROBUST_MIN_COUNT:
        # One call sorts once for both; the values are the same as two calls.
        low, high = np.percentile(coordinates, [_LOW_PERCENTILE, _HIGH_PERCENTILE], axis=0)
    else:
        low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    return float(low[0]), float(low[1]), float(high[0]), float(high[1])


def _frame(coordinates: np.ndarray, width: int) -> _Frame:
    min_lon, min_lat, max_lon, max_lat = _robust_bounds(coordinates)
    centre_lon, centre_lat = (min_lon + max_lon) / 2, (min_lat + max_lat) / 2
    x_scale = max(np.cos(np.radians(np.clip(centre_lat, -85.0, 85.0))), 0.01)
    half_lon = max(max_lon - min_lon, _MIN_SPAN_DEG) * (0.5 + _MARGIN_FRACTION)
    half_lat = max(max_lat - min_lat, _MIN_SPAN_DEG) * (0.5 + _MARGIN_FRACTION)
    min_lon, max_lat = centre_lon - half_lon, centre_lat + half_lat
    span_x, span_y = 2 * half_lon * x_scale, 2 * half_lat
    height = int(np.clip(round(width * span_y / span_x), _MIN_HEIGHT_PX, _MAX_HEIGHT_PX))
    # When the height was clamped, fit the whole frame and centre it (letterbox).
    scale = min(width / span_x, height / span_y)
    return _Frame(
        min_lon=min_lon,
        max_lat=max_lat,
        x_scale=float(x_scale),
        scale=float(scale),
        offset_x=(width - span_x * scale) / 2,
        offset_y=(height - span_y * scale) / 2,
        width=width,
        height=height,
    )


def _draw_points(canvas: np.ndarray, pixels: np.ndarray, *, dense: bool | None = None) -> None:
    """Small dots set straight into the pixel array (a draw call per point would be slow).

    2x2 px while sparse; 1 px once there are enough points to fill an area by themselves
    (``dense``: whether the whole sample is that big, when ``pixels`` is a slice of it).
    """
    if dense is None:
        dense = len(pixels) > _DENSE_POINT_COUNT
    height, width = canvas.shape[:2]
    x = np.floor(pixels[:, 0]).astype(np.int64)
    y = np.floor(pixels[:, 1]).astype(np.int64)
    offsets = ((0, 0),) if dense else ((0, 0), (1, 0), (0, 1), (1, 1))
    for dx, dy in offsets:
        xs, ys = x + dx, y + dy
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        canvas[ys[inside], xs[inside]] = _POINT_COLOUR


def render_preview(sample: PreviewSample, path: Path, width: int = PREVIEW_WIDTH_PX) -> None:
    """Draw ``sample`` into a PNG at ``path``; raises ValueError when the sample is empty."""
    from PIL import Image, ImageDraw

    outlines = sample.outlines
    coordinates = np.vstack([sample.points, *outlines]) if outlines else sample.points
    if not len(coordinates):
        raise ValueError("nothing to draw: the preview sample is empty")
    frame = _frame(coordinates, width)
    canvas = np.empty((frame.height, frame.width, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND
    points = sample.points
    dense = len(points) > _DENSE_POINT_COUNT
    # In slices, so the pixel arrays of a 500,000-point sample never exist all at once.
    for start in range(0, len(points), _DRAW_CHUNK):
        _draw_points(canvas, frame.pixels(points[start : start + _DRAW_CHUNK]), dense=dense)
    image = Image.fromarray(canvas)
    if outlines:
        draw = ImageDraw.Draw(image)
        for line in outlines:
            draw.line([tuple(p) for p in frame.pixels(line).tolist()], fill=_OUTLINE_COLOUR)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Level 3 of zlib: a third of the time of the default 6 for a file ~20 % bigger; the
    # pixels are the same.
    image.save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
