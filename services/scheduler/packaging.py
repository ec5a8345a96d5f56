"""What a collection zip says about itself: its name, its members' names, README.txt and
LICENSE.txt. Pure functions of the runs it holds (tested without storage)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.errors import SourceError
from shared.sources import attribution, get_entry, source_name

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SINGULAR = {"addresses": "address", "parcels": "parcel", "buildings": "building",
             "centerlines": "centerline"}


@dataclass(frozen=True)
class GoodRun:
    """An entry's latest good run (see ``collect.LATEST_GOOD_RUNS``): what a collection copies."""

    run_id: int
    source_path: str
    layer: str
    entry_name: str
    commit_sha: str | None
    finished_at: datetime | None
    source: Mapping[str, Any] = field(repr=False)
    outputs: Mapping[str, str] = field(repr=False)
    state: Mapping[str, Any] = field(repr=False)

    @property
    def feature_count(self) -> int:
        """The run's addresses (or features of another layer), as its index.json counts them."""
        for key in ("address count", "feature count"):
            value = self.state.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    @property
    def terms(self) -> dict[str, Any]:
        """Licence and attribution (:func:`shared.sources.attribution`); from the run's
        index.json when its source document no longer has the entry."""
        try:
            return attribution(self.source, get_entry(self.source, self.layer, self.entry_name))
        except (SourceError, KeyError, TypeError, IndexError):
            state = self.state
            return {"license_text": state.get("license"), "license_url": None,
                    "attribution_required": state.get("attribution required"),
                    "attribution_name": state.get("attribution name"),
                    "share_alike": state.get("share-alike"), "website": state.get("website")}

    @property
    def share_alike(self) -> bool:
        """Only a licence that says share-alike puts a source in the ``-sa`` zip."""
        return self.terms.get("share_alike") is True


def collection_name(region: str, layer: str, share_alike: bool) -> str:
    """``openaddr-collected-{region}[-{layer}][-sa].zip`` (no layer part for addresses)."""
    layer_part = "" if layer == "addresses" else f"-{layer}"
    return f"openaddr-collected-{region}{layer_part}{'-sa' if share_alike else ''}.zip"


def member_bases(runs: Sequence[GoodRun]) -> dict[int, str]:
    """Each run's member path without extension: its source's path under ``sources/``
    (``us/ks/lane_county``), with ``-{entry}`` added when the collection holds more than one
    entry of that source."""
    per_source = Counter(run.source_path for run in runs)
    bases: dict[int, str] = {}
    for run in runs:
        base = source_name(run.source_path)
        if per_source[run.source_path] > 1:
            base = f"{base}-{_UNSAFE.sub('_', run.entry_name).strip('_') or 'entry'}"
        bases[run.run_id] = base
    return bases


def readme_text(*, name: str, region: str, layer: str, share_alike: bool, built_at: datetime,
                runs: Sequence[GoodRun], feature_count: int, summary: str | None) -> str:
    """README.txt: what the zip is, when and from what it was built, and its files."""
    commits = sorted({run.commit_sha for run in runs if run.commit_sha})
    newest = max(runs, key=lambda run: (run.finished_at is not None, run.finished_at),
                 default=None)
    sha = newest.commit_sha if newest is not None and newest.commit_sha else "unknown"
    things = "addresses" if layer == "addresses" else f"{_SINGULAR.get(layer, layer)} features"
    lines = [
        f"OpenAddresses collection {name}",
        f"Region: {region}. Layer: {layer}. "
        f"{'Share-alike sources only' if share_alike else 'Sources without share-alike terms'}.",
        f"Built {built_at:%Y-%m-%d %H:%M} UTC by oa-machine from the latest good run of each "
        "source entry (an older good run when the newest failed or was marked with a "
        "regression warning).",
        f"Sources repository commit: {sha}"
        + (f" (runs from {len(commits)} commits)" if len(commits) > 1 else ""),
        f"Sources: {len({run.source_path for run in runs}):,}. Entries: {len(runs):,}. "
        f"{things.capitalize()}: {feature_count:,}.",
        "",
        "Files:",
        "  LICENSE.txt: every source in this zip, its licence and the attribution it asks for.",
    ]
    if layer == "addresses":
        lines += [
            "  {source}.csv: one row per address, UTF-8, comma separated, LON/LAT in WGS 84",
            "    (EPSG:4326) degrees; {source} is the source's path in the sources repository",
            "    (us/ks/lane_county), with -{entry} added when a source has several entries.",
            "  {source}.vrt: an OGR virtual layer for that CSV (GDAL/OGR, QGIS).",
        ]
    else:
        lines += [
            "  {source}.geojson: one GeoJSON Feature per line (WGS 84); {source} is the source's",
            "    path in the sources repository, with -{entry} added when a source has several",
            "    entries.",
        ]
    if summary:
        lines += [f"  {summary}: addresses per 0.1 degree cell: lon,lat of the cell's south-west",
                  "    corner and the count."]
    if share_alike:
        lines += ["", "These data are under share-alike licences: what you make from them must be",
                  "shared under the same terms. See LICENSE.txt for each source's."]
    return "\n".join(lines) + "\n"


def license_text(name: str, runs: Sequence[GoodRun], bases: Mapping[int, str]) -> str:
    """LICENSE.txt: each included entry, with its licence text or URL and attribution."""
    lines = [f"Licences of the sources in {name}", ""]
    for run in runs:
        terms = run.terms
        lines.append(f"{bases[run.run_id]} ({run.layer}, entry {run.entry_name!r}, "
                     f"run {run.run_id}):")
        licence = terms.get("license_text") or terms.get("license_url") or "not stated"
        lines.append(f"  Licence: {licence}")
        if terms.get("license_text") and terms.get("license_url"):
            lines.append(f"  Licence URL: {terms['license_url']}")
        required = terms.get("attribution_required")
        credit = terms.get("attribution_name")
        lines.append(f"  Attribution required: {_yes_no(required)}"
                     + (f"; credit: {credit}" if credit else ""))
        lines.append(f"  Share-alike: {_yes_no(terms.get('share_alike'))}")
        if terms.get("website"):
            lines.append(f"  Website: {terms['website']}")
        lines.append("")
    return "\n".join(lines)


def _yes_no(value: Any) -> str:
    return "unknown" if value is None else ("yes" if value else "no")
