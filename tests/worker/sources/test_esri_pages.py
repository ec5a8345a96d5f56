"""Concurrent ESRI dumps against the fake ArcGIS server: the same file as one page after
another, the page size halved, OBJECTID ranges, the per-host limit, retries and manners."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from services.worker.errors import RunError
from services.worker.sources import esri
from services.worker.sources.guard import UrlPolicy
from services.worker.sources.http import Retry, Timeouts
from tests.support.arcgis import OID, FakeArcGIS, FakeLayer, point_feature

LOCAL = UrlPolicy(allow_private=True)
# Short pauses everywhere, a page's second round included (it waits backoff_max_s).
QUICK = Retry(tries=3, backoff_s=0.01, backoff_max_s=0.05)
SHORT = Timeouts(connect_s=2.0, sock_read_s=5.0)
REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeArcGIS]:
    with FakeArcGIS().running() as running:
        yield running


@pytest.fixture
def arcgis(server: FakeArcGIS) -> Iterator[FakeArcGIS]:
    """The server, failing the test on any request above the limit of 4 or during a
    Retry-After it sent."""
    server.reset_watch(in_flight_limit=4)
    yield server
    assert server.violations == []


def points(oids: list[int]) -> list[dict[str, Any]]:
    return [point_feature(oid, -122.0 + oid / 1000, 37.0, STREET=f"{oid} Main St") for oid in oids]


def dump(url: str, dest: Path, limit: int = 4, **options: Any) -> esri.EsriResult:
    options.setdefault("retry", QUICK)
    return esri.dump(
        url, dest, policy=LOCAL, timeouts=SHORT,
        host_limit=esri.HostLimit(limit, dest.parent / "slots"), **options,
    )


def oids(path: Path) -> list[int]:
    return [json.loads(line)["properties"][OID] for line in path.read_text().splitlines()]


def same_as_sequential(url: str, tmp_path: Path, **options: Any) -> esri.EsriResult:
    """Dump at limit 4, check it against a dump at limit 1 byte for byte; the limit-4 one."""
    one = dump(url, tmp_path / "one.geojsonl", limit=1, **options)
    four = dump(url, tmp_path / "four.geojsonl", limit=4, **options)
    assert four.path.read_bytes() == one.path.read_bytes()
    assert (four.fingerprint, four.size_bytes, four.written_count) == (
        one.fingerprint, one.size_bytes, one.written_count,
    )
    return four


def queries(arcgis: FakeArcGIS, name: str, key: str) -> list[dict[str, str]]:
    return [q for q in arcgis.queries(name) if key in q]


# --- the same file in every mode --------------------------------------------------------------


def test_offset_pages_in_flight_together_give_the_sequential_file(
    arcgis: FakeArcGIS, tmp_path: Path
) -> None:
    url = arcgis.add_layer("concurrent", FakeLayer(points(list(range(1, 41))),
                                                   max_record_count=4, latency_s=0.03))
    got = same_as_sequential(url, tmp_path)
    assert oids(got.path) == list(range(1, 41))
    # The page size is the layer's maxRecordCount, and four pages were in flight at once.
    assert {q["resultRecordCount"] for q in queries(arcgis, "concurrent", "resultOffset")} == {"4"}
    assert arcgis.peak_in_flight == 4


def test_object_id_chunks_give_the_sequential_file(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(points(list(range(5, 65, 2))), max_record_count=4,
                      supports_pagination=False, latency_s=0.02)
    url = arcgis.add_layer("idchunks", layer)
    got = same_as_sequential(url, tmp_path)
    assert oids(got.path) == list(range(5, 65, 2))
    assert len(queries(arcgis, "idchunks", "returnIdsOnly")) == 2  # once per dump
    assert not queries(arcgis, "idchunks", "resultOffset")
    assert arcgis.peak_in_flight == 4


def test_refused_id_list_falls_back_to_objectid_ranges(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    # Gaps, as in a layer whose rows were deleted over the years, and a dense run at the end
    # where a range estimated from the average holds more than one answer can.
    wanted = [*range(1, 200, 7), *range(300, 340)]
    layer = FakeLayer(points(wanted), max_record_count=5, supports_pagination=False,
                      max_ids=10, latency_s=0.01)
    url = arcgis.add_layer("ranges", layer)
    with capture_logs() as logs:
        got = same_as_sequential(url, tmp_path)
    assert oids(got.path) == sorted(wanted)
    assert got.written_count == got.expected_count == len(wanted)
    assert any(e["event"] == "esri.ids_failed" for e in logs)
    wheres = [q["where"] for q in queries(arcgis, "ranges", "outFields")]
    assert wheres and all(w.startswith(f"{OID} >= ") and f" AND {OID} < " in w for w in wheres)
    assert not queries(arcgis, "ranges", "objectIds")
    # The dense run came back short (exceededTransferLimit) and was asked for in halves.
    assert any(e["event"] == "esri.page_size" for e in logs)


def test_without_statistics_a_refused_id_list_is_one_query(
    arcgis: FakeArcGIS, tmp_path: Path
) -> None:
    layer = FakeLayer(points(list(range(1, 8))), supports_pagination=False, max_ids=3,
                      supports_statistics=False)
    url = arcgis.add_layer("nostats", layer)
    got = dump(url, tmp_path / "d.geojsonl")
    assert oids(got.path) == list(range(1, 8))


# --- page size --------------------------------------------------------------------------------


def test_page_size_is_the_layers_within_a_bound() -> None:
    def size(meta: dict[str, Any]) -> int:
        return esri.Layer.from_metadata({"fields": [], **meta}, None, esri.MAX_PAGE_SIZE).page_size

    assert size({"maxRecordCount": 2000}) == 2000
    assert size({"maxRecordCount": 32000}) == esri.MAX_PAGE_SIZE == 5000
    assert size({}) == esri.DEFAULT_PAGE_SIZE == 1000


def test_pages_too_large_for_the_server_are_halved_and_kept_smaller(
    arcgis: FakeArcGIS, tmp_path: Path
) -> None:
    plain = arcgis.add_layer("plain", FakeLayer(points(list(range(1, 31))), max_record_count=8))
    url = arcgis.add_layer(
        "halving", FakeLayer(points(list(range(1, 31))), max_record_count=8, error_above=2)
    )
    with capture_logs() as logs:
        got = same_as_sequential(url, tmp_path)
    assert got.fingerprint == dump(plain, tmp_path / "plain.geojsonl").fingerprint
    sizes = [e["size"] for e in logs if e["event"] == "esri.page_size"]
    assert sizes and min(sizes) == 2
    # Once halved, the size is kept: most requests of the dump ask for 2 features.
    asked = [int(q["resultRecordCount"]) for q in queries(arcgis, "halving", "resultOffset")]
    assert asked.count(2) >= 30 and max(asked) == 8


def test_server_answering_fewer_than_asked_gets_smaller_pages(
    arcgis: FakeArcGIS, tmp_path: Path
) -> None:
    layer = FakeLayer(points(list(range(1, 21))), max_record_count=3,
                      advertised_max_record_count=6)
    url = arcgis.add_layer("shortpages", layer)
    got = same_as_sequential(url, tmp_path)
    assert oids(got.path) == list(range(1, 21))


# --- limits and manners -------------------------------------------------------------------------


def test_a_stalled_page_holds_back_at_most_the_window(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(points(list(range(1, 41))), max_record_count=2,
                      fail_matching={"resultOffset=0": 2})
    url = arcgis.add_layer("stalled", layer)
    got = dump(url, tmp_path / "d.geojsonl", retry=Retry(tries=3, backoff_s=0.2))
    assert oids(got.path) == list(range(1, 41))
    pages = queries(arcgis, "stalled", "resultOffset")
    first_answered = [i for i, q in enumerate(pages) if q["resultOffset"] == "0"][2]
    # While page 0 waited, only the three pages after it were asked for: no more than
    # limit × page features were ever held.
    before = {q["resultOffset"] for q in pages[:first_answered]} - {"0"}
    assert before == {"2", "4", "6"}


def test_limit_holds_across_dumps_in_two_processes(server: FakeArcGIS, tmp_path: Path) -> None:
    # Long enough (30 pages of 0.1 s, two at a time) that the two dumps surely overlap.
    url = server.add_layer("shared", FakeLayer(points(list(range(1, 91))), max_record_count=3,
                                               latency_s=0.1))

    def two_dumps(slots_a: Path, slots_b: Path) -> int:
        server.reset_watch()
        script = (
            "import sys; from pathlib import Path; from services.worker.sources import esri;"
            "from services.worker.sources.guard import UrlPolicy;"
            "esri.dump(sys.argv[1], Path(sys.argv[2]), policy=UrlPolicy(allow_private=True),"
            " host_limit=esri.HostLimit(2, Path(sys.argv[3])))"
        )
        dumps = [
            subprocess.Popen([sys.executable, "-c", script, url, str(tmp_path / f"{n}.geojsonl"),
                              str(slots)], cwd=REPO_ROOT)
            for n, slots in enumerate((slots_a, slots_b))
        ]
        assert [d.wait(timeout=60) for d in dumps] == [0, 0]
        return server.peak_in_flight

    assert two_dumps(tmp_path / "slots", tmp_path / "slots") == 2
    # The watch would have seen it: with a folder each, the two dumps together go past 2.
    assert two_dumps(tmp_path / "a", tmp_path / "b") > 2


def test_retry_after_is_honoured_by_every_page(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(points(list(range(1, 25))), max_record_count=2, latency_s=0.01,
                      throttle_every=5, retry_after_s=1)
    url = arcgis.add_layer("throttled", layer)
    started = time.monotonic()
    got = dump(url, tmp_path / "d.geojsonl")
    assert oids(got.path) == list(range(1, 25))
    # The fixture fails the test on a request that arrived during a Retry-After.
    assert time.monotonic() - started >= 2.0


def test_intermittent_server_errors_change_nothing(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(points(list(range(1, 41))), max_record_count=3, error_every=4)
    url = arcgis.add_layer("intermittent", layer)
    got = same_as_sequential(url, tmp_path)
    assert oids(got.path) == list(range(1, 41))


def test_user_agent_is_sent_on_every_request(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("agent", FakeLayer(points([1, 2, 3]), max_record_count=2))
    dump(url, tmp_path / "d.geojsonl", user_agent="oa-test/1.0 (+mailto:ops@example.org)")
    sent = [r for r in arcgis.requests if "/agent/" in r.path]
    assert sent and {r.headers["User-Agent"] for r in sent} == {
        "oa-test/1.0 (+mailto:ops@example.org)"
    }


# --- a page that keeps failing ------------------------------------------------------------------


def test_a_failing_page_is_tried_again_on_its_own(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    # Three 503s use up the page's first round of tries; its second round gets through.
    layer = FakeLayer(points(list(range(1, 11))), max_record_count=2,
                      fail_matching={"resultOffset=4": 3})
    url = arcgis.add_layer("resumed", layer)
    with capture_logs() as logs:
        got = dump(url, tmp_path / "d.geojsonl")
    assert oids(got.path) == list(range(1, 11))
    failed = [e for e in logs if e["event"] == "esri.page_failed"]
    assert [e["page"] for e in failed] == ["offset 4 (2 features)"]
    # The other pages were not asked for again: the dump did not start over.
    offsets = [q["resultOffset"] for q in queries(arcgis, "resumed", "resultOffset")]
    assert offsets.count("0") == 1 and offsets.count("4") == 4


def test_a_page_failing_for_good_fails_the_run_naming_it(
    arcgis: FakeArcGIS, tmp_path: Path
) -> None:
    layer = FakeLayer(points(list(range(1, 11))), max_record_count=2,
                      fail_matching={"resultOffset=6": 100})
    url = arcgis.add_layer("brokenpage", layer)
    dest = tmp_path / "d.geojsonl"
    with pytest.raises(RunError) as caught:
        dump(url, dest)
    error = caught.value
    assert error.problem == "download_failed" and error.transient
    assert "the page of offset 6 (2 features) still fails after 2 rounds of 3 tries" in str(error)
    assert "HTTP 503" in str(error)
    assert not dest.exists()


def test_an_id_chunk_failing_for_good_names_its_ids(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(points(list(range(1, 11))), max_record_count=3, supports_pagination=False,
                      fail_matching={"objectIds=4,5,6": 100})
    url = arcgis.add_layer("brokenids", layer)
    with pytest.raises(RunError, match=re.escape("the page of object ids 4 to 6 (3 ids) still")):
        dump(url, tmp_path / "d.geojsonl")
