"""The one comment a pull request gets: a table of its latest job's runs, kept up to date.

Rendered from the database when the outbox sends it (:mod:`shared.outbox`), so it always shows
the latest state. Each run links to its page, its preview image and its data; the table stops
at :data:`MAX_ROWS` runs (GitHub refuses comments over 65,536 characters) and says how many
more the job page lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.jobs import job_url, source_name

#: Runs listed in the comment at most.
MAX_ROWS = 100
#: A hidden marker, so that people (and tools) can tell the machine's comment.
MARKER = "<!-- oa-machine -->"

_STATE = {
    None: "⏳ running",
    "success": "✅ success",
    "failure": "❌ failure",
    "skipped": "⏭️ skipped",
}


def render_comment(
    job: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], public_base_url: str
) -> str:
    """Markdown for ``job`` (a ``jobs`` row) and its ``runs`` (``runs`` rows, in order)."""
    base = public_base_url.rstrip("/")
    page = job_url(public_base_url, job["id"])
    state = job["status"] or "pending"
    counts = _counts(runs)
    lines = [
        MARKER,
        f"### OpenAddresses Machine: {_headline(state, counts)}",
        "",
        f"Commit `{str(job['sha'])[:7]}` · [job {job['id']}]({page})",
        "",
    ]
    if not runs:
        lines.append("No source entry is new or changed: nothing to check.")
        return "\n".join(lines) + "\n"
    lines += [
        "| Source | Layer | Entry | State | Features | Problem | Outputs |",
        "|---|---|---|---|---:|---|---|",
    ]
    for run in runs[:MAX_ROWS]:
        outputs = run.get("outputs") or {}
        links = []
        if "preview.png" in outputs:
            links.append(f"[preview]({base}/runs/{run['id']}/preview.png)")
        for name in ("out.csv", "out.geojson"):
            if name in outputs:
                links.append(f"[data]({base}/runs/{run['id']}/{name})")
                break
        features = (run.get("state") or {}).get("feature count")
        lines.append(
            f"| [{_cell(source_name(run['source_path']))}]({base}/runs/{run['id']}) "
            f"| {run['layer']} | {_cell(run['entry_name'])} | {_STATE.get(run['status'], '?')} "
            f"| {f'{features:,}' if isinstance(features, int) else '–'} "
            f"| {_cell(run.get('source_problem') or '')} | {' · '.join(links)} |"
        )
    if len(runs) > MAX_ROWS:
        lines += ["", f"…and {len(runs) - MAX_ROWS} more runs on [the job page]({page})."]
    return "\n".join(lines) + "\n"


def _counts(runs: Sequence[Mapping[str, Any]]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for run in runs:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    return counts


def _headline(state: str, counts: Mapping[str | None, int]) -> str:
    total = sum(counts.values())
    if state == "pending":
        return f"checking {total} run{'s' if total != 1 else ''}"
    parts = [f"{counts.get('success', 0)} succeeded"]
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skipped")
    if counts.get("failure"):
        parts.append(f"{counts['failure']} failed")
    return f"{state} ({', '.join(parts)})"


def _cell(text: str) -> str:
    """Text safe inside a table cell (names and problems are written by contributors): no
    pipe or line break, no HTML, no link brackets and no @mention of its own."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = escaped.replace("@", "&#64;").replace("[", "\\[").replace("]", "\\]")
    return escaped.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
