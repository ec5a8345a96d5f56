"""Coverage maps from fixture sources with each kind of coverage, drawn into a real S3 API
server: sizes, the three colours, the GeoJSON, and when the scheduler draws them."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from PIL import Image

from services.scheduler.coverage import (
    FAILED,
    GOOD,
    NONE,
    WIDTH_PX,
    area_of,
    draw_coverage,
    draw_if_due,
)
from shared.storage import S3Storage

SQUARE = {"type": "Polygon", "coordinates": [[[150, -30], [151, -30], [151, -29], [150, -29],
                                              [150, -30]]]}

AREAS = [
    # (source path, coverage, expected key)
    ("sources/au/x.json", {"geometry": SQUARE, "country": "au"}, "geometry:sources/au/x.json"),
    ("sources/us/ks/lane_county.json", {"US Census": {"geoid": "20101"}}, "us-county:20101"),
    ("sources/us/ks/statewide.json", {"US Census": {"geoid": "20"}}, "us-state:20"),
    ("sources/us/tx/city_of_mckinney.json", {"US Census": {"geoid": "4845744"}}, "us-state:48"),
    ("sources/us/ca/statewide.json", {"ISO 3166": {"alpha2": "US-CA"}}, "us-state:06"),
    ("sources/fr/countrywide.json", {"ISO 3166": {"alpha2": "FR"}}, "country:fr"),
    # No admin-1 outside the US: the whole country.
    ("sources/be/wal/region.json", {"ISO 3166": {"alpha2": "BE-WAL"}}, "country:be"),
    ("sources/de/hh/statewide.json", {"country": "de", "state": "hh"}, "country:de"),
    ("sources/us/mn/isanti.json", {"country": "us", "state": "mn"}, "us-state:27"),
    ("sources/jp/tokyo.json", {}, "country:jp"),
    ("sources/us/wi/marathon.json", {}, "us-state:55"),
    ("sources/xx/nowhere.json", {}, None),
]


@pytest.mark.parametrize(("path", "coverage", "key"), AREAS)
def test_area_of(path: str, coverage: dict[str, Any], key: str | None) -> None:
    found = area_of(path, {"coverage": coverage})
    assert (found[0] if found else None) == key
    if found:
        assert not found[2].is_empty


#: Pixels of each colour in the legend's swatch: a map shows an area only beyond these.
SWATCH_PX = 31 * 27


def colours(png: bytes) -> dict[tuple[int, int, int], int]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return {colour: count for count, colour in image.getcolors(maxcolors=1 << 22) or []}


async def seed(pool: asyncpg.Pool, sources: list[tuple[str, dict[str, Any], bool]]) -> int:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    set_id = int(await pool.fetchval(
        "INSERT INTO sets (created_at) VALUES ($1) RETURNING id", t0))
    for index, (path, coverage, good) in enumerate(sources):
        await pool.execute(
            """
            INSERT INTO runs (set_id, source_path, layer, entry_name, source, status,
                              finished_at, state)
            VALUES ($1, $2, 'addresses', 'e', $3, $4, $5, '{}')
            """,
            set_id, path, {"schema": 2, "coverage": coverage},
            "success" if good else "failure", t0 + timedelta(minutes=index + 1))
    await pool.execute("UPDATE sets SET finished_at = now(), status = 'done' WHERE id = $1",
                       set_id)
    return set_id


async def test_maps_and_geojson(db_pool: asyncpg.Pool, s3_storage: S3Storage) -> None:
    set_id = await seed(db_pool, [
        ("sources/us/ks/lane_county.json", {"US Census": {"geoid": "20101"}}, True),
        ("sources/us/ca/statewide.json", {"ISO 3166": {"alpha2": "US-CA"}}, False),
        ("sources/us/tx/statewide.json", {"ISO 3166": {"alpha2": "US-TX"}}, True),
        ("sources/fr/countrywide.json", {"ISO 3166": {"alpha2": "FR"}}, True),
        ("sources/de/hh/statewide.json", {"country": "de"}, False),
        ("sources/au/x.json", {"geometry": SQUARE}, True),
        # Two sources of one area: one good makes it good.
        ("sources/jp/a.json", {"ISO 3166": {"alpha2": "JP"}}, False),
        ("sources/jp/b.json", {"ISO 3166": {"alpha2": "JP"}}, True),
    ])
    assert await draw_if_due(db_pool, s3_storage) == set_id
    assert await draw_if_due(db_pool, s3_storage) is None  # drawn once per finished set
    row = await db_pool.fetchrow("SELECT * FROM coverage_maps")
    assert row["set_id"] == set_id
    assert set(row["files"]) == {"world.png", "us.png", "europe.png", "coverage.geojson"}
    assert row["counts"]["good"] == 5 and row["counts"]["failed"] == 2

    for name in ("world.png", "us.png", "europe.png"):
        png = await s3_storage.get_bytes(row["files"][name])
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width == WIDTH_PX
        assert 700 < image.height < 2000
        found = colours(png)
        for colour in (GOOD, FAILED, NONE):
            assert found.get(colour, 0) > 2 * SWATCH_PX, (name, colour)

    document = json.loads(await s3_storage.get_bytes(row["files"]["coverage.geojson"]))
    status = {f["properties"]["area"]: f["properties"]["status"]
              for f in document["features"]}
    assert status == {"us-county:20101": "good", "us-state:06": "failed", "country:fr": "good",
                      "us-state:48": "good",
                      "country:de": "failed", "geometry:sources/au/x.json": "good",
                      "country:jp": "good"}
    japan = next(f for f in document["features"] if f["properties"]["area"] == "country:jp")
    assert japan["properties"]["sources"] == ["sources/jp/a.json", "sources/jp/b.json"]
    assert japan["geometry"]["type"] == "MultiPolygon"


async def test_no_sources_still_draws(db_pool: asyncpg.Pool, s3_storage: S3Storage) -> None:
    keys = await draw_coverage(db_pool, s3_storage)
    png = await s3_storage.get_bytes(keys["world.png"])
    found = colours(png)
    assert found[NONE] > 100_000 and found[GOOD] <= SWATCH_PX and found[FAILED] <= SWATCH_PX
    document = json.loads(await s3_storage.get_bytes(keys["coverage.geojson"]))
    assert document["features"] == []


async def test_scheduler_draws_after_a_set_finishes(
    settings: Any, db_pool: asyncpg.Pool, s3_storage: S3Storage
) -> None:
    from services.scheduler.service import Scheduler

    scheduler = Scheduler(settings, pool=db_pool, storage=s3_storage)
    assert await scheduler.draw_maps() is None  # no finished set yet
    set_id = await seed(db_pool, [("sources/fr/a.json", {"ISO 3166": {"alpha2": "FR"}}, True)])
    assert await scheduler.draw_maps() == set_id
    assert await scheduler.draw_maps() is None
    assert await db_pool.fetchval("SELECT count(*) FROM coverage_maps") == 1
