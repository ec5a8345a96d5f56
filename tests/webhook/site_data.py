"""A small, complete world for the site's tests: sets, jobs, runs in every state, workers, and
every output file of every run in storage (so that no link on any page leads nowhere).

Among the sources is one written to attack the pages: its entry is named
``<script>alert(1)</script>`` and its runs' messages carry markup.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from PIL import Image

from shared.storage import Storage

XSS = "<script>alert(1)</script>"
XSS_PATH = "sources/zz/xss.json"
REPO = "openaddresses/openaddresses"
NOW = datetime.now(UTC).replace(microsecond=0)


def _png() -> bytes:
    image = Image.new("RGB", (60, 40), "white")
    for x in range(10, 50, 7):
        image.putpixel((x, 20), (31, 111, 235))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


PNG = _png()


def _zip(csv: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("out.csv", csv)
        archive.writestr("README.txt", "demo\n")
    return out.getvalue()


def source_doc(layer: str, name: str) -> dict[str, Any]:
    entry = {"name": name, "data": "http://example.org/data.csv", "protocol": "http",
             "conform": {"format": "csv", "number": "N", "street": "S", "lon": "X", "lat": "Y"}}
    return {"schema": 2, "coverage": {"country": "us"}, "layers": {layer: [entry]}}


@dataclass
class World:
    """The ids the tests look for."""

    sets: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)


async def _files(storage: Storage, run_id: int, features: int, *, problem: str | None,
                 log: str) -> dict[str, str]:
    """Write a run's outputs; returns ``outputs`` as the worker reports them."""
    csv = b"LON,LAT,NUMBER,STREET\r\n" + b"-122.1,37.8,1,Elm St\r\n" * max(features, 0)
    files: dict[str, bytes] = {"output.txt": log.encode(), "index.json": b"{}"}
    if problem is None:
        files.update({
            "out.csv": csv, "processed.zip": _zip(csv), "preview.png": PNG,
            "out.geojson": b'{"type": "Feature", "geometry": null, "properties": {}}\n',
            "sample.json": json.dumps([["N", "S", "X", "Y"], ["1", "Elm <b>St</b>", "-122.1",
                                                              "37.8"]]).encode(),
        })
    outputs = {}
    for name, data in files.items():
        key = f"runs/{run_id}/{name}"
        await storage.put_bytes(key, data)
        outputs[name] = key
    return outputs


async def add_run(
    pool: asyncpg.Pool, storage: Storage, *, source_path: str, layer: str = "addresses",
    entry: str = "county", job_id: int | None = None, set_id: int | None = None,
    status: str | None = "success", features: int = 120, problem: str | None = None,
    error: str | None = None, started: datetime | None = None,
    finished: datetime | None = None, with_files: bool = True,
) -> int:
    """One run, its files in storage, its index.json as state."""
    finished = finished if finished is not None or status is None else NOW
    started = started if started is not None or finished is None else \
        finished - timedelta(seconds=42)
    run_id: int = await pool.fetchval(
        """
        INSERT INTO runs (job_id, set_id, source_path, layer, entry_name, commit_sha, source,
                          started_at, queued_at, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING id
        """,
        job_id, set_id, source_path, layer, entry, "c" * 40, source_doc(layer, entry), started,
        (started or NOW) - timedelta(seconds=5),
    )
    if status is None:
        return run_id
    outputs = {}
    if with_files:
        outputs = await _files(storage, run_id, features if status == "success" else 0,
                               problem=problem,
                               log=f"run {run_id} of {source_path} <b>log</b>\nline 2\n")
    state = {
        "source": source_path, "layer": layer, "name": entry, "cache": "cache.csv",
        "sample": "sample.json" if status == "success" else None,
        "geometry type": "Point", "version": "20261203", "fingerprint": "f" * 32,
        "cache time": 1.5, "process time": 2.25, "output": "output.txt",
        "processed": "out.csv" if status == "success" else None,
        "preview": "preview.png" if status == "success" else None,
        "attribution required": True, "attribution name": "County <GIS>",
        "share-alike": False, "code version": "0.1.0", "source problem": problem,
        "feature count": features if status == "success" else None,
        "address count": features if status == "success" and layer == "addresses" else None,
    }
    await pool.execute(
        """
        UPDATE runs SET status = $2, source_problem = $3, error = $4, outputs = $5,
               state = $6, finished_at = $7, worker = 'worker-1'
        WHERE id = $1
        """,
        run_id, status, problem, error, outputs, state, finished,
    )
    return run_id


async def seed_world(pool: asyncpg.Pool, storage: Storage) -> World:
    world = World()
    old = NOW - timedelta(days=14)
    world.sets["old"] = await pool.fetchval(
        "INSERT INTO sets (kind, created_at, finished_at, status) "
        "VALUES ('weekly', $1, $2, 'success') RETURNING id", old, old + timedelta(hours=5))
    world.sets["open"] = await pool.fetchval(
        "INSERT INTO sets (kind, created_at) VALUES ('weekly', $1) RETURNING id",
        NOW - timedelta(hours=1))
    entries = [("sources/us/ca/alameda.json", "county"), ("sources/us/ks/lane.json", "county"),
               ("sources/us/ks/lane.json", "city"), (XSS_PATH, XSS)]
    for path, name in entries:
        await add_run(pool, storage, source_path=path, entry=name, set_id=world.sets["old"],
                      features=1000, finished=old + timedelta(hours=2))
    open_set = world.sets["open"]
    world.runs["set_good"] = await add_run(
        pool, storage, source_path="sources/us/ca/alameda.json", set_id=open_set,
        features=1_234_567)
    # A regression: a tenth fewer features than the set before.
    world.runs["set_regression"] = await add_run(
        pool, storage, source_path="sources/us/ks/lane.json", set_id=open_set, features=800)
    # As the dequeuer marks it (services/dequeuer/regressions.py), after the status.
    await pool.execute("UPDATE runs SET warning = $2 WHERE id = $1",
                       world.runs["set_regression"], "features 1,000 → 800 (-20%)")
    world.runs["set_running"] = await add_run(
        pool, storage, source_path="sources/us/ks/lane.json", entry="city", set_id=open_set,
        status=None, started=NOW - timedelta(minutes=3))
    world.runs["set_failed"] = await add_run(
        pool, storage, source_path=XSS_PATH, entry=XSS, set_id=open_set, status="failure",
        problem="download_failed",
        error=f"GET http://example.org/{XSS}: HTTP 404 <img src=x onerror=alert(2)>")
    world.runs["set_queued"] = await add_run(
        pool, storage, source_path="sources/us/wa/king.json", set_id=open_set, status=None)
    world.runs["set_skipped"] = await add_run(
        pool, storage, source_path="sources/us/wa/skip.json", set_id=open_set,
        status="skipped", problem="skip_source", with_files=False)

    world.jobs["push"] = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref, status, created_at, finished_at)"
        " VALUES ('d-push', 'push', $1, $2, 'refs/heads/main', 'success', $3, $3)"
        " RETURNING id", REPO, "a" * 40, NOW - timedelta(minutes=30))
    world.runs["push_good"] = await add_run(
        pool, storage, source_path="sources/us/ca/alameda.json", job_id=world.jobs["push"],
        features=1_300_000)
    world.jobs["pr"] = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref, pr_number, head_repo, status,"
        " created_at, finished_at) VALUES ('d-pr', 'pull_request', $1, $2,"
        " 'refs/pull/7/head', 7, 'someone/openaddresses', 'failure', $3, $3) RETURNING id",
        REPO, "b" * 40, NOW - timedelta(minutes=20))
    world.runs["pr_failed"] = await add_run(
        pool, storage, source_path=XSS_PATH, entry=XSS, job_id=world.jobs["pr"],
        status="failure", problem="conform_failed", error=f"field {XSS} is missing")
    world.runs["pr_good"] = await add_run(
        pool, storage, source_path="sources/us/ks/new.json", job_id=world.jobs["pr"],
        features=0, status="success")
    world.jobs["running"] = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref, created_at)"
        " VALUES ('d-run', 'push', $1, $2, 'refs/heads/main', $3) RETURNING id",
        REPO, "d" * 40, NOW - timedelta(minutes=2))
    world.runs["job_running"] = await add_run(
        pool, storage, source_path="sources/us/ks/lane.json", job_id=world.jobs["running"],
        status=None, started=NOW - timedelta(seconds=75))
    world.runs["job_queued"] = await add_run(
        pool, storage, source_path="sources/us/ca/alameda.json", job_id=world.jobs["running"],
        status=None)

    for name, minutes, run in (("worker-1", 0, world.runs["set_running"]),
                               ("worker-2", 12, None), ("worker-3", 25, None)):
        await pool.execute(
            "INSERT INTO workers (name, hostname, pid, state, run_id, last_seen_at, version)"
            " VALUES ($1, 'host-a', 4242, $2, $3, now() - $4::interval, '0.1.0')",
            name, "running" if run else "idle", run, timedelta(minutes=minutes))
    return world
