"""Regional collections built from seeded runs in a real S3 API server (moto on loopback),
opened and checked member by member."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.scheduler.collect import LATEST_GOOD_RUNS, Collector, plan
from services.scheduler.packaging import GoodRun, collection_name
from shared.storage import S3Storage, Storage

HEADER = "LON,LAT,NUMBER,STREET,UNIT,CITY,DISTRICT,REGION,POSTCODE,ID,HASH"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
FREE = {"text": "Public domain", "attribution": False}
SHARE_ALIKE = {"url": "https://opendatacommons.org/licenses/odbl/", "share-alike": True,
               "attribution": True, "attribution name": "City of SF"}


def csv_rows(origin: tuple[float, float], count: int, street: str) -> list[str]:
    lon, lat = origin
    return [f"{lon + i * 0.001:.7f},{lat + i * 0.0005:.7f},{i},{street},,,,,,,h{i}"
            for i in range(count)]


def processed_zip(base: str, rows: list[str]) -> bytes:
    """As the worker writes it: README, VRT, then the CSV written through a stream."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        out.writestr("README.txt", "run readme\n")
        out.writestr(f"{base}.vrt", "<OGRVRTDataSource/>\n")
        with out.open(f"{base}.csv", "w", force_zip64=True) as member:
            member.write(("\r\n".join([HEADER, *rows]) + "\r\n").encode())
    return buffer.getvalue()


class World:
    """Runs seeded into the database and their outputs into storage."""

    def __init__(self, pool: asyncpg.Pool, storage: Storage, set_id: int, job_id: int) -> None:
        self.pool, self.storage, self.set_id, self.job_id = pool, storage, set_id, job_id
        self.rows: dict[int, list[str]] = {}
        self.clock = T0

    async def run(self, path: str, entry: str, *, status: str = "success",
                  license: Any = FREE, rows: list[str] | None = None, layer: str = "addresses",
                  warning: str | None = None, published: bool = True, zipped: bool = True,
                  features: list[str] | None = None) -> int:
        self.clock += timedelta(minutes=1)
        source = {"schema": 2, "coverage": {}, "layers": {layer: [
            {"name": entry, "license": license, "data": "http://example.invalid/x.csv",
             "protocol": "http", "conform": {"format": "csv"}}]}}
        count = len(rows if rows is not None else features or [])
        state: dict[str, Any] = {"feature count": count}
        if layer == "addresses":
            state["address count"] = count
        run_id = int(await self.pool.fetchval(
            """
            INSERT INTO runs (set_id, job_id, source_path, layer, entry_name, commit_sha,
                              source, status, warning, started_at, finished_at, state)
            VALUES ($1, $2, $3, $4, $5, 'abc123', $6, $7, $8, $9, $9, $10) RETURNING id
            """,
            self.set_id if published else None, None if published else self.job_id, path,
            layer, entry, source, status, warning, self.clock, state))
        outputs: dict[str, str] = {}
        if status == "success" and rows is not None:
            self.rows[run_id] = rows
            base = path.removeprefix("sources/").removesuffix(".json")
            if zipped:
                outputs["processed.zip"] = f"runs/{run_id}/processed.zip"
                await self.storage.put_bytes(outputs["processed.zip"], processed_zip(base, rows))
            else:
                outputs["out.csv"] = f"runs/{run_id}/out.csv"
                await self.storage.put_bytes(
                    outputs["out.csv"], ("\r\n".join([HEADER, *rows]) + "\r\n").encode())
        if status == "success" and features is not None:
            outputs["out.geojson"] = f"runs/{run_id}/out.geojson"
            await self.storage.put_bytes(outputs["out.geojson"],
                                         "".join(line + "\n" for line in features).encode())
        await self.pool.execute("UPDATE runs SET outputs = $2 WHERE id = $1", run_id, outputs)
        return run_id


@pytest.fixture
async def world(db_pool: asyncpg.Pool, s3_storage: S3Storage) -> World:
    set_id = await db_pool.fetchval(
        "INSERT INTO sets (created_at, finished_at, status) VALUES ($1, $1, 'done') RETURNING id",
        T0)
    job_id = await db_pool.fetchval(
        "INSERT INTO jobs (event, repo, sha) VALUES ('pull_request', 'oa/x', 'abc') RETURNING id")
    return World(db_pool, s3_storage, set_id, job_id)


async def open_zip(storage: Storage, key: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(await storage.get_bytes(key)))


def csv_body(archive: zipfile.ZipFile, name: str) -> list[str]:
    lines = archive.read(name).decode().split("\r\n")
    assert lines[0] == HEADER and lines[-1] == ""
    return lines[1:-1]


async def test_collections_member_by_member(world: World, s3_storage: S3Storage) -> None:
    ks_rows = csv_rows((-100.45, 38.45), 300, "MAIN ST")
    ks = await world.run("sources/us/ks/lane_county.json", "county", rows=ks_rows)
    sf = await world.run("sources/us/ca/san_francisco.json", "city", license=SHARE_ALIKE,
                         rows=csv_rows((-122.45, 37.75), 200, "MARKET ST"))
    # France: a good run, then a failed one and a warned one; the good one is collected.
    fr = await world.run("sources/fr/01/statewide.json", "state",
                         rows=csv_rows((5.25, 46.15), 150, "RUE"))
    await world.run("sources/fr/01/statewide.json", "state", status="failure")
    await world.run("sources/fr/01/statewide.json", "state", warning="fewer addresses",
                    rows=csv_rows((5.25, 46.15), 10, "RUE"))
    # Two entries of one source, the second from an older run without processed.zip.
    de_a = await world.run("sources/de/hh/statewide.json", "a",
                           rows=csv_rows((9.95, 53.55), 50, "STRASSE"))
    de_b = await world.run("sources/de/hh/statewide.json", "b", zipped=False,
                           rows=csv_rows((10.05, 53.65), 40, "WEG"))
    # A pull request's run is not published data.
    await world.run("sources/be/wal/x.json", "state", published=False,
                    rows=csv_rows((4.5, 50.5), 10, "RUE"))
    # Another layer: GeoJSON lines.
    parcels = [json.dumps({"type": "Feature", "properties": {"pid": str(i)},
                           "geometry": {"type": "Point", "coordinates": [-100.4, 38.4]}})
               for i in range(25)]
    ks_parcels = await world.run("sources/us/ks/lane_county.json", "county", layer="parcels",
                                 features=parcels)

    built = {b.name: b for b in await Collector(world.pool, s3_storage).build_all()}
    assert set(built) == {
        "openaddr-collected-global.zip", "openaddr-collected-global-sa.zip",
        "openaddr-collected-global-parcels.zip", "openaddr-collected-europe.zip",
        "openaddr-collected-north_america.zip", "openaddr-collected-north_america-sa.zip",
        "openaddr-collected-north_america-parcels.zip", "openaddr-collected-us_midwest.zip",
        "openaddr-collected-us_midwest-parcels.zip", "openaddr-collected-us_west-sa.zip",
    }

    glob = built["openaddr-collected-global.zip"]
    assert glob.run_ids == (de_a, de_b, fr, ks)
    assert glob.feature_count == 300 + 150 + 50 + 40
    assert glob.source_count == 3
    archive = await open_zip(s3_storage, glob.storage_key)
    assert archive.testzip() is None
    assert archive.namelist() == [
        "README.txt", "LICENSE.txt", "de/hh/statewide-a.csv", "de/hh/statewide-a.vrt",
        "de/hh/statewide-b.csv", "de/hh/statewide-b.vrt", "fr/01/statewide.csv",
        "fr/01/statewide.vrt", "us/ks/lane_county.csv", "us/ks/lane_county.vrt",
        "summary/global-summary.csv",
    ]
    for run_id, member in ((de_a, "de/hh/statewide-a.csv"), (de_b, "de/hh/statewide-b.csv"),
                           (fr, "fr/01/statewide.csv"), (ks, "us/ks/lane_county.csv")):
        assert csv_body(archive, member) == world.rows[run_id]
    assert 'SrcDataSource relativeToVRT="1">statewide-a.csv<' in archive.read(
        "de/hh/statewide-a.vrt").decode()
    # Copied, not recompressed: the member is the run's deflate stream, same CRC and size.
    source = zipfile.ZipFile(io.BytesIO(await s3_storage.get_bytes(f"runs/{ks}/processed.zip")))
    original = source.getinfo("us/ks/lane_county.csv")
    copied = archive.getinfo("us/ks/lane_county.csv")
    assert (copied.CRC, copied.compress_size) == (original.CRC, original.compress_size)

    readme = archive.read("README.txt").decode()
    assert "openaddr-collected-global.zip" in readme
    assert "Sources: 3. Entries: 4. Addresses: 540." in readme
    assert "abc123" in readme
    licence = archive.read("LICENSE.txt").decode()
    listed = [line.split(" ")[0] for line in licence.splitlines() if line and line[0] != " "]
    assert listed[1:] == ["de/hh/statewide-a", "de/hh/statewide-b", "fr/01/statewide",
                          "us/ks/lane_county"]
    assert "Licence: Public domain" in licence
    assert "san_francisco" not in licence and "be/wal" not in licence

    summary = list(csv.DictReader(io.StringIO(archive.read(
        "summary/global-summary.csv").decode())))
    assert sum(int(row["count"]) for row in summary) == 540
    cells = {(row["lon"], row["lat"]): int(row["count"]) for row in summary}
    # Lane County's 300 points from -100.45, 38.45 by 0.001/0.0005: 50 in the first cell.
    assert cells[("-100.5", "38.4")] == 50

    # Share-alike sources only in -sa, with their attribution.
    sa = await open_zip(s3_storage, built["openaddr-collected-global-sa.zip"].storage_key)
    assert [n for n in sa.namelist() if n.endswith(".csv")] == [
        "us/ca/san_francisco.csv", "summary/global-summary.csv"]
    assert csv_body(sa, "us/ca/san_francisco.csv") == world.rows[sf]
    sa_licence = sa.read("LICENSE.txt").decode()
    assert "credit: City of SF" in sa_licence and "Share-alike: yes" in sa_licence
    assert "share-alike licences" in sa.read("README.txt").decode()
    for name, item in built.items():
        if name.endswith("-sa.zip"):
            continue
        assert sf not in item.run_ids

    # Regions: Europe has France and Hamburg only, the US Midwest Kansas only.
    eu = await open_zip(s3_storage, built["openaddr-collected-europe.zip"].storage_key)
    assert [n for n in eu.namelist() if n.endswith(".csv")] == [
        "de/hh/statewide-a.csv", "de/hh/statewide-b.csv", "fr/01/statewide.csv",
        "summary/europe-summary.csv"]
    assert built["openaddr-collected-us_midwest.zip"].run_ids == (ks,)

    # Parcels: GeoJSON lines.
    layer = await open_zip(s3_storage,
                           built["openaddr-collected-global-parcels.zip"].storage_key)
    assert layer.namelist() == ["README.txt", "LICENSE.txt", "us/ks/lane_county.geojson"]
    assert layer.read("us/ks/lane_county.geojson").decode().splitlines() == parcels
    assert built["openaddr-collected-global-parcels.zip"].run_ids == (ks_parcels,)

    rows = await world.pool.fetch("SELECT * FROM collections ORDER BY id")
    assert {row["name"] for row in rows} == set(built)
    row = next(r for r in rows if r["name"] == "openaddr-collected-global.zip")
    assert (row["region"], row["layer"], row["share_alike"], row["size_bytes"],
            row["feature_count"], row["source_count"], row["sources_sha"]) == (
        "global", "addresses", False, glob.size_bytes, 540, 3, "abc123")
    assert await s3_storage.size_of(glob.storage_key) == glob.size_bytes


async def test_fallback_when_newest_failed_and_retention(world: World,
                                                         s3_storage: S3Storage) -> None:
    good = await world.run("sources/jp/tokyo.json", "city", rows=csv_rows((139.7, 35.6), 20, "X"))
    built = await Collector(world.pool, s3_storage).build_all(regions=["asia"])
    assert [(b.name, b.run_ids) for b in built] == [("openaddr-collected-asia.zip", (good,))]
    newer = await world.run("sources/jp/tokyo.json", "city",
                            rows=csv_rows((139.7, 35.6), 25, "Y"))
    second = await Collector(world.pool, s3_storage).build_all(regions=["asia"])
    assert second[0].run_ids == (newer,)
    # The newest fails: the previous good run is collected again.
    await world.run("sources/jp/tokyo.json", "city", status="failure")
    # Its good run's files were purged by the clean-up: the one before is taken.
    await world.pool.execute("UPDATE runs SET purged_at = now() WHERE id = $1", newer)
    third = await Collector(world.pool, s3_storage).build_all(regions=["asia"])
    assert third[0].run_ids == (good,)
    # The two newest files of the name are kept, the first build's is deleted.
    assert not await s3_storage.exists(built[0].storage_key)
    assert await s3_storage.exists(second[0].storage_key)
    assert await s3_storage.exists(third[0].storage_key)
    deleted = await world.pool.fetch(
        "SELECT storage_key FROM collections WHERE deleted_at IS NOT NULL")
    assert [row["storage_key"] for row in deleted] == [built[0].storage_key]


async def test_missing_output_is_left_out(world: World, s3_storage: S3Storage) -> None:
    kept = await world.run("sources/nz/a.json", "x", rows=csv_rows((174.7, -36.8), 5, "A"))
    lost = await world.run("sources/nz/b.json", "x", rows=csv_rows((174.7, -36.8), 5, "B"))
    await s3_storage.delete(f"runs/{lost}/processed.zip")
    built = await Collector(world.pool, s3_storage).build_all(regions=["oceania"])
    assert built[0].run_ids == (kept,)
    archive = await open_zip(s3_storage, built[0].storage_key)
    assert archive.testzip() is None
    assert "nz/b.csv" not in archive.namelist()


def test_plan_orders_and_names() -> None:
    def run(run_id: int, path: str, layer: str = "addresses", sa: bool = False) -> GoodRun:
        licence = {"share-alike": sa}
        source = {"layers": {layer: [{"name": "e", "license": licence}]}}
        outputs = {"processed.zip": "k", "out.geojson": "g"}
        return GoodRun(run_id, path, layer, "e", None, None, source, outputs, {})

    planned = plan([run(1, "sources/us/ny/a.json"), run(2, "sources/fr/b.json", sa=True),
                    run(3, "sources/fr/c.json", "buildings")])
    assert [p.name for p in planned] == [
        "openaddr-collected-global.zip", "openaddr-collected-global-sa.zip",
        "openaddr-collected-global-buildings.zip", "openaddr-collected-europe-sa.zip",
        "openaddr-collected-europe-buildings.zip", "openaddr-collected-north_america.zip",
        "openaddr-collected-us_northeast.zip"]
    assert collection_name("us_west", "centerlines", True) == (
        "openaddr-collected-us_west-centerlines-sa.zip")
    assert "site_published" in LATEST_GOOD_RUNS


async def test_collect_command_prints_key_size_and_count(
    settings: Any, db_pool: asyncpg.Pool
) -> None:
    from pathlib import Path
    from urllib.parse import urlsplit

    from services.scheduler.commands import collect_now
    from shared.storage import LocalStorage

    storage = LocalStorage(Path(urlsplit(settings.storage_url).path))
    set_id = await db_pool.fetchval(
        "INSERT INTO sets (created_at, finished_at, status) VALUES ($1, $1, 'done') RETURNING id",
        T0)
    seeded = World(db_pool, storage, set_id, 0)
    await seeded.run("sources/jp/tokyo.json", "city", rows=csv_rows((139.7, 35.6), 7, "X"))
    said: list[str] = []
    lines = await collect_now(settings, regions=["asia"], layers=None, maps=True,
                              say=said.append)
    assert lines == said
    key, size, count = said[0].split("\t")
    assert key.startswith("collections/") and key.endswith("/openaddr-collected-asia.zip")
    assert int(size) == await storage.size_of(key) and count == "7"
    assert [line.split("\t")[1] for line in said[1:]] == [
        "world.png", "us.png", "europe.png", "coverage.geojson"]
