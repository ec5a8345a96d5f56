"""Coverage maps: where the sources' latest runs give good addresses, where they all fail, and
where there is no source; a world map, US and Europe close-ups (PNG) and a GeoJSON of the
covered areas. Drawn by the scheduler after each finished set (:func:`draw_coverage`).

An address source's area is the most precise its ``coverage`` gives (:func:`area_of`):

1. its own ``geometry`` (GeoJSON);
2. ``US Census`` ``geoid``: five digits a county, two a state (longer ones, places, are drawn
   as their state: the first two digits);
3. ``ISO 3166`` ``alpha2``: ``US-KS`` a state; ``FR`` a country; another subdivision
   (``FR-01``) its whole country, since no admin-1 boundaries outside the US are shipped;
4. ``country`` (and ``state`` for the US) written plainly, else the source path's country.

An area is *good* when one of its sources has a good run (the entries table's good run, of a
current entry), else *failed*. Failed areas are drawn first and good ones over them, so a good
county shows inside a failed state and a good state covers its failed counties. Shapes come
from :mod:`shared.boundaries`; drawing is Pillow's polygon fill on coordinates projected with
pyproj (Robinson for the world, Albers equal-area for the contiguous US, LAEA for Europe).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import numpy as np
import pyproj
import shapely
from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from shared import boundaries
from shared.logging import get_logger
from shared.regions import US_STATES, country_of, source_folders
from shared.storage import Storage

log = get_logger(__name__)

GOOD: Final = (46, 139, 87)
FAILED: Final = (214, 69, 65)
NONE: Final = (215, 215, 215)
WATER: Final = (255, 255, 255)
BORDER: Final = (120, 120, 120)
INK: Final = (30, 30, 30)
WIDTH_PX: Final = 2000
GEOJSON_NAME: Final = "coverage.geojson"
_FIPS_BY_POSTAL: Final = {state.postal: state.fips for state in US_STATES.values()}

#: Current address sources: each one's source document and whether any entry is good.
SOURCES = """
    SELECT e.source_path, bool_or(e.good_run_id IS NOT NULL) AS good,
           (array_agg(r.source ORDER BY r.id DESC))[1] AS source
    FROM entries e JOIN runs r ON r.id = e.run_id
    WHERE e.layer = 'addresses' AND e.finished_at >= (SELECT site_current_since())
    GROUP BY e.source_path
"""


@dataclass(frozen=True)
class View:
    """One map: its file name, title, projection and lon/lat extent."""

    file: str
    title: str
    crs: str
    bounds: tuple[float, float, float, float]


VIEWS: Final = (
    View("world.png", "world", "+proj=robin +datum=WGS84", (-180.0, -58.0, 180.0, 84.0)),
    View("us.png", "contiguous United States", "EPSG:5070", (-125.0, 24.0, -66.5, 49.5)),
    View("europe.png", "Europe", "EPSG:3035", (-25.0, 34.0, 45.0, 71.5)),
)


@dataclass
class Area:
    """A covered area: its key (``country:fr``, ``us-county:20101``...), shape and sources."""

    key: str
    name: str
    geometry: BaseGeometry = field(repr=False)
    sources: list[str] = field(default_factory=list)
    good: bool = False

    @property
    def status(self) -> str:
        return "good" if self.good else "failed"


def area_of(source_path: str, source: Mapping[str, Any] | None) -> tuple[str, str,
                                                                        BaseGeometry] | None:
    """The source's area as ``(key, name, geometry)``, or ``None`` when nothing places it."""
    coverage = (source or {}).get("coverage") or {}
    if not isinstance(coverage, Mapping):
        coverage = {}
    geometry = coverage.get("geometry")
    if isinstance(geometry, Mapping):
        try:
            shaped = shape(geometry)
            if not shaped.is_empty:
                return f"geometry:{source_path}", source_path, shapely.make_valid(shaped)
        except (ValueError, TypeError, AttributeError, KeyError, shapely.errors.GEOSException):
            pass
    census = coverage.get("US Census")
    if isinstance(census, Mapping) and census.get("geoid") is not None:
        geoid = str(census["geoid"]).strip()
        if len(geoid) == 5 and geoid in boundaries.us_counties():
            return (f"us-county:{geoid}", str(census.get("name") or geoid),
                    boundaries.us_counties()[geoid])
        if geoid[:2] in boundaries.us_states():
            return _us_state(geoid[:2])
    iso = coverage.get("ISO 3166")
    if isinstance(iso, Mapping) and isinstance(iso.get("alpha2"), str):
        country, _, subdivision = iso["alpha2"].lower().partition("-")
        if country == "us" and subdivision in _FIPS_BY_POSTAL:
            return _us_state(_FIPS_BY_POSTAL[subdivision])
        if country in boundaries.countries():
            return _country(country)
    plain = coverage.get("country")
    if isinstance(plain, str) and plain.lower() in boundaries.countries():
        state = coverage.get("state")
        if plain.lower() == "us" and isinstance(state, str) and state.lower() in _FIPS_BY_POSTAL:
            return _us_state(_FIPS_BY_POSTAL[state.lower()])
        return _country(plain.lower())
    country = country_of(source_path)
    if country == "us":
        folders = source_folders(source_path)
        if len(folders) >= 3 and folders[1] in _FIPS_BY_POSTAL:
            return _us_state(_FIPS_BY_POSTAL[folders[1]])
    if country is not None and country in boundaries.countries():
        return _country(country)
    return None


def _us_state(fips: str) -> tuple[str, str, BaseGeometry]:
    return f"us-state:{fips}", f"US state {fips}", boundaries.us_states()[fips]


def _country(code: str) -> tuple[str, str, BaseGeometry]:
    return f"country:{code}", code.upper(), boundaries.countries()[code]


def coverage_areas(sources: Iterable[tuple[str, Mapping[str, Any] | None, bool]]) -> list[Area]:
    """Areas of ``(source path, source document, good)``, one per key, sources merged."""
    areas: dict[str, Area] = {}
    for path, source, good in sources:
        found = area_of(path, source)
        if found is None:
            continue
        key, name, geometry = found
        area = areas.setdefault(key, Area(key, name, geometry))
        area.sources.append(path)
        area.good = area.good or good
    return sorted(areas.values(), key=lambda a: a.key)


# --- drawing --------------------------------------------------------------------------------


class _Frame:
    """Lon/lat → pixels for one view: the projection, then a scale to WIDTH_PX."""

    def __init__(self, view: View) -> None:
        self.view = view
        self._transformer = pyproj.Transformer.from_crs("EPSG:4326", view.crs, always_xy=True)
        west, south, east, north = view.bounds
        edge = shapely.segmentize(shapely.box(west, south, east, north), 0.5)
        ring = np.asarray(edge.exterior.coords)
        xs, ys = self._transformer.transform(ring[:, 0], ring[:, 1])
        self._minx, self._maxy = float(np.min(xs)), float(np.max(ys))
        self._scale = WIDTH_PX / (float(np.max(xs)) - self._minx)
        self.height_px = round((self._maxy - float(np.min(ys))) * self._scale)
        # Shapes are clipped a little outside the view before projecting: far-off parts of the
        # globe project badly in the close-ups' conic and azimuthal projections.
        whole = east - west >= 360
        self._clip = None if whole else (max(west - 15, -180.0), max(south - 10, -90.0),
                                         min(east + 15, 180.0), min(north + 10, 90.0))

    def project(self, geometry: BaseGeometry) -> BaseGeometry:
        clipped = geometry if self._clip is None else shapely.clip_by_rect(geometry, *self._clip)
        if clipped.is_empty:
            return clipped

        def to_pixels(points: np.ndarray) -> np.ndarray:
            xs, ys = self._transformer.transform(points[:, 0], points[:, 1])
            return np.column_stack(((np.asarray(xs) - self._minx) * self._scale,
                                    (self._maxy - np.asarray(ys)) * self._scale))

        return shapely.transform(clipped, to_pixels)


@functools.cache
def _frame(view: View) -> _Frame:
    return _Frame(view)


@functools.cache
def _projected_boundary(view: View, kind: str, key: str) -> BaseGeometry:
    # Boundary shapes are the same in every drawing: projected once per process.
    table = {"country": boundaries.countries, "us-state": boundaries.us_states,
             "us-county": boundaries.us_counties}[kind]()
    return _frame(view).project(table[key])


def _projected(view: View, area: Area) -> BaseGeometry:
    kind, _, key = area.key.partition(":")
    if kind == "geometry":
        return _frame(view).project(area.geometry)
    return _projected_boundary(view, kind, key)


def _fill(draw: ImageDraw.ImageDraw, geometry: BaseGeometry, colour: tuple[int, int, int],
          outline: tuple[int, int, int] | None = None) -> None:
    for part in shapely.get_parts(geometry):
        polygons = shapely.get_parts(part) if part.geom_type.startswith("Multi") else [part]
        for polygon in polygons:
            if polygon.geom_type != "Polygon" or polygon.is_empty:
                continue
            ring = np.asarray(polygon.exterior.coords)
            if len(ring) >= 3:
                draw.polygon([tuple(point) for point in ring.tolist()], fill=colour,
                             outline=outline)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_map(view: View, areas: list[Area], drawn_on: datetime) -> bytes:
    """One map as PNG bytes: countries in the no-source colour, failed then good areas over
    them, country borders, a legend and the date."""
    frame = _frame(view)
    image = Image.new("RGB", (WIDTH_PX, frame.height_px), WATER)
    draw = ImageDraw.Draw(image)
    countries = sorted(boundaries.countries(), key=lambda c: -boundaries.countries()[c].area)
    for code in countries:
        _fill(draw, _projected_boundary(view, "country", code), NONE)
    for good in (False, True):
        for area in areas:
            if area.good is good:
                _fill(draw, _projected(view, area), GOOD if good else FAILED)
    for code in countries:
        for polygon in shapely.get_parts(_projected_boundary(view, "country", code)):
            if polygon.geom_type == "Polygon" and not polygon.is_empty:
                draw.line([tuple(p) for p in np.asarray(polygon.exterior.coords).tolist()],
                          fill=BORDER, width=1)
    _legend(draw, view, frame.height_px, drawn_on)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _legend(draw: ImageDraw.ImageDraw, view: View, height_px: int, drawn_on: datetime) -> None:
    title, small = _font(30), _font(24)
    left, top = 30, height_px - 220
    draw.rectangle((left, top, left + 760, height_px - 20), fill=WATER, outline=BORDER, width=2)
    draw.text((left + 20, top + 12), f"OpenAddresses coverage: {view.title}", fill=INK,
              font=title)
    for row, (colour, label) in enumerate(((GOOD, "good data in the latest runs"),
                                           (FAILED, "every source failed"),
                                           (NONE, "no source"))):
        y = top + 60 + row * 36
        draw.rectangle((left + 20, y, left + 50, y + 26), fill=colour, outline=BORDER)
        draw.text((left + 64, y - 1), label, fill=INK, font=small)
    draw.text((left + 20, top + 170), f"Drawn {drawn_on:%Y-%m-%d %H:%M} UTC", fill=INK,
              font=small)


def coverage_geojson(areas: list[Area], drawn_on: datetime) -> bytes:
    """The covered areas as a GeoJSON FeatureCollection (WGS 84, simplified to ~1 km)."""
    features = []
    for area in areas:
        geometry = shapely.set_precision(area.geometry.simplify(0.01), 1e-5)
        features.append({
            "type": "Feature",
            "properties": {"area": area.key, "name": area.name, "status": area.status,
                           "sources": sorted(area.sources)},
            "geometry": mapping(geometry),
        })
    document = {"type": "FeatureCollection", "drawn_at": drawn_on.isoformat(),
                "features": features}
    return json.dumps(document, separators=(",", ":")).encode()


def draw_all(sources: Iterable[tuple[str, Mapping[str, Any] | None, bool]],
             drawn_on: datetime) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every map and the GeoJSON by file name, and the areas counted by status."""
    areas = coverage_areas(sources)
    files = {view.file: draw_map(view, areas, drawn_on) for view in VIEWS}
    files[GEOJSON_NAME] = coverage_geojson(areas, drawn_on)
    counts = {"good": sum(a.good for a in areas), "failed": sum(not a.good for a in areas),
              "countries_without_source": len(boundaries.countries()) - len(
                  {a.key for a in areas if a.key.startswith("country:")})}
    return files, counts


_CONTENT_TYPES: Final = {".png": "image/png", ".geojson": "application/geo+json"}


async def draw_coverage(pool: asyncpg.Pool, storage: Storage, *,
                        set_id: int | None = None) -> dict[str, str]:
    """Draw the maps from the current entries, store them, record a ``coverage_maps`` row
    (for ``set_id``, the finished set that made them due); returns file name → key."""
    rows = await pool.fetch(SOURCES)
    sources = [(row["source_path"], row["source"], bool(row["good"])) for row in rows]
    drawn_on = datetime.now(UTC)
    # Projection and drawing take seconds of CPU: on a thread, so the loop keeps answering.
    files, counts = await asyncio.to_thread(draw_all, sources, drawn_on)
    stamp = drawn_on.strftime("%Y%m%dT%H%M%S%fZ")
    keys = {}
    for name, data in files.items():
        key = f"coverage/{stamp}/{name}"
        content_type = _CONTENT_TYPES[name[name.rindex("."):]]
        await storage.put_bytes(key, data, content_type=content_type)
        keys[name] = key
    await pool.execute(
        "INSERT INTO coverage_maps (set_id, files, counts, drawn_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (set_id) DO NOTHING", set_id, keys, counts, drawn_on)
    log.info("coverage.drawn", set_id=set_id, sources=len(sources), **counts)
    return keys


NEWEST_SET_WITHOUT_MAPS = """
    SELECT s.id FROM sets s
    WHERE s.finished_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM coverage_maps c WHERE c.set_id = s.id)
      AND s.finished_at = (SELECT max(finished_at) FROM sets)
    LIMIT 1
"""


async def draw_if_due(pool: asyncpg.Pool, storage: Storage) -> int | None:
    """Draw the maps when the newest finished set has none yet; returns that set's id."""
    set_id = await pool.fetchval(NEWEST_SET_WITHOUT_MAPS)
    if set_id is None:
        return None
    await draw_coverage(pool, storage, set_id=set_id)
    return int(set_id)
