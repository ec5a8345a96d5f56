"""One source with every fidelity gap at once, for the end-to-end tests of process-one and the
worker service: the real ``us/oh/city_of_perrysburg`` file (two ``addresses`` entries named
``city``) whose second entry is rewritten to an older source's shape: a zipped shapefile
without ``.prj`` in state plane feet (``srs``), coordinates named ``"lon": "X", "lat": "Y"``,
a ``chain`` whose second step reads its variable by the plain name, ``get`` on a list written
as text, and an acceptance test of the chain.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import shapely

from tests.support import sourcedata as sd

PERRYSBURG = (
    Path(__file__).resolve().parents[1] / "fixtures" / "oa-sources-gaps" / "us" / "oh"
    / "city_of_perrysburg.json"
)
STATE_PLANE = "EPSG:2241"
PLACES = [(-83.6272, 41.5570), (-83.6301, 41.5549)]
#: The out.csv rows (from NUMBER on) the entry must give, worked out by hand.
EXPECTED = [
    ["12", "MAIN ST", "", "", "", "OH", "", ""],
    ["14", "W 2ND ST", "", "", "", "OH", "", ""],
]

CONFORM: dict[str, Any] = {
    "format": "shapefile",
    "file": "addresses.shp",
    "srs": STATE_PLANE,
    "lon": "X",
    "lat": "Y",
    "number": "NUM",
    "street": {
        "function": "chain",
        "variable": "street_wip",
        "functions": [
            {"function": "postfixed_street", "field": "ADDR"},
            {"function": "remove_postfix", "field": "street_wip", "field_to_remove": "UNIT"},
        ],
    },
    "region": {"function": "get", "field": "ADMIN", "index": 1},
}
TEST: dict[str, Any] = {
    "enabled": True,
    "description": "the chain and get",
    "acceptance-tests": [{
        "description": "unit removed from the street",
        "inputs": {"ADDR": "12 MAIN ST APT 4", "UNIT": "APT 4", "NUM": "12",
                   "ADMIN": "['US', 'OH', 'Wood']"},
        "expected": {"number": "12", "street": "MAIN ST", "region": "OH"},
    }],
}


def shapefile_zip(folder: Path) -> bytes:
    """The data: two points in Ohio North state plane feet, no .prj, as a zip."""
    records = [
        {"NUM": "12", "ADDR": "12 MAIN ST APT 4", "UNIT": "APT 4",
         "ADMIN": "['US', 'OH', 'Wood']"},
        {"NUM": "14", "ADDR": "14 W 2ND ST", "UNIT": "", "ADMIN": '["US", "OH", "Wood"]'},
    ]
    points = [shapely.Point(p) for p in sd.to_srs(PLACES, STATE_PLANE)]
    path = sd.write_ogr(folder / "shp" / "addresses.shp", "ESRI Shapefile", records, points,
                        crs=STATE_PLANE)
    path.with_suffix(".prj").unlink()
    return sd.zip_bytes(sd.zip_folder(path.parent))


def source(data_url: str) -> dict[str, Any]:
    """The Perrysburg source with its second ``city`` entry pointed at ``data_url``."""
    perrysburg = json.loads(PERRYSBURG.read_text())
    entry = perrysburg["layers"]["addresses"][1]
    assert entry["name"] == perrysburg["layers"]["addresses"][0]["name"] == "city"
    entry.update(data=data_url, protocol="http", compression="zip",
                 conform=copy.deepcopy(CONFORM), test=copy.deepcopy(TEST))
    return perrysburg


def check_outputs(out_csv: str, state: dict[str, Any]) -> None:
    """What both ways of running the entry must have written."""
    rows = list(csv.reader(io.StringIO(out_csv)))
    assert rows[0][:10] == ["LON", "LAT", "NUMBER", "STREET", "UNIT", "CITY", "DISTRICT",
                            "REGION", "POSTCODE", "ID"]
    assert [row[2:10] for row in rows[1:]] == EXPECTED
    for row, (lon, lat) in zip(rows[1:], PLACES, strict=True):
        assert abs(float(row[0]) - lon) < 1e-6 and abs(float(row[1]) - lat) < 1e-6
    assert state["name"] == "city[1]"
    assert state["source problem"] is None, state["error"]
    assert state["tests passed"] is True
    assert state["address count"] == state["feature count"] == 2
    assert state["processed"] == "out.csv"
