"""Inline acceptance tests of source entries."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from services.worker.conform.acceptance import check_acceptance_tests, run_acceptance_tests
from services.worker.errors import RunError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SOURCES = FIXTURES / "oa-sources"
GAPS = FIXTURES / "oa-sources-gaps"


def mckinney() -> dict[str, Any]:
    source = json.loads((SOURCES / "us/tx/city_of_mckinney.json").read_text())
    return source["layers"]["addresses"][0]


def entry(conform: dict[str, Any], *cases: dict[str, Any], enabled: bool = True) -> dict[str, Any]:
    return {
        "name": "test",
        "conform": conform,
        "test": {"enabled": enabled, "description": "t", "acceptance-tests": list(cases)},
    }


def case(inputs: dict[str, Any], expected: dict[str, Any], description: str = "case") -> dict:
    return {"description": description, "inputs": inputs, "expected": expected}


def test_real_source_passes() -> None:
    # City is not among the inputs: a field the conform reads but a test leaves out is empty.
    assert run_acceptance_tests(mckinney()) == []


def test_real_source_with_a_wrong_expectation_fails_with_description() -> None:
    broken = copy.deepcopy(mckinney())
    broken["test"]["acceptance-tests"][1]["expected"]["unit"] = "BLDG 2"
    failures = run_acceptance_tests(broken)
    assert failures == [
        "acceptance test 'address with BLDG numeric-only unit' failed: "
        'unit: expected "BLDG 2", got "BLDG 1"'
    ]


def philadelphia() -> dict[str, Any]:
    source = json.loads((GAPS / "us/pa/philadelphia.json").read_text())
    return source["layers"]["addresses"][0]


def test_philadelphia_passes_its_own_tests_reading_the_chain_variable_by_name() -> None:
    # Its postcode chain's second step reads the variable `full_zip` by its plain name.
    results = check_acceptance_tests(philadelphia())
    assert results.failures == []
    assert results.run == len(philadelphia()["test"]["acceptance-tests"]) == 11
    zips = [c for c in philadelphia()["test"]["acceptance-tests"] if c["expected"].get("postcode")]
    assert {c["expected"]["postcode"] for c in zips} == {"19143", "19143-2010"}


def test_a_failure_says_which_test_it_was() -> None:
    broken = philadelphia()
    broken["test"]["acceptance-tests"][7]["expected"]["postcode"] = "19143-0000"
    (failure,) = check_acceptance_tests(broken).failures
    assert failure.index == 7
    assert failure.mismatches == {"postcode": ("19143-0000", "19143-2010")}
    assert str(failure).endswith('postcode: expected "19143-0000", got "19143-2010"')


YOLO = {
    "number": {"function": "regexp", "field": "Address", "pattern": "^([0-9]+)"},
    "street": {
        "function": "regexp",
        "field": "Address",
        "pattern": "^(?:[0-9]+ )(.*)",
        "replace": "$1",
    },
}


@pytest.mark.parametrize(
    ("conform", "cases", "failures"),
    [
        # the example of ATTRIBUTE_FUNCTIONS.md
        (
            YOLO,
            [
                case(
                    {"address": "617 TUMBLEWEED TRL"}, {"number": "617", "street": "TUMBLEWEED TRL"}
                )
            ],
            0,
        ),
        # expected "" matches an empty (null) attribute
        (
            YOLO,
            [case({"Address": "TUMBLEWEED TRL"}, {"number": "", "street": "TUMBLEWEED TRL"})],
            0,
        ),
        # compared after cleaning: trimmed, number loses ".0"
        (
            {"number": "N", "street": "S"},
            [case({"N": "12.0", "S": " Main St "}, {"number": "12", "street": "Main St"})],
            0,
        ),
        # expected keys are case-insensitive; numbers in inputs and expectations are text
        ({"number": "N", "street": "S"}, [case({"n": 7, "s": "Oak"}, {"NUMBER": 7})], 0),
        # an attribute the conform does not set reads as ""
        ({"number": "N", "street": "S"}, [case({"N": "1", "S": "x"}, {"unit": ""})], 0),
        ({"number": "N", "street": "S"}, [case({"N": "1", "S": "x"}, {"unit": "2"})], 1),
        # unicode values
        (
            {
                "number": {"function": "format", "fields": ["MPH", "LPH"], "format": "$1号$2栋"},
                "street": "JLXMC",
            },
            [
                case(
                    {"MPH": "5", "LPH": "3", "JLXMC": "中山路"},
                    {"number": "5号3栋", "street": "中山路"},
                )
            ],
            0,
        ),
        # every failing case is reported
        (
            YOLO,
            [
                case({"Address": "1 A"}, {"number": "2"}, "first"),
                case({"Address": "1 A"}, {"number": "1"}, "second"),
                case({"Address": "1 A"}, {"street": "B"}, "third"),
            ],
            2,
        ),
    ],
)
def test_cases(conform: dict, cases: list[dict], failures: int) -> None:
    assert len(run_acceptance_tests(entry(conform, *cases))) == failures


def test_failure_message_lists_every_mismatched_attribute() -> None:
    failures = run_acceptance_tests(
        entry(YOLO, case({"Address": "9 Élysée"}, {"number": "8", "street": "Elysee"}, "accents"))
    )
    assert failures == [
        'acceptance test \'accents\' failed: number: expected "8", got "9"; '
        'street: expected "Elysee", got "Élysée"'
    ]


@pytest.mark.parametrize(
    "source",
    [
        {"conform": YOLO},
        {
            "conform": YOLO,
            "test": {
                "enabled": False,
                "description": "off",
                "acceptance-tests": [case({}, {"number": "x"})],
            },
        },
        {"conform": YOLO, "test": {"description": "no cases"}},
    ],
)
def test_nothing_to_run(source: dict) -> None:
    assert run_acceptance_tests(source) == []


def test_enabled_defaults_to_true() -> None:
    source = {
        "conform": YOLO,
        "test": {
            "description": "d",
            "acceptance-tests": [case({"Address": "1 A"}, {"number": "2"})],
        },
    }
    assert len(run_acceptance_tests(source)) == 1


def test_bad_conform_raises_conform_failed() -> None:
    bad = entry({"number": {"function": "nope"}, "street": "S"}, case({"S": "x"}, {"street": "x"}))
    with pytest.raises(RunError) as caught:
        run_acceptance_tests(bad)
    assert caught.value.problem == "conform_failed"
