"""Push payloads as GitHub sends them (tests/fixtures/github), read through PushEvent."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from services.webhook.events import ZERO_SHA, PushEvent, is_source_path

GITHUB = Path(__file__).parent.parent / "fixtures" / "github"


def payload(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((GITHUB / f"{name}.payload.json").read_text()))


def branch_push(*commits: dict[str, list[str]]) -> PushEvent:
    """The real branch push, with its commits replaced by ``commits`` (in order)."""
    body = payload("push.with-new-branch")
    template = body["commits"][0]
    body["commits"] = [
        {**template, "id": f"{index:040x}", "added": [], "modified": [], "removed": [], **change}
        for index, change in enumerate(commits, start=1)
    ]
    return PushEvent.model_validate(body)


def test_real_branch_push_is_read() -> None:
    event = PushEvent.model_validate(payload("push.with-new-branch"))
    assert event.branch == "master"
    assert event.repository.full_name == "Codertocat/Hello-World"
    assert event.after == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    assert event.is_deletion is False
    # Its only commit adds README.md: no source changed.
    assert [c.added for c in event.commits] == [["README.md"]]
    assert event.changed_sources() == []


def test_real_tag_deletion_is_a_deletion_and_not_a_branch() -> None:
    event = PushEvent.model_validate(payload("push.1"))
    assert event.ref == "refs/tags/simple-tag"
    assert event.after == ZERO_SHA
    assert event.deleted is True
    assert event.is_deletion is True
    assert event.branch is None
    assert event.changed_sources() == []


def test_tag_push_is_not_a_branch() -> None:
    body = payload("push.1")
    body.update(after="6113728f27ae82c7b1a177c8d03f9e96e0adf246", deleted=False, created=True)
    event = PushEvent.model_validate(body)
    assert event.is_deletion is False
    assert event.branch is None


def test_branch_deletion_by_zero_sha_or_by_flag() -> None:
    body = payload("push.with-new-branch")
    body.update(after=ZERO_SHA, deleted=False)
    assert PushEvent.model_validate(body).is_deletion is True
    body = payload("push.with-new-branch")
    body.update(deleted=True)
    event = PushEvent.model_validate(body)
    assert event.is_deletion is True
    assert event.branch == "master"


def test_branch_names_with_slashes() -> None:
    body = payload("push.with-new-branch")
    body["ref"] = "refs/heads/feature/us-ks"
    assert PushEvent.model_validate(body).branch == "feature/us-ks"


def test_changed_sources_replays_commits_in_order() -> None:
    event = branch_push(
        {"added": ["sources/us/ks/lane.json", "sources/us/ks/temp.json", "README.md"]},
        {"modified": ["sources/us/ks/lane.json", "sources/fr/01/statewide.json"]},
        {"removed": ["sources/us/ks/temp.json", "sources/us/mn/old.json"]},
        {"added": ["sources/us/ks/b.json"], "modified": ["sources/jp/tokyo.json"]},
    )
    assert event.changed_sources() == [
        "sources/fr/01/statewide.json",
        "sources/jp/tokyo.json",
        "sources/us/ks/b.json",
        "sources/us/ks/lane.json",
    ]


def test_file_added_then_removed_is_not_included() -> None:
    event = branch_push(
        {"added": ["sources/us/ks/oops.json"]},
        {"modified": ["sources/us/ks/oops.json"]},
        {"removed": ["sources/us/ks/oops.json"]},
    )
    assert event.changed_sources() == []


def test_file_removed_then_added_again_is_included() -> None:
    event = branch_push(
        {"removed": ["sources/us/ks/back.json"]},
        {"added": ["sources/us/ks/back.json"]},
    )
    assert event.changed_sources() == ["sources/us/ks/back.json"]


def test_rename_keeps_only_the_new_path() -> None:
    event = branch_push(
        {"removed": ["sources/us/ks/old_name.json"], "added": ["sources/us/ks/new_name.json"]}
    )
    assert event.changed_sources() == ["sources/us/ks/new_name.json"]


def test_same_file_in_several_commits_is_listed_once() -> None:
    event = branch_push(
        {"modified": ["sources/us/ks/lane.json"]},
        {"modified": ["sources/us/ks/lane.json"]},
    )
    assert event.changed_sources() == ["sources/us/ks/lane.json"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("sources/us/ks/lane_county.json", True),
        ("sources/us/mn/isanti.json", True),
        ("sources/a.json", True),
        ("sources/us/ks/lane_county.geojson", False),
        ("sources/us/ks/lane_county.json.orig", False),
        ("sources/us/ks/README.md", False),
        ("README.md", False),
        ("schema/sources/a.json", False),
        ("test/sources/us/a.json", False),
        ("Sources/us/a.json", False),
        ("a.json", False),
    ],
)
def test_only_sources_json_files_count(path: str, expected: bool) -> None:
    assert is_source_path(path) is expected
    event = branch_push({"added": [path]})
    assert event.changed_sources() == ([path] if expected else [])


def test_missing_repository_names_the_field() -> None:
    body = payload("push.with-new-branch")
    del body["repository"]
    with pytest.raises(pydantic.ValidationError) as caught:
        PushEvent.model_validate(body)
    assert caught.value.errors()[0]["loc"] == ("repository",)


def test_unknown_fields_are_ignored_and_missing_lists_default_to_empty() -> None:
    body = payload("push.with-new-branch")
    body["something_new_from_github"] = {"x": 1}
    body["commits"] = [{"id": "1" * 40}]
    event = PushEvent.model_validate(body)
    assert event.commits[0].added == event.commits[0].modified == event.commits[0].removed == []
    assert event.changed_sources() == []


@pytest.mark.parametrize("field", ["after", "before"])
@pytest.mark.parametrize(
    "value", ["", "abc", "6113728f27ae82c7b1a177c8d03f9e96e0adf24", "g" * 40,
              "6113728f27ae82c7b1a177c8d03f9e96e0adf246\n", "../../" + "a" * 34, "main"],
)
def test_malformed_sha_names_the_field(field: str, value: str) -> None:
    body = payload("push.with-new-branch")
    body[field] = value
    with pytest.raises(pydantic.ValidationError) as caught:
        PushEvent.model_validate(body)
    assert caught.value.errors()[0]["loc"] == (field,)


def test_full_shas_in_either_case_are_read() -> None:
    body = payload("push.with-new-branch")
    body.update(after="6113728F27AE82C7B1A177C8D03F9E96E0ADF246", before=ZERO_SHA)
    assert PushEvent.model_validate(body).after == "6113728F27AE82C7B1A177C8D03F9E96E0ADF246"
