"""Table tests of the conform functions, checked against the reference Machine's behaviour."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from services.worker.conform.fields import FieldResolver
from services.worker.conform.functions import Evaluator, attribute_specs, referenced_fields
from services.worker.errors import RunError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SOURCES = FIXTURES / "oa-sources"
GAPS = FIXTURES / "oa-sources-gaps"


def batch_of(columns: dict[str, list[str | None]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({k: pa.array(v, pa.string()) for k, v in columns.items()})


def run(spec: Any, columns: dict[str, list[str | None]], attribute: str = "x") -> list[str | None]:
    batch = batch_of(columns)
    return Evaluator({attribute: spec}, batch.schema.names).evaluate(batch)[attribute].to_pylist()


def conform_of(
    path: str, layer: str = "addresses", index: int = 0, folder: Path = SOURCES
) -> dict[str, Any]:
    source = json.loads((folder / path).read_text())
    return source["layers"][layer][index]["conform"]


# --- fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "wanted", "found"),
    [
        (["Street", "NUMBER"], "street", "Street"),
        (["Street", "NUMBER"], "number", "NUMBER"),
        (["street", "STREET"], "STREET", "STREET"),  # exact match wins
        (["street", "STREET"], "Street", "street"),  # first in file order otherwise
        (["緯度", "経度"], "経度", "経度"),
        (["Straße"], "STRASSE", "Straße"),  # casefold, not lower
        (["EPSG:4326_lon"], "epsg:4326_LON", "EPSG:4326_lon"),
    ],
)
def test_resolver_finds_fields_case_insensitively(
    names: list[str], wanted: str, found: str
) -> None:
    assert FieldResolver(names).resolve(wanted) == found


def test_resolver_names_missing_field_and_lists_available() -> None:
    with pytest.raises(RunError) as caught:
        FieldResolver(["a", "B", "__geometry__"]).resolve("street")
    assert caught.value.problem == "conform_failed"
    assert "'street'" in str(caught.value)
    assert "'a', 'B'" in str(caught.value)
    assert "__geometry__" not in str(caught.value)


# --- plain fields and lists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "columns", "expected"),
    [
        ("Street", {"STREET": ["Main St", "", None]}, ["Main St", None, None]),
        ("名称", {"名称": ["大同路"]}, ["大同路"]),
        (
            ["PREDIR", "STREET", "TYPE"],
            {
                "PREDIR": ["N", "", None],
                "STREET": ["Main", "Oak", "Élysée"],
                "TYPE": ["", "Ave", None],
            },
            ["N Main", "Oak Ave", "Élysée"],
        ),
        (["a", "b"], {"a": [" x ", None], "b": ["  y", None]}, ["x y", None]),
        (["hausnr", "zusatz"], {"hausnr": ["12", "7"], "zusatz": ["a", ""]}, ["12 a", "7"]),
    ],
)
def test_plain_field_and_list(spec: Any, columns: dict, expected: list) -> None:
    assert run(spec, columns) == expected


# --- join ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "columns", "expected"),
    [
        # be/wal id
        (
            {"function": "join", "fields": ["region_code", "address_id"], "separator": ":"},
            {"region_code": ["BE-WAL", "BE-WAL", None], "address_id": ["123", "", None]},
            ["BE-WAL:123", "BE-WAL", None],
        ),
        # fr/01 number: empty separator
        (
            {"function": "join", "fields": ["numero", "rep"], "separator": ""},
            {"numero": ["12", "3", None], "rep": ["bis", None, "ter"]},
            ["12bis", "3", "ter"],
        ),
        # jp/tokyo: CJK field names
        (
            {"function": "join", "fields": ["街区符号・地番", "座標系番号"], "separator": "-"},
            {"街区符号・地番": ["3", "4"], "座標系番号": ["9", " "]},
            ["3-9", "4"],
        ),
        # default separator is a space; values trimmed
        (
            {"function": "join", "fields": ["A", "b"]},
            {"a": [" 1 ", ""], "B": ["x", ""]},
            ["1 x", None],
        ),
        # multi-character and non-ASCII separators
        (
            {"function": "join", "fields": ["a", "b", "c"], "separator": "・"},
            {"a": ["", "p", None], "b": ["q", "", None], "c": ["r", "s", "t"]},
            ["q・r", "p・s", "t"],
        ),
        # every value filled (the one-kernel way), trimmed, non-ASCII
        (
            {"function": "join", "fields": ["a", "b"], "separator": "-"},
            {"a": [" 1", "2 ", "Ñ"], "b": ["x", "ÿ", " 3 "]},
            ["1-x", "2-ÿ", "Ñ-3"],
        ),
        # filled until trimmed: a value of spaces is empty
        (
            {"function": "join", "fields": ["a", "b"], "separator": "-"},
            {"a": ["1", "2"], "b": ["x", "  "]},
            ["1-x", "2"],
        ),
    ],
)
def test_join(spec: dict, columns: dict, expected: list) -> None:
    assert run(spec, columns) == expected


# --- regexp --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "replace", "values", "expected"),
    [
        # Yolo County (ATTRIBUTE_FUNCTIONS.md): extract without replace
        ("^([0-9]+)", None, ["617 TUMBLEWEED TRL", "TUMBLEWEED"], ["617", None]),
        (
            "^(?:[0-9]+ )(.*)",
            "$1",
            ["617 TUMBLEWEED TRL", "TUMBLEWEED"],
            ["TUMBLEWEED TRL", "TUMBLEWEED"],
        ),
        # without replace, all groups concatenated; a group that took no part is empty
        (r"^(\d+)(?:-(\w))?", None, ["12-a Main", "12 Main"], ["12a", "12"]),
        # without groups, the whole match (reference: '' - see module notes)
        (r"\d+", None, ["Rue 12 bis", "none"], ["12", None]),
        # ${n} and $n back-references, $n followed by letters and digits
        (r"^(\d+) (\w+)", "${2}-$1", ["12 Main St"], ["Main-12 St"]),
        (r"^(\d+) (\w+)", "$2x$1", ["12 Main"], ["Mainx12"]),
        (r"^(\d+)(\d)", "${1}0", ["123"], ["120"]),
        # Python-style back-references also work, as they did in the reference
        (r"^(\d+) (.*)$", r"\2 \g<1>", ["5 Oak"], ["Oak 5"]),
        # every match is replaced, as re.sub does
        ("a", "o", ["banana"], ["bonono"]),
        # a literal backslash in the replacement
        ("-", r"\\", ["a-b"], ["a\\b"]),
        # unicode: \w and \d keep Python's meaning on accented and CJK text
        (r"^(\w+)", None, ["Élysée 5", "東京都 1"], ["Élysée", "東京都"]),
        (r"(\d+)号", None, ["１２号", "12号"], ["１２", "12"]),
        (r"^(.+?)\s+UR$", "$1", ["Flüelen\u00a0UR", "Altdorf UR"], ["Flüelen", "Altdorf"]),
        # {,n} is {0,n} in Python
        (r"^(a{,2})", None, ["aaa"], ["aa"]),
        # case-insensitive flag
        (r"(?i)^(rue) ", "Street ", ["RUE Haute"], ["Street Haute"]),
        # an empty replace extracts, as the reference tested ``if replace:``
        (r"(?i)^(rue) ", "", ["RUE Haute"], ["RUE"]),
        # empty and missing values
        ("^(.*)$", "[$1]", ["", None], ["[]", "[]"]),
    ],
)
def test_regexp(pattern: str, replace: str | None, values: list, expected: list) -> None:
    spec: dict[str, Any] = {"function": "regexp", "field": "f", "pattern": pattern}
    if replace is not None:
        spec["replace"] = replace
    assert run(spec, {"F": values}) == expected


CH_URI_PATTERN = r"^(.+?)(?:(?<=Seedorf)UR|\s+UR)?\s*$"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("SeedorfUR", "Seedorf"), ("Altdorf UR", "Altdorf"), ("Flüelen", "Flüelen"), ("", None)],
)
def test_regexp_lookbehind_falls_back_to_python(value: str, expected: str | None) -> None:
    conform = conform_of("ch/uri.json")
    assert conform["city"]["pattern"] == CH_URI_PATTERN
    assert run(conform["city"], {"ortschaft": [value]}) == [expected]


PYTHON_CHECKS = [
    (r"^(\d+)\s*(.*)$", None),
    (r"(\w+)\s+(\w+)$", "$2, $1"),
    (r"^\s*(\S+)", None),
    (r"[\d\s]+", "#"),
    (r"(?i)(apt|ste)\.?\s*(\w+)$", "unit ${2}"),
    (r"^(.*?)(?=\s+\d)", None),  # lookahead: Python fallback
    (r"(\w)\1", "<$1>"),  # back-reference: Python fallback
    (r"\bSt\b", "Street"),
]
PYTHON_VALUES = [
    "123 Main St",
    "  7a Rue de l'Église",
    "１２３\u3000東京",
    "Apt. 4B Hillside",
    "Bldg 2 Ste 300",
    "",
    "Straße 5",
    "aabb St.",
    "x\ty",
]


@pytest.mark.parametrize(("pattern", "replace"), PYTHON_CHECKS)
def test_regexp_agrees_with_python_re(pattern: str, replace: str | None) -> None:
    compiled = re.compile(pattern)
    expected: list[str | None] = []
    for value in PYTHON_VALUES:
        if replace is not None:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replace)
            got = compiled.sub(template, value)
        else:
            match = compiled.search(value)
            got = "".join(g or "" for g in match.groups()) if match else ""
        expected.append(got or None)
    spec: dict[str, Any] = {"function": "regexp", "field": "v", "pattern": pattern}
    if replace is not None:
        spec["replace"] = replace
    assert run(spec, {"v": PYTHON_VALUES}) == expected


# --- format --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "rows", "expected"),
    [
        # cn/42/wuhan: the text after the last placeholder is always written, the text
        # before a later placeholder only with its value
        (
            {"function": "format", "fields": ["MPH", "LPH"], "format": "$1号$2栋"},
            [("5", "3"), ("5", ""), ("", "3"), ("", ""), (None, None)],
            ["5号3栋", "5栋", "3栋", None, None],
        ),
        # nl/countrywide from ATTRIBUTE_FUNCTIONS.md
        (
            {"function": "format", "fields": ["n", "l", "t"], "format": "$1$2-$3"},
            [("25", "k", "143"), ("4", "", ""), ("123", "m", ""), ("7", "", "2")],
            ["25k-143", "4", "123m", "7-2"],
        ),
        # leading text is written when any field has a value; values trimmed, ".0" dropped
        (
            {"function": "format", "fields": ["a", "b"], "format": "No. $1/$2"},
            [(" 12.0 ", "3.0"), ("", "4"), ("", "")],
            ["No. 12/3", "No. 4", None],
        ),
        # a placeholder naming no field is dropped with the text before it
        (
            {"function": "format", "fields": ["a"], "format": "$1 and $2!"},
            [("x",), ("",)],
            ["x!", None],
        ),
    ],
)
def test_format(spec: dict, rows: list[tuple], expected: list) -> None:
    columns = {name: [row[i] for row in rows] for i, name in enumerate(spec["fields"])}
    assert run(spec, columns) == expected


# --- prefixed_number / postfixed_street / postfixed_unit -----------------------------------


@pytest.mark.parametrize(
    ("value", "number", "street"),
    [
        ("123 Main St", "123", "Main St"),
        ("123a Main St", "123a", "Main St"),
        ("123-a Main St", "123-a", "Main St"),
        ("123 1/2 Main St", "123 1/2", "Main St"),
        ("123-1/2 Main St", "123-1/2", "Main St"),
        ("69-15 51st Ave", "69-15", "51st Ave"),
        ("3rd St", None, "3rd St"),
        ("Main St", None, "Main St"),
        ("  42   Oak Ave", "42", "Oak Ave"),
        ("123", None, "123"),  # a number must be followed by a space
        ("１２ 東京", "１２", "東京"),  # Unicode digits, as Python's \d
        ("12\u3000Rue", "12", "Rue"),  # Unicode space, as Python's \s
        ("", None, None),
        (None, None, None),
    ],
)
def test_prefixed_number_and_postfixed_street(
    value: str | None, number: str | None, street: str | None
) -> None:
    batch = batch_of({"PhysAddr": [value]})
    conform = conform_of("us/al/washington.json")
    out = Evaluator(attribute_specs(conform), batch.schema.names).evaluate(batch)
    assert out["number"].to_pylist() == [number]
    assert out["street"].to_pylist() == [street]


_NUMBER_EDGES: list[tuple[str, str | None, str | None]] = [
    ("12\nMain St", "12", "Main St"),  # \s+ after the number takes the newline
    ("12 Main\nSt", "12", "Main"),  # the street, like Python's '.', stops at a newline
    ("Main\nSt", None, "Main"),
    ("\n12 Main", "12", "Main"),
    ("12\n", "12", None),
    ("12 1/2\n3 Oak", "12 1/2", "3 Oak"),
    (" \t12\x1cMain", "12", "Main"),  # \x1c is whitespace to Python
    ("12\u2003\nMain", "12", "Main"),
    ("12 34 Main", "12", "34 Main"),  # only the first number
    ("12-34A Main", None, "12-34A Main"),  # no alternative is followed by a space
    ("12-3/4 x", "12-3/4", "x"),
    ("12\u017f Main", "12\u017f", "Main"),  # long s is an 's' to (?i)[A-Z]
    ("१२ Main", "१२", "Main"),  # Devanagari digits
    ("12\xa0Rue de l'Église", "12", "Rue de l'Église"),
    ("大同路 12", None, "大同路 12"),
    # A Unicode digit or space reached after ASCII digits, spaces, '-', '/' or a letter:
    ("12 \u3000Main", "12", "Main"),
    ("12a\u3000Main", "12a", "Main"),
    ("12-१२ x", "12-१२", "x"),
    ("12 1/२ x", "12 1/२", "x"),
    ("\u300012 Main", "12", "Main"),
    ("Main \u3000St", None, "Main \u3000St"),
]


@pytest.mark.parametrize(("value", "number", "street"), _NUMBER_EDGES)
def test_prefixed_number_and_postfixed_street_edges(
    value: str, number: str | None, street: str | None
) -> None:
    specs = {
        "number": {"function": "prefixed_number", "field": "a"},
        "street": {"function": "postfixed_street", "field": "a"},
    }
    out = Evaluator(specs, ["a"]).evaluate(batch_of({"a": [value]}))
    assert out["number"].to_pylist() == [number]
    assert out["street"].to_pylist() == [street]


def test_prefixed_number_and_postfixed_street_match_python_in_one_batch() -> None:
    """ASCII, Unicode and newline rows together, sliced, and each function on its own."""
    pattern = re.compile(r"(?i)^(?:\s*(\d+(?:[ -]\d/\d)?|\d+-\d+|\d+-?[A-Z])\s+)?(.*)")
    values = [v for v, _, _ in _NUMBER_EDGES] + ["7 Oak", None, "", "  ", "１２ 東京", "9b Elm"]
    table = pa.table({"a": pa.array(["x", *values], pa.string())}).slice(1)
    batch = table.to_batches()[0]
    expected = [m for m in (pattern.match(v or "") for v in values) if m is not None]
    assert len(expected) == len(values)  # the number is optional: every value matches
    for attribute, group in (("number", 1), ("street", 2)):
        function = "prefixed_number" if group == 1 else "postfixed_street"
        out = Evaluator({attribute: {"function": function, "field": "a"}}, ["a"]).evaluate(batch)
        assert out[attribute].to_pylist() == [m.group(group) or None for m in expected]


@pytest.mark.parametrize(
    ("value", "street", "unit"),
    [
        ("1003 W LAMAR ST", "W LAMAR ST", None),
        ("900 S TENNESSEE ST BLDG 11A", "S TENNESSEE ST", "BLDG 11A"),
        ("5610 N MCDONALD ST STE C", "N MCDONALD ST", "STE C"),
        ("12 Main Street Apt. 3", "Main Street", "Apt. 3"),
        ("12 Main Street #3", "Main Street", "#3"),
        ("12 Main Street # 3", "Main Street", "# 3"),
        ("12 Main Street unit 7", "Main Street", "unit 7"),
        ("12 Lotus Lane", "Lotus Lane", None),
    ],
)
def test_postfixed_street_with_units_and_postfixed_unit(
    value: str, street: str, unit: str | None
) -> None:
    batch = batch_of({"SitusAdd": [value]})
    conform = conform_of("us/tx/city_of_mckinney.json")
    out = Evaluator(attribute_specs(conform), [*batch.schema.names, "City"]).evaluate(batch)
    assert out["street"].to_pylist() == [street]
    assert out["unit"].to_pylist() == [unit]


# --- remove_prefix / remove_postfix --------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "values", "removes", "expected"),
    [
        ("remove_prefix", ["2130 MAPLE AV NE"], ["2130"], ["MAPLE AV NE"]),
        ("remove_prefix", ["MAPLE AV NE"], ["2130"], ["MAPLE AV NE"]),
        ("remove_prefix", ["1234 Oak"], ["12"], ["34 Oak"]),  # plain string prefix
        ("remove_prefix", ["  Oak"], [""], ["Oak"]),  # empty prefix: spaces still stripped
        ("remove_prefix", ["Oak"], ["Oak Street"], ["Oak"]),
        ("remove_prefix", [None], ["x"], [None]),
        # tw/ila/datong: number is the address without the road
        ("remove_prefix", ["中山路一段10號"], ["中山路一段"], ["10號"]),
        ("remove_prefix", ["Église 5"], ["Égl"], ["ise 5"]),
        (
            "remove_postfix",
            ["123 MAIN ST EFFINGHAM IL 62401"],
            ["EFFINGHAM IL 62401"],
            ["123 MAIN ST"],
        ),
        ("remove_postfix", ["123 MAIN ST"], ["TEUTOPOLIS IL"], ["123 MAIN ST"]),
        ("remove_postfix", ["123 MAIN ST  "], [""], ["123 MAIN ST  "]),  # empty postfix ignored
        ("remove_postfix", ["東京都千代田区"], ["千代田区"], ["東京都"]),
        ("remove_postfix", ["ab"], ["xab"], ["ab"]),
    ],
)
def test_remove_prefix_and_postfix(
    function: str, values: list, removes: list, expected: list
) -> None:
    spec = {"function": function, "field": "full", "field_to_remove": "part"}
    assert run(spec, {"full": values, "part": removes}) == expected


def test_remove_prefix_on_many_rows_and_sliced_batches() -> None:
    full = [f"{n} Rue {n}" for n in range(1000)]
    part = [str(n) if n % 3 else "x" for n in range(1000)]
    batch = batch_of({"full": full, "part": part}).slice(100, 500)
    spec = {"function": "remove_prefix", "field": "full", "field_to_remove": "part"}
    got = Evaluator({"x": spec}, batch.schema.names).evaluate(batch)["x"].to_pylist()
    expected = [
        f[len(p) :].lstrip(" ") if f.startswith(p) else f
        for f, p in zip(full[100:600], part[100:600], strict=True)
    ]
    assert got == expected


# --- first_non_empty / constant / map / get / mph_to_kph -----------------------------------


@pytest.mark.parametrize(
    ("spec", "columns", "expected"),
    [
        # be/wal street
        (
            {"function": "first_non_empty", "fields": ["streetname_fr", "streetname_de"]},
            {
                "streetname_fr": ["Rue Haute", "", None, "  "],
                "streetname_de": ["x", "Hauptstraße", None, "B"],
            },
            ["Rue Haute", "Hauptstraße", None, "B"],
        ),
        ({"function": "constant", "value": "IL"}, {"a": ["1", None]}, ["IL", "IL"]),
        ({"function": "constant", "value": "San Francisco"}, {"a": ["1"]}, ["San Francisco"]),
        ({"function": "constant", "value": ""}, {"a": ["1"]}, [None]),
        (3, {"a": ["1", "2"]}, ["3", "3"]),  # "accuracy": 3
        # us/tx/city_of_san_marcos oneway
        (
            {
                "function": "map",
                "field": "ONEWAY",
                "mapping": {"FT": "yes", "TF": "reverse", "B": "no"},
                "else": "no",
            },
            {"oneway": ["FT", "TF", "B", "", None, "ft", " TF "]},
            ["yes", "reverse", "no", "no", "no", "no", "reverse"],
        ),
        # fr/01 accuracy: integer targets, non-ASCII keys
        (
            {
                "function": "map",
                "field": "type_position",
                "mapping": {"bâtiment": 1, "cage d’escalier": 2},
                "else": 5,
            },
            {"type_position": ["bâtiment", "cage d’escalier", "autre"]},
            ["1", "2", "5"],
        ),
        # without else, unmapped values pass through
        (
            {"function": "map", "field": "c", "mapping": {"1": "primary"}},
            {"c": ["1", "7", None]},
            ["primary", "7", None],
        ),
        (
            {"function": "get", "field": "names", "index": 1},
            {"names": ['["a", "b"]', '["a"]', "plain", None, "[1, 2.5]", '["x", null]']},
            ["b", None, None, None, "2.5", None],
        ),
        ({"function": "get", "field": "names", "index": -1}, {"names": ['["a", "東"]']}, ["東"]),
        # us/tx/city_of_san_marcos speed
        (
            {"function": "mph_to_kph", "field": "SPEEDLIMIT"},
            {"SPEEDLIMIT": ["30", "25", " 45 ", "35.0", "", None, "n/a", "0"]},
            ["48", "40", "72", "56", None, None, None, "0"],
        ),
    ],
)
def test_other_functions(spec: Any, columns: dict, expected: list) -> None:
    assert run(spec, columns) == expected


# --- chain ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "street", "city", "postcode"),
    [
        ("123 MAIN ST YUMA 80759", "MAIN ST", "YUMA", "80759"),
        ("45 COUNTY ROAD 12 ECKLEY 80727", "COUNTY ROAD 12", "ECKLEY", "80727"),
        ("MAIN ST", "MAIN ST", "MAIN ST", "MAIN ST"),  # no match: the value stays, as re.sub
    ],
)
def test_chain_us_co_yuma(address: str, street: str, city: str, postcode: str) -> None:
    batch = batch_of({"TSC_Site_Address": [address]})
    out = Evaluator(attribute_specs(conform_of("us/co/yuma.json")), batch.schema.names).evaluate(
        batch
    )
    assert out["street"].to_pylist() == [street]
    assert out["city"].to_pylist() == [city]
    assert out["postcode"].to_pylist() == [postcode]


@pytest.mark.parametrize(
    ("site_address", "site_csz", "street", "city", "postcode"),
    [
        (
            "1204 W FAYETTE AVE EFFINGHAM IL 62401",
            "EFFINGHAM IL 62401",
            "W FAYETTE AVE",
            "EFFINGHAM",
            "62401",
        ),
        (
            "12 1/2 N 3RD ST ALTAMONT IL 62411-1234",
            "ALTAMONT IL 62411-1234",
            "N 3RD ST",
            "ALTAMONT",
            "62411-1234",
        ),
        ("RR 2", "", "RR 2", None, None),
    ],
)
def test_chain_us_il_effingham(
    site_address: str, site_csz: str, street: str, city: str | None, postcode: str | None
) -> None:
    batch = batch_of({"SiteHouse": ["1"], "SiteAddress": [site_address], "SiteCSZ": [site_csz]})
    conform = conform_of("us/il/effingham.json")
    out = Evaluator(attribute_specs(conform), batch.schema.names).evaluate(batch)
    assert out["street"].to_pylist() == [street]
    assert out["city"].to_pylist() == [city]
    assert out["postcode"].to_pylist() == [postcode]
    assert out["region"].to_pylist() == ["IL"]


@pytest.mark.parametrize(
    ("municipal", "suffix", "number"),
    [
        ("12", "", "12"),
        ("12", "A", "12A"),
        ("12", "1/2", "12 1/2"),
        ("12", "-14", "12-14"),
        ("12.0", "", "12"),
        ("12", "&", "12"),
    ],
)
def test_chain_ca_qc_province(municipal: str, suffix: str, number: str) -> None:
    columns = {
        "numero_municipal": [municipal],
        "numero_municipal_suffixe": [suffix],
        "numero_unite": [None],
        "odonyme_recompose_court": ["rue Principale"],
        "nom_municipalite": ["Québec"],
        "code_postal": ["G1R 4S9"],
        "latitude": ["46,81"],
        "longitude": ["-71,2"],
    }
    batch = batch_of(columns)
    out = Evaluator(
        attribute_specs(conform_of("ca/qc/province.json")), batch.schema.names
    ).evaluate(batch)
    assert out["number"].to_pylist() == [number]
    assert out["city"].to_pylist() == ["Québec"]
    assert out["lon"].to_pylist() == ["-71,2"]


def test_chain_variables_and_earlier_attributes_are_readable() -> None:
    specs = {
        "street": {
            "function": "chain",
            "variable": "wip",
            "functions": [
                "addr",
                {
                    "function": "regexp",
                    "field": "OA:WIP",
                    "pattern": r"^\d+ (.*)$",
                    "replace": "$1",
                },
                {"function": "join", "fields": ["oa:wip", "suffix"]},
            ],
        },
        "city": {"function": "regexp", "field": "oa:street", "pattern": r"(\w+)$"},
    }
    batch = batch_of({"addr": ["12 Main", "Oak"], "suffix": ["St", None]})
    out = Evaluator(specs, batch.schema.names).evaluate(batch)
    assert out["street"].to_pylist() == ["Main St", "Oak"]
    assert out["city"].to_pylist() == ["St", "Oak"]


def chain(variable: str, *steps: Any) -> dict[str, Any]:
    return {"function": "chain", "variable": variable, "functions": list(steps)}


def join(*fields: str, separator: str = "-") -> dict[str, Any]:
    return {"function": "join", "fields": list(fields), "separator": separator}


PHILADELPHIA_ZIP = chain(
    "full_zip",
    {"function": "regexp", "field": "zip_code", "pattern": "^([0-9]{5})-?([0-9]{4}|)$",
     "replace": "$1-$2"},
    {"function": "regexp", "field": "full_zip", "pattern": "^(.*?)-?$"},
)


@pytest.mark.parametrize(
    ("specs", "columns", "expected"),
    [
        pytest.param(  # us/pa/philadelphia: the second step reads the variable by name
            {"postcode": PHILADELPHIA_ZIP},
            {"zip_code": ["19143", "191432010", "19143-", "19143-2010", "", None]},
            {"postcode": ["19143", "19143-2010", "19143", "19143-2010", None, None]},
            id="plain name",
        ),
        pytest.param(  # the same chain reading oa:full_zip
            {"postcode": chain("full_zip", PHILADELPHIA_ZIP["functions"][0],
                               {**PHILADELPHIA_ZIP["functions"][1], "field": "OA:Full_Zip"})},
            {"zip_code": ["191432010", "19143"]},
            {"postcode": ["19143-2010", "19143"]},
            id="oa: name",
        ),
        pytest.param(  # read in any case, both ways in one step
            {"street": chain("Wip", join("a", "b"), join("wip", "oa:WIP", "WIP"))},
            {"a": ["1"], "b": ["2"]},
            {"street": ["1-2-1-2-1-2"]},
            id="case",
        ),
        pytest.param(  # a real column of that name: read until the variable is set
            {
                "number": "full_zip",
                "postcode": chain("full_zip", join("full_zip", "z"), join("full_zip", "z")),
                "city": "full_zip",
            },
            {"full_zip": ["real"], "z": ["1"]},
            {"number": ["real"], "postcode": ["real-1-1"], "city": ["real-1-1"]},
            id="real column",
        ),
        pytest.param(  # read before it is written, without such a column: empty
            {"street": chain("wip", join("wip", "a"), join("wip", "a"))},
            {"a": ["x", None]},
            {"street": ["x-x", None]},
            id="read before written",
        ),
        pytest.param(  # later attributes read the variable by name as a field
            {
                "street": chain("wip", {"function": "postfixed_street", "field": "addr"},
                                {"function": "remove_postfix", "field": "wip",
                                 "field_to_remove": "unit"}),
                "city": {"function": "regexp", "field": "WIP", "pattern": "^(\\w+)"},
            },
            {"addr": ["12 Main St Apt 4", "9 Oak Ave"], "unit": ["Apt 4", ""]},
            {"street": ["Main St", "Oak Ave"], "city": ["Main", "Oak"]},
            id="later attribute",
        ),
        pytest.param(  # the reference's nested chain test
            {"number": chain("foo", {"function": "format", "fields": ["a1", "a2"],
                                     "format": "$1-$2"},
                             chain("bar", {"function": "format", "fields": ["foo", "a3"],
                                           "format": "$1-$2"},
                                   {"function": "remove_postfix", "field": "bar",
                                    "field_to_remove": "b1"}))},
            {"a1": ["12", "12"], "a2": ["34", None], "a3": ["56 UNIT 5"] * 2,
             "b1": ["UNIT 5"] * 2},
            {"number": ["12-34-56", "12-56"]},
            id="nested",
        ),
        pytest.param(  # two chains of one variable: the second starts from the first's value
            {"street": chain("v", join("a")), "city": chain("v", join("v", "a"))},
            {"a": ["x"]},
            {"street": ["x"], "city": ["x-x"]},
            id="same variable twice",
        ),
    ],
)
def test_chain_variables(
    specs: dict[str, Any], columns: dict[str, list[str | None]], expected: dict[str, list[Any]]
) -> None:
    batch = batch_of(columns)
    out = Evaluator(specs, batch.schema.names).evaluate(batch)
    assert {name: out[name].to_pylist() for name in expected} == expected


@pytest.mark.parametrize(
    ("path", "attribute", "columns", "expected"),
    [
        ("us/al/lee.json", "unit",
         {"ADDR1": ["105 LEE ROAD 123 LOT 7", "12 MAIN ST"], "NUMBER": ["105", "12"],
          "STREET": ["LEE ROAD 123", "MAIN ST"]},
         ["LOT 7", None]),
        ("us/ca/inyo.json", "street",
         {"FULL_ADDR": ["150 N EDWARDS ST UNIT B", "9 MAIN ST"], "UNIT2": ["UNIT B", ""]},
         ["N EDWARDS ST", "MAIN ST"]),
        ("us/wi/fond_du_lac.json", "street",
         {"PRI_NAME": ["STH 23", "USH 45", "CTH K", "MAIN"], "DIRECTION": ["N", "", None, "W"],
          "TYPE": ["", "", "", "ST"]},
         ["N State Highway 23", "US Highway 45", "County Highway K", "W MAIN ST"]),
        ("us/wi/fond_du_lac.json", "city",
         {"JURISDICTI": ["OA", "FD", "RI", "XX"]},
         ["Oakfield", "Fond du Lac", "Ripon", "XX"]),
        ("us/wi/juneau.json", "postcode",
         {"ZIPCODE": ["NEKOOSA", "54457", "WISCONSIN DELLS"]},
         ["54457", "54457", "53965"]),
    ],
)
def test_real_chains_reading_their_variable_by_name(
    path: str, attribute: str, columns: dict[str, list[str | None]], expected: list[str | None]
) -> None:
    conform = conform_of(path, folder=GAPS)
    batch = batch_of(columns)
    out = Evaluator({attribute: conform[attribute]}, batch.schema.names).evaluate(batch)
    assert out[attribute].to_pylist() == expected


def test_referenced_fields_leave_out_chain_variables_read_by_name() -> None:
    conform = conform_of("us/pa/philadelphia.json", folder=GAPS)
    assert "full_zip" not in referenced_fields(conform)
    assert "zip_code" in referenced_fields(conform)
    # Read before the chain writes it, the name may be a real column: it stays in.
    assert referenced_fields({"street": chain("v", join("v", "a"))}) == {"v", "a"}
    assert referenced_fields({"street": chain("v", "a", join("v", "b"))}) == {"a", "b"}


# --- get -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "values", "expected"),
    [
        # The reference's own test: Python's repr of a GDAL string list.
        (1, ["['Polska', 'kujawsko-pomorskie','brodnicki', 'Bartnicza']"],
         ["kujawsko-pomorskie"]),
        (1, ['["Polska", "kujawsko-pomorskie"]', '["Polska","kujawsko-pomorskie"]'],
         ["kujawsko-pomorskie"] * 2),
        (1, ["['a',   'b']", "[ 'a' , 'b' ]", "a, b", "a,b"], ["b"] * 4),
        (0, ["['a', 'b']", "plain text", "[]", "", None], ["a", "plain text", None, None, None]),
        (2, ["['a', 'b']", "plain"], [None, None]),  # out of range: empty
        (-1, ["['a', 'b', 'c']", "['a']", "[]"], ["c", "a", None]),
        (1, ['["Smith, John", "x"]', "[\"O'Brien\", 'x']"], ["x", "x"]),
        (0, ['["Smith, John", "x"]', "[\"O'Brien\", 'x']", '["a\\"b"]'],
         ["Smith, John", "O'Brien", 'a"b']),
        (1, ["[1, 2.5]", '["x", null]'], ["2.5", None]),
        (1000, [str(list(range(1002)))], ["1000"]),
    ],
)
def test_get_reads_one_item_of_a_list_written_as_text(
    index: int, values: list[str | None], expected: list[str | None]
) -> None:
    assert run({"function": "get", "field": "f", "index": index}, {"f": values}) == expected


# --- whole real conforms -------------------------------------------------------------------


def test_be_wal_conform() -> None:
    conform = conform_of("be/wal/bosa-region-wallonia-fr.json")
    columns = {
        "house_number": ["12"],
        "streetname_fr": [""],
        "streetname_de": ["Aachener Straße"],
        "municipality_name_fr": ["Eupen"],
        "postcode": ["4700"],
        "region_code": ["BE-WAL"],
        "address_id": ["987"],
        "box_number": [None],
        "EPSG:4326_lon": ["6.03"],
        "EPSG:4326_lat": ["50.63"],
    }
    batch = batch_of(columns)
    out = Evaluator(attribute_specs(conform), batch.schema.names).evaluate(batch)
    assert {k: v.to_pylist()[0] for k, v in out.items()} == {
        "accuracy": "3",
        "number": "12",
        "street": "Aachener Straße",
        "city": "Eupen",
        "postcode": "4700",
        "id": "BE-WAL:987",
        "unit": None,
        "lon": "6.03",
        "lat": "50.63",
    }


def test_lon_lat_can_be_functions() -> None:
    specs = {
        "lon": {"function": "regexp", "field": "geom", "pattern": r"POINT \((\S+) "},
        "lat": {"function": "regexp", "field": "geom", "pattern": r"POINT \(\S+ ([^)]+)\)"},
    }
    batch = batch_of({"GEOM": ["POINT (6.5 46.2)"]})
    out = Evaluator(specs, batch.schema.names).evaluate(batch)
    assert out["lon"].to_pylist() == ["6.5"]
    assert out["lat"].to_pylist() == ["46.2"]


def test_outputs_are_strings_with_batch_length() -> None:
    batch = batch_of({"a": ["1", None, ""]})
    out = Evaluator({"x": "a", "y": {"function": "constant", "value": "k"}}, ["a"]).evaluate(batch)
    assert all(v.type == pa.string() and len(v) == 3 for v in out.values())


# --- referenced fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "layer", "expected"),
    [
        ("us/co/yuma.json", "addresses", {"TSC_Site_Address"}),
        ("us/il/effingham.json", "addresses", {"SiteHouse", "SiteAddress", "SiteCSZ"}),
        (
            "be/wal/bosa-region-wallonia-fr.json",
            "addresses",
            {
                "house_number",
                "streetname_fr",
                "streetname_de",
                "municipality_name_fr",
                "postcode",
                "region_code",
                "address_id",
                "box_number",
                "EPSG:4326_lon",
                "EPSG:4326_lat",
            },
        ),
        (
            "us/tx/city_of_san_marcos.json",
            "centerlines",
            {"MAXIMOID", "FULLSTREET", "ONEWAY", "SPEEDLIMIT", "CLASS", "L_ZIP", "R_ZIP"},
        ),
        ("us/nc/davie.json", "addresses", {"HSNM", "PREDIR", "STREET", "TYPE", "POSTDIR", "UNIT"}),
    ],
)
def test_referenced_fields(path: str, layer: str, expected: set[str]) -> None:
    assert referenced_fields(conform_of(path, layer)) == expected


def test_referenced_fields_skip_metadata_and_accuracy_codes() -> None:
    conform = {
        "format": "csv",
        "file": "x.csv",
        "srs": "EPSG:2913",
        "accuracy": "2",
        "number": "N",
        "street": "S",
    }
    assert referenced_fields(conform) == {"N", "S"}


# --- bad specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"function": "split", "field": "a"}, "unknown function 'split'"),
        ({"field": "a"}, "unknown function None"),
        ({"function": "regexp", "field": "a"}, "needs 'pattern'"),
        ({"function": "regexp", "field": "a", "pattern": "(unclosed"}, "does not compile"),
        ({"function": "regexp", "field": "a", "pattern": "(x)", "replace": "$2"}, "lacks"),
        ({"function": "join", "fields": "a"}, "wrong type"),
        ({"function": "join", "fields": []}, "at least one field"),
        ({"function": "format", "fields": ["a"]}, "needs 'format'"),
        ({"function": "get", "field": "a", "index": "1"}, "wrong type"),
        ({"function": "chain", "variable": "v", "functions": []}, "at least one function"),
        (
            {"function": "chain", "variable": "v", "functions": [{"function": "nope"}]},
            "chain step 1",
        ),
        ({"function": "constant", "value": ["a"]}, "constant must be"),
        (
            {"function": "postfixed_street", "field": "a", "may_contain_units": "yes"},
            "true or false",
        ),
        ("missing", "'missing'"),
        (["a", "missing"], "'missing'"),
        ({"function": "remove_prefix", "field": "a", "field_to_remove": "gone"}, "'gone'"),
        (True, "cannot read value spec"),
    ],
)
def test_bad_specs_fail_naming_the_attribute(spec: Any, message: str) -> None:
    with pytest.raises(RunError) as caught:
        Evaluator({"street": spec}, ["a"])
    assert caught.value.problem == "conform_failed"
    assert "attribute 'street'" in str(caught.value)
    assert message in str(caught.value)


def test_filled_everywhere_reads_only_its_slice() -> None:
    from services.worker.conform.arrays import filled_everywhere as _filled_everywhere

    values = pa.array(["", "a", "b", "", None, "c"])
    assert _filled_everywhere(values[1:3])
    assert not _filled_everywhere(values[1:4])
    assert not _filled_everywhere(values[4:6])
    assert not _filled_everywhere(values)
    assert _filled_everywhere(pa.array([], pa.string()))
