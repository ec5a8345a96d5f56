"""The rows of the site's tables (runs, jobs, sets, sources' entries), written in Python.

A page is mostly one of these tables. Rendered by jinja2 their rows were most of a page's
time (a dozen escapes and attribute look-ups per cell, a macro call per state: 7-9 ms of CPU
for 50 rows, when a page must cost about 3 to serve 20 clients at once within 100 ms on two
cores). Here each row is one f-string, and only what can hold text from outside (paths, entry
names, problems, messages, repositories, refs) goes through :func:`markupsafe.escape`; the
rest are numbers, our own URLs and states from fixed lists. The templates hold the tables
around them (``templates/macros.html`` and the pages).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from markupsafe import Markup, escape

from services.webhook.views.format import DASH, duration, percent, thousands
from services.webhook.views.models import DOWNLOADS, Entry, Job, Run, Set, Source, Tally

_MARKUP_CHARS = re.compile("[&<>\"']")


def _text(value: str) -> str:
    """:func:`escape` for text from outside, which mostly has nothing to escape: checked first
    (a fifth of the cost of building the escaped copy, several times a row)."""
    return escape(value) if _MARKUP_CHARS.search(value) else value


def _iso(moment: datetime) -> str:
    # asyncpg gives timestamptz in UTC already; astimezone only for anything else.
    return (moment if moment.tzinfo is UTC else moment.astimezone(UTC)).isoformat()


def _when(moment: datetime | None) -> str:
    """``2026-12-03 18:47 UTC`` (format.when, from the ISO text: a tenth of strftime's cost)."""
    if moment is None:
        return DASH
    iso = _iso(moment)
    return f"{iso[:10]} {iso[11:16]} UTC"


def _started(run: Run) -> str:
    if run.started_at is None:
        return DASH
    iso = _iso(run.started_at)
    return f'<time datetime="{iso}">{iso[:10]} {iso[11:16]} UTC</time>'


def _source(run: Run, file_url: str | None) -> str:
    path = _text(run.source_path)
    if run.source_url is None:
        return str(path)
    # source_url and the files' URLs are percent-quoted by models.py: nothing to escape.
    name = f'<a href="{run.source_url}">{_text(run.source or "")}</a>'
    if file_url:
        return f'{name}<a class="file" href="{_text(file_url)}">{path}</a>'
    return f'{name}<span class="file">{path}</span>'


def _links(run: Run) -> str:
    links = [f'<a href="{run.url}">details</a>']
    links.extend(f'<a href="{run.files[name]}">{name}</a>'
                 for name in DOWNLOADS if name in run.files)
    if "output.txt" in run.files:
        links.append(f'<a href="{run.files["output.txt"]}">log</a>')
    return "".join(links)


def run_rows(runs: list[Run], source_files: Mapping[str, str | None] | None = None,
             show_source: bool = True) -> Markup:
    """``<tr>`` per run: id, source (with its file on GitHub when known), layer, entry,
    state with problem and message, start, duration, features, links."""
    rows = []
    for run in runs:
        source = ""
        if show_source:
            url = source_files.get(run.source_path) if source_files else None
            source = f'<td data-label="Source">{_source(run, url)}</td>'
        problem = f'<code class="problem">{_text(run.source_problem)}</code>' \
            if run.source_problem else ""
        message = f'<div class="message">{_text(run.error)}</div>' if run.error else ""
        if run.warning:
            message += (f'<div class="warning">regression warning: '
                        f'{_text(run.warning)}</div>')
        rows.append(
            f'<tr id="run-{run.id}"><td data-label="Run"><a href="{run.url}">{run.id}</a></td>'
            f'{source}<td data-label="Layer">{run.layer}</td>'
            f'<td data-label="Entry">{_text(run.entry_name) if run.entry_name else DASH}</td>'
            f'<td data-label="State">{_badge(run.state)}{problem}{message}</td>'
            f'<td class="when" data-label="Started">{_started(run)}</td>'
            f'<td class="number" data-label="Duration">{duration(run.duration_s)}</td>'
            f'<td class="number" data-label="Features">{thousands(run.features)}</td>'
            f'<td class="links" data-label="Links">{_links(run)}</td></tr>'
        )
    return Markup("\n".join(rows))


def _badge(state: str) -> str:
    # States come from fixed lists (models.RunState, JobState, the workers' statuses).
    return f'<span class="badge {state}">{state}</span>'


def job_rows(jobs: list[Job], *, full: bool = True) -> Markup:
    """``<tr>`` per job: id, state, (event,) repository and pull request, commit, runs,
    created (and finished)."""
    rows = []
    for job in jobs:
        pull = f' <a href="{escape(job.pr_url)}">#{job.pr_number}</a>' \
            if job.pr_number and job.pr_url else ""
        commit = f"<code>{escape(job.sha[:10])}</code>"
        if full:
            ref = f'<span class="file">{escape(job.ref)}</span>' if job.ref else ""
            rows.append(
                f'<tr><td><a href="{job.url}">{job.id}</a></td><td>{_badge(job.state)}</td>'
                f'<td>{escape(job.event)}</td><td>{escape(job.repo)}{pull}</td>'
                f'<td><a href="{escape(job.commit_url)}">{commit}</a> {ref}</td>'
                f'<td>{escape(job.runs.summary())}</td>'
                f'<td class="when hide-narrow">{_when(job.created_at)}</td>'
                f'<td class="when hide-narrow">{_when(job.finished_at)}</td></tr>')
        else:
            rows.append(
                f'<tr><td><a href="{job.url}">{job.id}</a></td><td>{_badge(job.state)}</td>'
                f'<td>{escape(job.repo)}{pull}</td><td>{commit}</td>'
                f'<td class="number">{escape(job.runs.summary())}</td>'
                f'<td class="when hide-narrow">{_when(job.created_at)}</td></tr>')
    return Markup("\n".join(rows))


def progress(tally: Tally) -> Markup:
    """A progress bar of the settled runs (no style attribute: the CSP allows none)."""
    return Markup(f'<progress value="{tally.settled}" max="{tally.total or 1}">{tally.settled} '
                  f'of {tally.total}</progress> {thousands(tally.settled)} of '
                  f'{thousands(tally.total)} settled')


def set_rows(sets: list[Set]) -> Markup:
    """``<tr>`` per set: id, kind, progress, succeeded, failed, success rate, times."""
    return Markup("\n".join(
        f'<tr><td><a href="{item.url}">{item.id}</a></td><td>{escape(item.kind)}</td>'
        f'<td>{progress(item.runs)}</td>'
        f'<td class="number">{thousands(item.runs.success)}</td>'
        f'<td class="number">{thousands(item.runs.failure)}</td>'
        f'<td class="number">{percent(item.runs.success_rate)}</td>'
        f'<td class="when hide-narrow">{_when(item.created_at)}</td>'
        f'<td class="when hide-narrow">{_when(item.finished_at)}</td></tr>'
        for item in sets))


def _downloads(entry: Entry) -> str:
    links = "".join(f'<a href="{escape(url)}">{extension}</a>'
                    for extension, url in sorted(entry.downloads.items()))
    return links or DASH


def _latest(entry: Entry) -> str:
    return (f'<a href="/runs/{entry.latest_run_id}">{_badge(entry.latest_status)}</a> '
            f'<span class="file">{_when(entry.latest_finished_at)}</span>')


def source_rows(sources: list[Source]) -> Markup:
    """``<tr>`` per entry of each source (the sources list): source, layer, entry, latest
    run, features, latest good data."""
    rows = []
    for source in sources:
        name = f'<a href="{escape(source.url)}">{escape(source.source)}</a>' \
            if source.url else str(escape(source.source_path))
        for index, entry in enumerate(source.entries):
            rows.append(
                f'<tr><td>{name if index == 0 else ""}</td><td>{escape(entry.layer)}</td>'
                f'<td>{escape(entry.entry_name) if entry.entry_name else DASH}</td>'
                f'<td>{_latest(entry)}</td>'
                f'<td class="number">{thousands(entry.features)}</td>'
                f'<td class="links">{_downloads(entry)}</td></tr>')
    return Markup("\n".join(rows))


def entry_rows(entries: list[Entry]) -> Markup:
    """``<tr>`` per entry of one source: layer, entry, latest run, latest good run,
    features, addresses, latest good data."""
    rows = []
    for entry in entries:
        good = (f'<a href="/runs/{entry.good_run_id}">run {entry.good_run_id}</a> '
                f'<span class="file">{_when(entry.good_finished_at)}</span>'
                if entry.good_run_id else DASH)
        rows.append(
            f'<tr><td>{escape(entry.layer)}</td>'
            f'<td>{escape(entry.entry_name) if entry.entry_name else DASH}</td>'
            f'<td>{_latest(entry)}</td><td>{good}</td>'
            f'<td class="number">{thousands(entry.features)}</td>'
            f'<td class="number">{thousands(entry.addresses)}</td>'
            f'<td class="links">{_downloads(entry)}</td></tr>')
    return Markup("\n".join(rows))
