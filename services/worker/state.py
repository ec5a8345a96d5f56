"""The state of one run, written as ``index.json``.

Keys keep the reference Machine's spelling (with spaces) so that existing consumers of its
``index.json`` / ``state.txt`` keep working; the model gives them Python names. The keys we
added are marked *ours* below; README.md ("Outputs of a run") lists every key with its meaning
and where ours differs from the reference's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import SourceProblem


class RunState(BaseModel):
    """Everything known about a finished run. Output fields hold file names in the run folder."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    source: str
    layer: str
    entry_name: str = Field(alias="name")
    skipped: bool = False
    cache: str | None = None
    sample: str | None = None
    website: str | None = None
    license: str | None = None
    geometry_type: str | None = Field(default=None, alias="geometry type")
    #: The reference's count; only addresses have it (None for the other layers).
    address_count: int | None = Field(default=None, alias="address count")
    #: Ours: the count for every layer (what our pages and metrics read).
    feature_count: int | None = Field(default=None, alias="feature count")
    version: str | None = None
    fingerprint: str | None = None
    etag: str | None = None
    last_modified: str | None = Field(default=None, alias="last modified")
    cache_time: float | None = Field(default=None, alias="cache time")
    #: The processed data's file in the run folder, as in the reference (``out.csv``).
    processed: str | None = None
    #: Ours: when the run ended (ISO 8601, UTC).
    processed_at: str | None = Field(default=None, alias="processed at")
    process_time: float | None = Field(default=None, alias="process time")
    output: str | None = None
    preview: str | None = None
    processed_zip: str | None = Field(default=None, alias="processed zip")
    attribution_required: bool | None = Field(default=None, alias="attribution required")
    attribution_name: str | None = Field(default=None, alias="attribution name")
    share_alike: bool | None = Field(default=None, alias="share-alike")
    source_problem: SourceProblem | None = Field(default=None, alias="source problem")
    error: str | None = None
    code_version: str = Field(alias="code version")
    tests_passed: bool | None = Field(default=None, alias="tests passed")
    bounds: tuple[float, float, float, float] | None = None
    attribute_counts: dict[str, int] = Field(default_factory=dict, alias="attribute counts")
    dropped_rows: int = Field(default=0, alias="dropped rows")
    reused_from: int | None = Field(default=None, alias="reused from")
    #: The run failed for a reason that may go away (5xx, throttling, timeouts, connection
    #: resets after the in-run retries): the dequeuer may run it again later.
    retryable: bool = False

    @property
    def succeeded(self) -> bool:
        return self.source_problem is None and not self.skipped

    def to_json(self) -> dict[str, Any]:
        """The ``index.json`` document."""
        return self.model_dump(mode="json", by_alias=True)

    def write(self, path: Path) -> None:
        """Write ``index.json`` atomically so a reader never sees half a file."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> RunState:
        return cls.model_validate(json.loads(path.read_text()))
