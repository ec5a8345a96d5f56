"""How numbers, times and durations read on the site's pages (jinja filters)."""

from __future__ import annotations

from datetime import UTC, datetime

#: What a page shows where there is no value.
DASH = "—"


def thousands(value: int | float | None) -> str:
    """``1234567`` → ``1,234,567``; nothing → a dash."""
    if value is None:
        return DASH
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def duration(seconds: float | None) -> str:
    """A length of time as people say it: ``850 ms``, ``12.3 s``, ``4 min 5 s``, ``2 h 3 min``,
    ``3 d 4 h``."""
    if seconds is None:
        return DASH
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def when(moment: datetime | None) -> str:
    """``2026-12-03 18:47 UTC``."""
    if moment is None:
        return DASH
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(moment: datetime | None) -> str:
    """For ``<time datetime=...>``."""
    return moment.astimezone(UTC).isoformat() if moment is not None else ""


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``5 min ago``; a moment in the future (clocks apart) reads ``just now``."""
    if moment is None:
        return DASH
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    number, unit = duration(seconds).split(" ")[:2]  # the largest unit only: "4 min ago"
    return f"{number} {unit} ago"


def percent(rate: float | None) -> str:
    """``0.975`` → ``97.5 %``."""
    if rate is None:
        return DASH
    return f"{rate * 100:.1f} %"


def short_sha(sha: str | None) -> str:
    return sha[:10] if sha else DASH
