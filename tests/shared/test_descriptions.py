"""What GitHub shows of a job: the commit status descriptions (140 characters at most) and the
pull request's comment."""

from __future__ import annotations

from typing import Any

import pytest

from shared.comments import MARKER, render_comment
from shared.github import fit_description
from shared.jobs import NOTHING_TO_CHECK, describe_outcome, describe_pending

LONG = [f"sources/us/ca/{name}_county_with_a_long_name.json" for name in
        ("alameda", "berkeley", "contra_costa", "del_norte", "el_dorado", "fresno", "glenn")]


def test_pending_names_what_is_checked_and_how_many_more() -> None:
    assert describe_pending(["sources/us/ca/alameda.json"]) == "Checking us/ca/alameda"
    assert describe_pending(["sources/us/ca/berkeley.json", "sources/us/ca/alameda.json"]) == (
        "Checking us/ca/alameda, us/ca/berkeley")
    text = describe_pending(LONG)
    assert len(text) <= 140
    assert text.startswith("Checking us/ca/alameda_county_with_a_long_name, ")
    shown = text.removeprefix("Checking ").split(" and ")[0].split(", ")
    assert text.endswith(f" and {len(LONG) - len(shown)} more")
    assert describe_pending([]) == NOTHING_TO_CHECK


def test_failure_names_the_failed_sources_and_their_problems() -> None:
    assert describe_outcome(3, 0, [("sources/us/ks/lane.json", "download_failed")]) == (
        "Failed: us/ks/lane (download_failed); 3 succeeded")
    text = describe_outcome(2, 0, [(path, "conform_failed") for path in LONG])
    assert len(text) <= 140
    assert text.startswith("Failed: us/ca/alameda_county_with_a_long_name (conform_failed)")
    assert " more; 2 succeeded" in text
    assert describe_outcome(0, 0, [("sources/x.json", None)]) == "Failed: x (failed)"
    assert describe_outcome(4, 0, []) == "All 4 runs succeeded"
    assert describe_outcome(4, 1, []) == "4 succeeded, 1 skipped"


@pytest.mark.parametrize("name", ["a" * 300, "word " * 60, "x" * 139, "y" * 141])
def test_every_description_fits_in_140_characters(name: str) -> None:
    for text in (describe_pending([f"sources/{name}.json"]),
                 describe_outcome(1, 0, [(f"sources/{name}.json", "timeout")]),
                 fit_description(f"Could not check this commit: {name}")):
        assert len(fit_description(text)) <= 140
    assert fit_description("x" * 140) == "x" * 140
    assert fit_description("y" * 141).endswith("…") and len(fit_description("y" * 141)) == 140


def _run(run_id: int, entry: str, status: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": run_id, "source_path": "sources/us/ks/lane.json", "layer": "addresses",
            "entry_name": entry, "status": status, "source_problem": None, "outputs": {},
            "state": {}, **extra}


def test_the_comment_is_a_table_of_runs_with_their_links() -> None:
    job = {"id": 12, "status": "failure", "sha": "abcdef0" + "1" * 33}
    runs = [
        _run(40, "county", "success", state={"feature count": 1234567},
             outputs={"preview.png": "k1", "out.csv": "k2"}),
        _run(41, "city|<b>", "failure", source_problem="download_failed"),
        _run(42, "town", None),
        _run(43, "@maintainers [x](http://evil)\r\nrow", "skipped"),
    ]
    body = render_comment(job, runs, "http://oa.example.org/")
    lines = body.splitlines()
    assert lines[0] == MARKER
    assert "Commit `abcdef0` · [job 12](http://oa.example.org/jobs/12)" in body
    assert "| Source | Layer | Entry | State | Features | Problem | Outputs |" in lines
    (good,) = [line for line in lines if "/runs/40)" in line]
    assert good == (
        "| [us/ks/lane](http://oa.example.org/runs/40) | addresses | county | ✅ success "
        "| 1,234,567 |  | [preview](http://oa.example.org/runs/40/preview.png) · "
        "[data](http://oa.example.org/runs/40/out.csv) |")
    (failed,) = [line for line in lines if "/runs/41)" in line]
    # A table cell cannot hold a bare "|" nor HTML of a contributor's: escaped, not cut.
    assert "| ❌ failure | – | download_failed |" in failed
    assert "| city\\|&lt;b&gt; |" in failed
    assert "| ⏳ running |" in next(line for line in lines if "/runs/42)" in line)
    # No mention, link or line break of a contributor's own.
    (odd,) = [line for line in lines if "/runs/43)" in line]
    assert "| &#64;maintainers \\[x\\](http://evil)  row |" in odd


def test_a_job_with_nothing_to_check_says_so() -> None:
    body = render_comment({"id": 3, "status": "success", "sha": "f" * 40}, [], "http://x")
    assert "nothing to check" in body and "| Source |" not in body
