"""Wire models: validation, round trips, the discriminator."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from shared.messages import ANY_MESSAGE, SCHEMA_VERSION, Done, Due, Heartbeat, Message, Task

TASK: dict[str, Any] = {
    "run_id": 1,
    "job_id": 2,
    "source_path": "sources/fr/bano.json",
    "layer": "addresses",
    "entry_name": "country",
    "commit_sha": "deadbeef",
    "source": {"schema": 2, "layers": {"addresses": [{"name": "country"}]}},
    "timeout_s": 7200,
}

EXAMPLES: list[Message] = [
    Task(**TASK),
    Done(
        run_id=1,
        worker="w",
        status="success",
        outputs={"out.csv": "runs/1/out.csv"},
        state={"rows": 10},
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
    ),
    Due(run_id=1, attempt=2, deadline_at=datetime(2026, 1, 1, 6, tzinfo=UTC)),
    Heartbeat(worker="w", hostname="h", pid=1, run_id=1, attempt=1, state="running"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda message: type(message).__name__)
def test_json_round_trip_through_the_discriminated_union(message: Message) -> None:
    text = message.model_dump_json()
    decoded = ANY_MESSAGE.validate_json(text)
    assert type(decoded) is type(message)
    assert decoded == message
    body = json.loads(text)
    assert body["schema_version"] == SCHEMA_VERSION == 1
    assert body["kind"] == type(message).__name__.lower()


def test_defaults() -> None:
    task = Task(**TASK)
    assert task.kind == "task"
    assert task.attempt == 1
    assert task.sent_at.tzinfo is not None
    done = Done(run_id=1, worker="w", status="failure")
    assert (done.outputs, done.state, done.source_problem) == ({}, {}, None)
    assert Heartbeat(worker="w", hostname="h", pid=1).state == "idle"


def test_discriminator_picks_the_model_from_kind() -> None:
    decoded = ANY_MESSAGE.validate_python(
        {"kind": "due", "run_id": 5, "deadline_at": "2026-01-01T00:00:00Z"}
    )
    assert isinstance(decoded, Due)
    assert decoded.deadline_at == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "body",
    [
        {"run_id": 1},  # no kind
        {"kind": "unknown", "run_id": 1},
        {**TASK, "kind": "task", "surprise": True},  # extra field
        {**TASK, "kind": "task", "schema_version": 2},  # a future schema
        {**TASK, "kind": "task", "layer": "roads"},
        {**TASK, "kind": "task", "attempt": 0},
        {**TASK, "kind": "task", "timeout_s": 0},
        {"kind": "done", "run_id": 1, "worker": "w", "status": "error"},
        {"kind": "done", "run_id": 1, "worker": "w", "status": "failure", "source_problem": "x"},
        {"kind": "heartbeat", "worker": "w", "hostname": "h", "pid": 1, "state": "busy"},
    ],
)
def test_invalid_messages_are_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ANY_MESSAGE.validate_python(body)


def test_extra_fields_rejected_on_the_model_itself() -> None:
    with pytest.raises(ValidationError):
        Task(**TASK, priority=1)  # type: ignore[call-arg]


def test_messages_are_frozen() -> None:
    task = Task(**TASK)
    with pytest.raises(ValidationError):
        task.run_id = 3  # type: ignore[misc]
