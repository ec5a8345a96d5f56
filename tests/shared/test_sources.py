"""Tests of shared.sources against the 24 real OpenAddresses sources in tests/fixtures."""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from shared.errors import SourceError
from shared.sources import (
    LAYERS,
    SOURCE_PROBLEMS,
    EntryRef,
    attribution,
    entry_timeout_s,
    get_entry,
    is_skipped,
    list_entries,
    load_source,
    parse_source,
    schema_problems,
    source_name,
    upgrade_source,
    validate_source,
)

SOURCES_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "oa-sources"
GAPS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "oa-sources-gaps"
SOURCE_PATHS = sorted(SOURCES_DIR.rglob("*.json"))


def real(name: str) -> dict[str, Any]:
    """A real source by name, loaded through the public entry point."""
    path = SOURCES_DIR / f"{name}.json"
    return load_source(path.read_bytes(), path=f"sources/{name}.json")


# A legacy layerless source in the v1 shape (retired/source_schema.json), with the old
# spellings `type` for the protocol and `conform.type` for the format, as sources looked
# before the 2020 migration to layers.
V1_SOURCE = {
    "coverage": {
        "US Census": {"geoid": "20101", "name": "Lane County", "state": "Kansas"},
        "country": "us",
        "state": "ks",
        "county": "Lane",
    },
    "type": "http",
    "data": "https://example.invalid/lane/addresses.zip",
    "website": "https://lanecounty.example.invalid/gis",
    "compression": "zip",
    "license": {"text": "Public domain", "attribution": False},
    "attribution": "Lane County GIS",
    "year": 2016,
    "note": "address points from the county appraiser",
    "conform": {
        "type": "shapefile",
        "file": "Addresses/lane_addr.shp",
        "number": "HOUSENUM",
        "street": ["PREDIR", "STREETNAME", "SUFFIX"],
        "city": "CITY",
        "postcode": "ZIP",
        "srs": "EPSG:2240",
    },
    "test": {
        "description": "one known address",
        "acceptance-tests": [
            {
                "description": "courthouse",
                "inputs": {"HOUSENUM": "144", "STREETNAME": "MAIN"},
                "expected": {"number": "144", "street": "MAIN"},
            }
        ],
    },
}


def test_source_problems_are_the_message_codes() -> None:
    assert "invalid_source" in SOURCE_PROBLEMS
    assert "skip_source" in SOURCE_PROBLEMS
    assert "timeout" in SOURCE_PROBLEMS
    assert "worker_lost" in SOURCE_PROBLEMS
    assert len(SOURCE_PROBLEMS) == 13
    assert LAYERS == ("addresses", "parcels", "buildings", "centerlines")


def test_the_fixture_set_is_complete() -> None:
    assert len(SOURCE_PATHS) == 24


@pytest.mark.parametrize(
    "path", SOURCE_PATHS, ids=[str(p.relative_to(SOURCES_DIR)) for p in SOURCE_PATHS]
)
def test_every_real_source_loads_validates_and_lists_entries(path: Path) -> None:
    name = str(path.relative_to(SOURCES_DIR)).removesuffix(".json")
    source = load_source(path.read_bytes(), path=f"sources/{name}.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    # v2 files pass through unchanged.
    assert source == raw
    entries = list_entries(source)
    assert entries, name
    for ref in entries:
        entry = get_entry(source, ref.layer, ref.name)
        assert entry == raw["layers"][ref.layer][ref.index]


def test_list_entries_of_multi_layer_and_multi_entry_sources() -> None:
    assert list_entries(real("us/wi/marathon")) == [
        EntryRef("addresses", "county", 0),
        EntryRef("parcels", "county", 0),
        EntryRef("centerlines", "county", 0),
        EntryRef("buildings", "county", 0),
    ]
    assert list_entries(real("us/mn/isanti")) == [
        EntryRef("addresses", "address_points", 0),
        EntryRef("addresses", "parcels", 1),
    ]
    assert list_entries(real("fr/01/statewide")) == [
        EntryRef("addresses", "state", 0),
        EntryRef("parcels", "state", 0),
        EntryRef("buildings", "state", 0),
    ]
    assert list_entries(real("us/tx/city_of_san_marcos")) == [EntryRef("centerlines", "city", 0)]


def test_list_entries_names_unnamed_entries_default() -> None:
    source = {"layers": {"addresses": [{"data": "https://x.invalid/a.csv", "protocol": "http"}]}}
    assert list_entries(source) == [EntryRef("addresses", "default", 0)]
    assert get_entry(source, "addresses", "default")["name"] == "default"
    assert list_entries({"schema": 2, "coverage": {"country": "us"}}) == []


def gap_source(name: str) -> dict[str, Any]:
    path = GAPS_DIR / f"{name}.json"
    return load_source(path.read_bytes(), path=f"sources/{name}.json")


def test_duplicate_entry_names_are_told_apart_by_position() -> None:
    # Upstream's schema accepts two `addresses` entries named `city`, with different data.
    source = gap_source("us/oh/city_of_perrysburg")
    assert list_entries(source) == [
        EntryRef("addresses", "city[0]", 0),
        EntryRef("addresses", "city[1]", 1),
        EntryRef("buildings", "city", 0),
        EntryRef("parcels", "city", 0),
    ]
    first = get_entry(source, "addresses", "city[0]")
    second = get_entry(source, "addresses", "city[1]")
    assert first["data"].endswith("/bm_addressPointsView/FeatureServer/0")
    assert second["data"].endswith("/bm_addressPointsView/FeatureServer/1")
    assert (first["name"], second["name"]) == ("city[0]", "city[1]")
    # A name used once in its layer stays as the file gives it.
    assert get_entry(source, "parcels", "city")["conform"]["pid"] == "parcel_no"
    with pytest.raises(SourceError, match="has no entry 'city' in layer 'addresses'"):
        get_entry(source, "addresses", "city")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        (["a", "a", "b"], ["a[0]", "a[1]", "b"]),
        (["b", "a", "c", "a", "a"], ["b", "a[1]", "c", "a[3]", "a[4]"]),
        ([None, None], ["default[0]", "default[1]"]),
        (["a[1]", "a"], ["a[1]", "a"]),  # looks made up, but is used once: kept
    ],
)
def test_entry_names(names: list[str | None], expected: list[str]) -> None:
    entries = [{"data": "https://x.invalid/a.csv"} if n is None else {"name": n} for n in names]
    source = {"layers": {"addresses": entries}}
    refs = list_entries(source)
    assert [ref.name for ref in refs] == expected
    assert [get_entry(source, "addresses", name)["name"] for name in expected] == expected


def test_a_made_up_name_taken_by_another_entry_is_ambiguous() -> None:
    source = {"layers": {"addresses": [{"name": "a"}, {"name": "a"}, {"name": "a[1]"}]}}
    with pytest.raises(SourceError) as info:
        list_entries(source)
    assert str(info.value) == (
        "layers.addresses[2]: entry name 'a[1]' is also the name given to layers.addresses[1]"
    )
    assert info.value.problem == "invalid_source"


def test_same_name_in_two_layers_is_fine() -> None:
    refs = list_entries(real("us/il/effingham"))
    assert [(r.layer, r.name) for r in refs] == [("addresses", "county"), ("parcels", "county")]


def test_list_entries_rejects_unknown_layer() -> None:
    with pytest.raises(SourceError, match="unknown layer 'roads'"):
        list_entries({"layers": {"roads": []}})


def test_get_entry_returns_a_copy_of_the_entry() -> None:
    source = real("us/mn/isanti")
    entry = get_entry(source, "addresses", "parcels")
    assert entry["data"] == (
        "https://gis.co.isanti.mn.us/arcgis/rest/services/LandRecords/"
        "TaxParcels_PublicBuildingNum/FeatureServer/0"
    )
    assert entry["conform"]["number"] == {"function": "prefixed_number", "field": "SITEADDRESS"}
    entry["conform"]["number"] = "changed"
    assert source["layers"]["addresses"][1]["conform"]["number"]["field"] == "SITEADDRESS"


def test_get_entry_missing() -> None:
    source = real("us/wi/marathon")
    with pytest.raises(SourceError) as info:
        get_entry(source, "addresses", "city")
    assert str(info.value) == "source has no entry 'city' in layer 'addresses'"
    assert info.value.problem == "invalid_source"
    with pytest.raises(SourceError, match="has no entry 'city' in layer 'centerlines'"):
        get_entry(real("us/mn/isanti"), "centerlines", "city")


def test_v1_source_upgrades_to_v2_and_validates() -> None:
    original = copy.deepcopy(V1_SOURCE)
    upgraded = upgrade_source(V1_SOURCE)
    assert V1_SOURCE == original  # the input is left alone
    assert upgraded == {
        "coverage": V1_SOURCE["coverage"],
        "schema": 2,
        "layers": {
            "addresses": [
                {
                    "name": "default",
                    "protocol": "http",
                    "data": "https://example.invalid/lane/addresses.zip",
                    "website": "https://lanecounty.example.invalid/gis",
                    "compression": "zip",
                    "license": {"text": "Public domain", "attribution": False},
                    "attribution": "Lane County GIS",
                    "year": 2016,
                    "note": "address points from the county appraiser",
                    "conform": {
                        "format": "shapefile",
                        "file": "Addresses/lane_addr.shp",
                        "number": "HOUSENUM",
                        "street": ["PREDIR", "STREETNAME", "SUFFIX"],
                        "city": "CITY",
                        "postcode": "ZIP",
                        "srs": "EPSG:2240",
                    },
                    "test": V1_SOURCE["test"],
                }
            ]
        },
    }
    validate_source(upgraded, path="sources/us/ks/lane.json")
    assert list_entries(upgraded) == [EntryRef("addresses", "default", 0)]


def test_v1_source_loads_from_text() -> None:
    v1 = dict(V1_SOURCE, protocol="ftp", skip=True)
    del v1["type"]
    source = load_source(json.dumps(v1), path="sources/us/ks/lane.json")
    entry = get_entry(source, "addresses", "default")
    assert entry["protocol"] == "ftp"
    assert is_skipped(entry) is True


def test_v1_unknown_key_is_reported_not_dropped() -> None:
    v1 = dict(V1_SOURCE, cache="s3://old-machine/cache.zip")
    with pytest.raises(SourceError) as info:
        load_source(json.dumps(v1), path="sources/us/ks/lane.json")
    assert str(info.value) == (
        "sources/us/ks/lane.json: layers.addresses[0]: Additional properties are not allowed "
        "('cache' was unexpected)"
    )


def test_v2_passes_through_as_a_deep_copy() -> None:
    source = real("us/ks/lane_county")
    upgraded = upgrade_source(source)
    assert upgraded == source
    upgraded["layers"]["addresses"][0]["conform"]["format"] = "geojson"
    assert source["layers"]["addresses"][0]["conform"]["format"] == "csv"


def test_invalid_json_gives_line_and_column() -> None:
    text = '{\n    "schema": 2,\n    "coverage": {"country": "us"},\n    "layers": {,}\n}\n'
    with pytest.raises(SourceError) as info:
        parse_source(text, path="sources/us/ks/lane.json")
    assert str(info.value) == (
        "sources/us/ks/lane.json: invalid JSON at line 4 column 16: "
        "Expecting property name enclosed in double quotes"
    )
    assert info.value.problem == "invalid_source"


def test_parse_rejects_non_objects_nan_and_bad_utf8() -> None:
    not_object = r"^x\.json: a source must be a JSON object, not an array"
    with pytest.raises(SourceError, match=not_object):
        parse_source(b"[1, 2]", path="x.json")
    with pytest.raises(SourceError, match=r"NaN is not valid JSON"):
        parse_source('{"timeout": NaN}', path="x.json")
    with pytest.raises(SourceError, match=r"^x\.json: not UTF-8 text \(byte 10"):
        parse_source(b'{"name": "\xff"}', path="x.json")


def nested(depth: int) -> str:
    """A valid source, whose one entry's ``note`` holds arrays nested ``depth`` deep if any."""
    note = f', "note": {"[" * depth + "]" * depth}' if depth else ""
    return (
        '{"schema": 2, "coverage": {"country": "us"}, "layers": {"addresses": [{"name": "a", '
        '"data": "http://example.com/a.csv", "protocol": "http", '
        f'"conform": {{"format": "csv", "number": "n", "street": "s"}}{note}}}]}}}}'
    )


@pytest.mark.parametrize("depth", [200_000, 600], ids=["past-the-parser", "past-the-copy"])
def test_json_nested_absurdly_deep_is_a_source_error(depth: int) -> None:
    with pytest.raises(SourceError) as info:
        load_source(nested(depth).encode(), path="sources/us/deep.json")
    assert str(info.value) == (
        "sources/us/deep.json: invalid JSON: arrays or objects are nested too deeply to read"
    )
    assert info.value.problem == "invalid_source"


def test_parse_and_validate_turn_deep_nesting_into_a_source_error() -> None:
    with pytest.raises(SourceError, match="nested too deeply"):
        parse_source(b"[" * 200_000 + b"]" * 200_000, path="x.json")
    source = load_source(nested(0), path="x.json")
    deep: list[Any] = []
    for _ in range(100_000):  # built without recursion, too deep to walk with it
        deep = [deep]
    source["layers"]["addresses"][0]["note"] = deep
    with pytest.raises(SourceError, match=r"^x\.json: .*nested too deeply") as info:
        validate_source(source, path="x.json")
    assert info.value.problem == "invalid_source"


def test_parse_accepts_a_byte_order_mark() -> None:
    assert parse_source(b'\xef\xbb\xbf{"schema": 2}') == {"schema": 2}


def test_schema_error_names_the_json_path() -> None:
    source = real("us/ks/lane_county")
    source["layers"]["addresses"][0]["conform"]["format"] = "csvx"
    with pytest.raises(SourceError) as info:
        validate_source(source, path="us/ks/lane.json")
    assert str(info.value) == (
        "us/ks/lane.json: layers.addresses[0].conform.format: 'csvx' is not one of "
        "['csv', 'gdb', 'geojson', 'gpkg', 'shapefile', 'shapefile-polygon', 'xml']"
    )
    # A format outside the schema's list is the more specific problem.
    assert info.value.problem == "unknown_format"


def test_schema_errors_in_other_layers_and_at_the_top() -> None:
    source = real("us/wi/marathon")
    source["layers"]["centerlines"][0]["protocol"] = "gopher"
    with pytest.raises(SourceError, match=r"^m: layers\.centerlines\[0\]\.protocol: 'gopher'"):
        validate_source(source, path="m")
    source = real("us/wi/marathon")
    del source["coverage"]
    with pytest.raises(SourceError) as info:
        validate_source(source, path="m")
    assert str(info.value) == "m: (top level): 'coverage' is a required property"


def test_schema_refs_resolve_into_util_files_offline() -> None:
    # coverage.geometry goes through util/coverage.json into util/geojson.json (which has
    # its own relative $id), so this only fails if both refs resolve.
    source = real("us/tx/city_of_mckinney")
    source["coverage"]["geometry"]["type"] = "Circle"
    with pytest.raises(SourceError, match=r"coverage\.geometry\.type: 'Circle' is not one of"):
        validate_source(source, path="x")
    source = real("us/il/champaign")
    source["layers"]["parcels"][0]["request"]["headers"]["X-Count"] = 3
    with pytest.raises(SourceError, match=r"request\.headers\.X-Count: 3 is not of type 'string'"):
        validate_source(source, path="x")


def test_unsupported_schema_version() -> None:
    source = real("us/ks/lane_county")
    source["schema"] = 3
    with pytest.raises(SourceError, match=r"^x: schema: 3 is not a supported schema version"):
        validate_source(source, path="x")


def test_skip() -> None:
    dallas = real("us/mo/dallas")
    assert is_skipped(get_entry(dallas, "addresses", "county")) is True
    assert is_skipped(get_entry(real("us/ks/lane_county"), "addresses", "county")) is False
    assert is_skipped({"skip": "true"}) is False  # only the JSON boolean counts


def test_timeout_is_in_hours_on_the_entry() -> None:
    entry = get_entry(real("us/ks/lane_county"), "addresses", "county")
    assert "timeout" not in entry
    assert entry_timeout_s(entry, default_s=1800.0) == 1800.0
    entry["timeout"] = 12
    assert entry_timeout_s(entry, default_s=1800.0) == 43200.0
    for bad in (0, -1, True, "6"):
        with pytest.raises(SourceError, match="is not a positive number of hours"):
            entry_timeout_s({"timeout": bad}, default_s=1.0)


def test_timeout_validates_as_an_entry_field() -> None:
    source = real("us/wi/marathon")
    source["layers"]["parcels"][0]["timeout"] = 24
    validate_source(source)
    source["layers"]["parcels"][0]["timeout"] = 1.5
    with pytest.raises(SourceError, match=r"layers\.parcels\[0\]\.timeout: 1\.5 is not of type"):
        validate_source(source)


def test_attribution_of_a_full_license_object() -> None:
    source = real("de/hh/statewide")
    assert attribution(source, get_entry(source, "addresses", "state")) == {
        "license_text": "Datenlizenz Deutschland Namensnennung 2.0",
        "license_url": "https://www.govdata.de/dl-de/by-2-0",
        "attribution_required": True,
        "attribution_name": (
            "Freie und Hansestadt Hamburg, Landesbetrieb Geoinformation und Vermessung (LGV)"
        ),
        "share_alike": False,
        "website": "https://www.govdata.de/suche/daten/alkis-adressen-hamburg4b1b7",
    }


def test_attribution_differs_per_entry() -> None:
    source = real("be/wal/bosa-region-wallonia-fr")
    addresses = attribution(source, get_entry(source, "addresses", "state"))
    parcels = attribution(source, get_entry(source, "parcels", "state"))
    assert addresses["attribution_name"] == "Service public de Wallonie"
    assert parcels["attribution_name"] == "SPF Finances AGDP"
    assert addresses["share_alike"] is None  # the file does not say
    assert parcels["license_url"] == "https://creativecommons.org/licenses/by/4.0/"


def test_attribution_not_required_and_name_only() -> None:
    sf = real("us/ca/san_francisco")
    sf_addresses = attribution(sf, get_entry(sf, "addresses", "county"))
    assert sf_addresses["attribution_required"] is False
    assert sf_addresses["attribution_name"] == "City and County of San Francisco"
    assert sf_addresses["license_text"] == "Public Domain Dedication and License (PDDL) v1.0"

    kr = real("kr/11/provincewide")
    assert attribution(kr, get_entry(kr, "addresses", "state")) == {
        "license_text": None,
        "license_url": None,
        "attribution_required": True,
        "attribution_name": "Ministry of the Interior",
        "share_alike": None,
        "website": "https://www.juso.go.kr/addrlink/addressBuildDevNew.do?menu=geodata",
    }


def test_attribution_without_license_and_with_string_license() -> None:
    marathon = real("us/wi/marathon")
    assert attribution(marathon, get_entry(marathon, "addresses", "county")) == {
        "license_text": None,
        "license_url": None,
        "attribution_required": None,
        "attribution_name": None,
        "share_alike": None,
        "website": None,
    }
    source = {"official_website": "https://county.example.invalid/"}
    assert attribution(source, {"license": " CC0 ", "attribution": "Lane County"}) == {
        "license_text": "CC0",
        "license_url": None,
        "attribution_required": True,
        "attribution_name": "Lane County",
        "share_alike": None,
        "website": "https://county.example.invalid/",
    }
    url = attribution({}, {"license": "https://creativecommons.org/publicdomain/zero/1.0/"})
    assert url["license_url"] == "https://creativecommons.org/publicdomain/zero/1.0/"
    assert url["license_text"] is None


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("sources/us/ks/lane_county.json", "us/ks/lane_county"),
        ("us/ks/lane_county.json", "us/ks/lane_county"),
        ("/sources/fr/01/statewide.json", "fr/01/statewide"),
        ("sources\\ch\\uri.json", "ch/uri"),
    ],
)
def test_source_name(path: str, name: str) -> None:
    assert source_name(path) == name


def test_schema_ships_inside_the_package() -> None:
    schema_dir = files("shared") / "schema"
    root = json.loads((schema_dir / "source_schema_v2.json").read_text(encoding="utf-8"))
    assert root["required"] == ["schema", "coverage"]
    assert (schema_dir / "layers" / "address.json").is_file()
    assert (schema_dir / "util" / "functions" / "standard_functions.json").is_file()
    assert (schema_dir / "LICENSE").is_file()


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        (("conform", "format"), "xlsx", "unknown_format"),
        (("protocol",), "gopher", "unknown_protocol"),
        (("conform", "number"), 12, "invalid_source"),
    ],
)
def test_schema_errors_carry_the_specific_source_problem(
    where: tuple[str, ...], value: object, problem: str
) -> None:
    source = real("us/ks/lane_county")
    target = source["layers"]["addresses"][0]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(SourceError) as info:
        validate_source(source, path="us/ks/lane_county.json")
    assert info.value.problem == problem
    assert ".".join(where) in str(info.value)


def test_schema_problems_give_the_best_error_of_each_entry_and_top_level_key() -> None:
    source = real("us/wi/marathon")
    assert schema_problems(source) == []
    source["layers"]["addresses"][0]["conform"]["format"] = "xlsx"
    source["layers"]["addresses"][0]["conform"]["number"] = 12
    source["layers"]["centerlines"][0]["protocol"] = "gopher"
    del source["coverage"]
    problems = {(p.where, p.problem) for p in schema_problems(source)}
    # One per broken part: the entry with two errors gives its most relevant one.
    assert len(problems) == 3
    assert ("layers.centerlines[0].protocol", "unknown_protocol") in problems
    assert ("", "invalid_source") in problems
    (addresses,) = [p for p in problems if p[0].startswith("layers.addresses[0]")]
    assert addresses[0] in (
        "layers.addresses[0].conform.format", "layers.addresses[0].conform.number"
    )


def test_schema_problems_of_an_unsupported_version() -> None:
    source = real("us/ks/lane_county")
    source["schema"] = 3
    (problem,) = schema_problems(source)
    assert str(problem) == "schema: 3 is not a supported schema version (2)"


@pytest.mark.parametrize(
    "name", ["us/pa/philadelphia", "us/wi/fond_du_lac", "us/oh/city_of_perrysburg"]
)
def test_real_sources_that_showed_gaps_validate(name: str) -> None:
    source = gap_source(name)
    assert schema_problems(source) == []
    assert list_entries(source)


@pytest.mark.parametrize(
    ("number", "where", "message"),
    [
        ({"function": "regexp", "field": "A"}, "", "'pattern' is a required property"),
        ({"function": "regexp", "field": "A", "pattern": 3}, ".pattern",
         "3 is not of type 'string'"),
        ({"function": "join", "fields": "A"}, ".fields", "'A' is not of type 'array'"),
        ({"function": "regexp", "field": "A", "pattern": "x", "extra": 1}, "",
         "Additional properties are not allowed ('extra' was unexpected)"),
        ({"function": "prefixed_number"}, "", "'field' is a required property"),
        ({"function": "nope", "field": "A"}, "",
         "unknown function 'nope'; known here: chain, constant, first_non_empty, format, get, "
         "join, map, mph_to_kph, prefixed_number, regexp, remove_postfix, remove_prefix"),
        ({"function": "chain", "variable": "v", "functions": [{"function": "nope"}]},
         ".functions[0]",
         "unknown function 'nope'; known here: first_non_empty, format, get, join, map, "
         "postfixed_street, regexp, remove_postfix, remove_prefix"),
        ({"function": "chain", "variable": "v", "functions": [
            {"function": "regexp", "field": 3, "pattern": "x"}]}, ".functions[0].field",
         "3 is not of type 'string'"),
    ],
)
def test_a_bad_function_is_reported_by_the_branch_of_its_name(
    number: dict[str, Any], where: str, message: str
) -> None:
    # Every function schema pins "function" to its name; the error of the function named is
    # the one worth reading, not "'prefixed_number' was expected" from another branch.
    source = real("us/tx/city_of_mckinney")
    source["layers"]["addresses"][0]["conform"]["number"] = number
    (problem,) = schema_problems(source)
    assert (problem.where, problem.message) == (
        "layers.addresses[0].conform.number" + where, message
    )
    with pytest.raises(SourceError, match=re.escape(message)):
        validate_source(source, path="x")
