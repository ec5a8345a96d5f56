"""ESRI layer dumps against a fake ArcGIS server on 127.0.0.1, and geometry conversion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from services.worker.errors import RunError
from services.worker.sources import esri
from services.worker.sources.esri import to_geojson_geometry
from services.worker.sources.fetch import fetch
from services.worker.sources.guard import UrlPolicy
from services.worker.sources.http import Retry, SizeLimits, Timeouts
from tests.support.arcgis import OID, TOKEN, FakeArcGIS, FakeLayer, point_feature
from tests.support.dataserver import DataServer

LOCAL = UrlPolicy(allow_private=True)
QUICK = Retry(tries=3, backoff_s=0.01)
SHORT = Timeouts(connect_s=2.0, sock_read_s=2.0)


@pytest.fixture(scope="module")
def arcgis() -> Iterator[FakeArcGIS]:
    with FakeArcGIS().running() as server:
        yield server


def points(n: int, first_oid: int = 1) -> list[dict[str, Any]]:
    return [
        point_feature(first_oid + i, -122.0 + i / 100, 37.0, STREET=f"{i} Main St", CITY="Oakland")
        for i in range(n)
    ]


def dump(url: str, tmp_path: Path, **options: Any) -> tuple[esri.EsriResult, list[Any]]:
    got = esri.dump(
        url, tmp_path / "esri.geojsonl", policy=LOCAL, retry=QUICK, timeouts=SHORT, **options
    )
    lines = got.path.read_text().splitlines()
    return got, [json.loads(line) for line in lines]


def oids(features: list[Any]) -> list[int]:
    return [f["properties"][OID] for f in features]


def test_pages_by_offset(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("offset", FakeLayer(points(5), max_record_count=2))
    got, features = dump(url, tmp_path)
    assert oids(features) == [1, 2, 3, 4, 5]
    assert (got.expected_count, got.written_count) == (5, 5)
    pages = [q for q in arcgis.queries("offset") if "resultOffset" in q]
    assert [q["resultOffset"] for q in pages] == ["0", "2", "4"]
    assert all(q["resultRecordCount"] == "2" and q["outSR"] == "4326" for q in pages)
    assert all(q["outFields"] == "*" for q in pages)
    assert features[0] == {
        "type": "Feature",
        "properties": {OID: 1, "STREET": "0 Main St", "CITY": "Oakland"},
        "geometry": {"type": "Point", "coordinates": [-122.0, 37.0]},
    }
    body = got.path.read_bytes()
    assert got.fingerprint == hashlib.md5(body).hexdigest() and got.size_bytes == len(body)


def test_server_ignoring_record_count_is_followed(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer(
        "greedy", FakeLayer(points(7), max_record_count=3, ignore_record_count=True)
    )
    _, features = dump(url, tmp_path, max_page_size=2)
    assert oids(features) == list(range(1, 8))
    # Pages are planned ahead at the size asked for; what comes back past it is dropped (the
    # next page has it).
    offsets = [q["resultOffset"] for q in arcgis.queries("greedy") if "resultOffset" in q]
    assert sorted(offsets, key=int) == ["0", "2", "4", "6"]


def test_pages_by_object_ids_without_pagination(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer(
        "ids", FakeLayer(points(5), max_record_count=2, supports_pagination=False)
    )
    _, features = dump(url, tmp_path)
    assert oids(features) == [1, 2, 3, 4, 5]
    chunks = [q["objectIds"] for q in arcgis.queries("ids") if "objectIds" in q]
    assert chunks == ["1,2", "3,4", "5"]
    assert not any("resultOffset" in q for q in arcgis.queries("ids"))


def test_long_id_lists_are_posted(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer(
        "many", FakeLayer(points(400, first_oid=1_000_000), supports_pagination=False)
    )
    got, features = dump(url, tmp_path)
    assert got.written_count == 400 and len(set(oids(features))) == 400
    posted = [r for r in arcgis.requests if r.method == "POST"]
    assert len(posted) == 1 and b"objectIds=" in posted[0].body


def test_server_ignoring_offset_falls_back_to_ids(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("stuck", FakeLayer(points(5), max_record_count=2, ignore_offset=True))
    got, features = dump(url, tmp_path)
    assert oids(features) == [1, 2, 3, 4, 5] and got.written_count == 5


def test_count_mismatch_is_warned(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("stale", FakeLayer(points(3), count_error=2))
    with capture_logs() as logs:
        got, _ = dump(url, tmp_path)
    assert (got.expected_count, got.written_count) == (5, 3)
    assert any(e["event"] == "esri.count_mismatch" and e["expected"] == 5 for e in logs)


def test_field_selection_sends_only_wanted_fields(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("fields", FakeLayer(points(2)))
    _, features = dump(url, tmp_path, out_fields=["street", "no_such_field"])
    query = next(q for q in arcgis.queries("fields") if "resultOffset" in q)
    assert query["outFields"] == f"STREET,{OID}"
    assert set(features[0]["properties"]) == {"STREET", OID}


def test_token_protected_layer(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("locked", FakeLayer(points(2), token_required=True))
    entry = {"data": url, "protocol": "ESRI"}
    with pytest.raises(RunError) as caught:
        fetch(entry, tmp_path, policy=LOCAL, retry=QUICK, timeouts=SHORT)
    assert caught.value.problem == "no_esri_token" and "499" in str(caught.value)
    # A token in the source URL travels with every request.
    got = fetch(
        {**entry, "data": f"{url}?token={TOKEN}"},
        tmp_path,
        policy=LOCAL,
        retry=QUICK,
        timeouts=SHORT,
    )
    assert got.path.name == "esri.geojsonl" and len(got.path.read_text().splitlines()) == 2


def test_server_errors_are_retried(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("flaky", FakeLayer(points(2), failures=[500, 502]))
    got, _ = dump(url, tmp_path)
    assert got.written_count == 2


def test_fetch_dispatches_esri_with_headers(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("viafetch", FakeLayer(points(3)))
    entry = {"data": url, "protocol": "ESRI", "request": {"headers": {"Referer": "oa"}}}
    seen: list[int] = []
    got = fetch(
        entry,
        tmp_path,
        policy=LOCAL,
        progress=seen.append,
        out_fields=["CITY"],
        retry=QUICK,
        timeouts=SHORT,
    )
    assert got.size_bytes == got.path.stat().st_size and seen[-1] == got.size_bytes
    layer_requests = [r for r in arcgis.requests if "/viafetch/" in r.path]
    assert all(r.headers.get("Referer") == "oa" for r in layer_requests)


def test_esri_to_loopback_refused_by_default(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("private", FakeLayer(points(1)))
    with pytest.raises(RunError, match="loopback"):
        fetch({"data": url, "protocol": "ESRI"}, tmp_path, policy=UrlPolicy())


# --- geometry ----------------------------------------------------------------------------

SQUARE_CW = [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]  # Esri outer ring: clockwise
HOLE_CCW = [[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]  # Esri hole: counter-clockwise
FAR_CW = [[20, 0], [20, 5], [25, 5], [25, 0], [20, 0]]


def test_point_and_missing_geometry() -> None:
    assert to_geojson_geometry({"x": 1.5, "y": 2.5}) == {"type": "Point", "coordinates": [1.5, 2.5]}
    assert to_geojson_geometry({"x": "NaN", "y": None}) is None
    assert to_geojson_geometry({"x": float("nan"), "y": 1.0}) is None
    assert to_geojson_geometry(None) is None
    assert to_geojson_geometry({}) is None


def test_multipoint() -> None:
    assert to_geojson_geometry({"points": [[1, 2], [3, 4, 99]]}) == {
        "type": "MultiPoint",
        "coordinates": [[1.0, 2.0], [3.0, 4.0]],
    }
    assert to_geojson_geometry({"points": [[1, 2]]}) == {"type": "Point", "coordinates": [1.0, 2.0]}
    assert to_geojson_geometry({"points": []}) is None


def test_polylines() -> None:
    assert to_geojson_geometry({"paths": [[[0, 0], [1, 1]]]}) == {
        "type": "LineString",
        "coordinates": [[0.0, 0.0], [1.0, 1.0]],
    }
    assert to_geojson_geometry({"paths": [[[0, 0], [1, 1]], [[2, 2], [3, 3]], [[9, 9]]]}) == {
        "type": "MultiLineString",
        "coordinates": [[[0.0, 0.0], [1.0, 1.0]], [[2.0, 2.0], [3.0, 3.0]]],
    }


def test_polygon_with_hole_is_rewound_for_geojson() -> None:
    got = to_geojson_geometry({"rings": [SQUARE_CW, HOLE_CCW]})
    assert got is not None and got["type"] == "Polygon"
    outer, hole = got["coordinates"]
    assert outer == [[float(x), float(y)] for x, y in reversed(SQUARE_CW)]  # now CCW
    assert hole == [[float(x), float(y)] for x, y in reversed(HOLE_CCW)]  # now CW


def test_two_outer_rings_make_a_multipolygon_and_holes_find_their_owner() -> None:
    got = to_geojson_geometry({"rings": [FAR_CW, SQUARE_CW, HOLE_CCW]})
    assert got is not None and got["type"] == "MultiPolygon"
    assert [len(polygon) for polygon in got["coordinates"]] == [1, 2]


def test_unclosed_and_degenerate_rings() -> None:
    got = to_geojson_geometry({"rings": [SQUARE_CW[:-1], [[0, 0], [1, 1]]]})
    assert got is not None and got["type"] == "Polygon"
    assert got["coordinates"][0][0] == got["coordinates"][0][-1]
    assert to_geojson_geometry({"rings": [[[0, 0], [1, 1]]]}) is None


def test_wrongly_wound_lone_ring_is_kept() -> None:
    got = to_geojson_geometry({"rings": [HOLE_CCW]})
    assert got is not None and got["type"] == "Polygon" and len(got["coordinates"]) == 1


def test_server_returning_fewer_ids_than_asked(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    layer = FakeLayer(
        points(5), max_record_count=2, advertised_max_record_count=4, supports_pagination=False
    )
    url = arcgis.add_layer("liar", layer)
    _, features = dump(url, tmp_path)
    assert oids(features) == [1, 2, 3, 4, 5]
    chunks = [q["objectIds"] for q in arcgis.queries("liar") if "objectIds" in q]
    assert sorted(chunks) == ["1,2,3,4", "3,4", "5"]


def test_service_url_instead_of_layer_is_a_clear_error(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.layer_url("whatever").removesuffix("/0")
    with pytest.raises(RunError, match="is a service, not a layer"):
        dump(url, tmp_path)


# --- encoded pages, size limits, hostile answers ------------------------------------------


def test_gzip_encoded_pages_give_the_same_dump(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    plain_url = arcgis.add_layer("plainpages", FakeLayer(points(5), max_record_count=2))
    url = arcgis.add_layer("gzippages", FakeLayer(points(5), max_record_count=2, gzip=True))
    plain, _ = dump(plain_url, tmp_path)
    got, features = dump(url, tmp_path)
    assert oids(features) == [1, 2, 3, 4, 5]
    assert got.fingerprint == plain.fingerprint
    sent = [r for r in arcgis.requests if "/gzippages/" in r.path]
    assert sent and all(r.headers["Accept-Encoding"] == "gzip, deflate" for r in sent)


def test_page_inflating_past_the_limit_fails(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("inflating", FakeLayer(points(5), gzip=True))
    with pytest.raises(RunError) as caught:
        dump(url, tmp_path, limits=SizeLimits(max_unpacked_bytes=300))
    error = caught.value
    assert error.problem == "download_failed" and error.over_limit and not error.transient
    assert "limit of 300 bytes (MAX_UNPACKED_BYTES)" in str(error)
    assert not (tmp_path / "esri.geojsonl").exists()


def test_page_over_the_download_limit_fails(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("bigpage", FakeLayer(points(5)))
    with pytest.raises(RunError) as caught:
        dump(url, tmp_path, limits=SizeLimits(max_download_bytes=100))
    assert caught.value.over_limit
    assert "limit of 100 bytes (MAX_DOWNLOAD_BYTES)" in str(caught.value)


def test_dump_over_the_download_limit_fails(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    # Pages of 5 features are ~720 bytes; the 60 features as GeoJSON lines ~8,600.
    url = arcgis.add_layer("longdump", FakeLayer(points(60), max_record_count=5))
    with pytest.raises(RunError) as caught:
        dump(url, tmp_path, limits=SizeLimits(max_download_bytes=2000))
    error = caught.value
    assert error.over_limit and "limit of 2000 bytes (MAX_DOWNLOAD_BYTES)" in str(error)
    assert "features pass" in str(error)
    assert not (tmp_path / "esri.geojsonl").exists()
    # The third page passes the limit: at most it and the three pages in flight after it
    # were asked for, not all twelve.
    assert len([q for q in arcgis.queries("longdump") if "resultOffset" in q]) <= 6


def test_server_errors_past_the_retries_are_transient(arcgis: FakeArcGIS, tmp_path: Path) -> None:
    url = arcgis.add_layer("down", FakeLayer(points(2), failures=[503] * 10))
    with pytest.raises(RunError) as caught:
        dump(url, tmp_path)
    error = caught.value
    assert error.problem == "download_failed" and error.transient
    assert "after 3 tries" in str(error) and "503" in str(error)


def test_page_nested_absurdly_deep_fails_clearly(tmp_path: Path) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    with DataServer().running() as server:
        url = server.add("/arcgis/rest/services/deep/FeatureServer/0", deep)
        with pytest.raises(RunError) as caught:
            dump(url, tmp_path)
        assert server.count("/arcgis/rest/services/deep/FeatureServer/0") == 1
    error = caught.value
    assert error.problem == "download_failed" and not error.transient
    assert "nested too deeply" in str(error) and url in str(error)


def test_unknown_content_encoding_of_a_page_fails_clearly(tmp_path: Path) -> None:
    with DataServer().running() as server:
        url = server.add(
            "/arcgis/rest/services/br/FeatureServer/0", b"{}", headers={"Content-Encoding": "br"}
        )
        with pytest.raises(RunError, match="Content-Encoding 'br'"):
            dump(url, tmp_path)
