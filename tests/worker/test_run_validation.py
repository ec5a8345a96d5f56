"""The worker checks a task's source against the schema too, before touching the network."""

from __future__ import annotations

from pathlib import Path

from services.worker.isolation import RunRequest
from services.worker.run import run_entry


def test_a_source_failing_the_schema_fails_its_run_with_the_json_path(tmp_path: Path) -> None:
    source = {"schema": 2, "coverage": {"country": "zz"}, "layers": {"addresses": [{
        "name": "city", "data": "http://192.0.2.1/a.csv", "protocol": "http",
        "conform": {"format": "csv", "number": 12, "street": "s", "lon": "x", "lat": "y"}}]}}
    request = RunRequest(
        source=source, source_path="sources/zz/bad.json", layer="addresses", entry_name="city",
        outdir=str(tmp_path / "out"), workdir=str(tmp_path / "work"),
    )
    (tmp_path / "out").mkdir()
    state = run_entry(request)
    assert state.source_problem == "invalid_source"
    assert state.error is not None
    assert "layers.addresses[0].conform.number" in state.error
    assert "sources/zz/bad.json" in state.error
    assert state.cache is None  # nothing was downloaded
