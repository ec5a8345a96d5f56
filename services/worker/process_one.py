"""`oa-machine process-one SOURCE.json OUTDIR`: one layer entry, no broker, no database.

It runs exactly the worker's code (the same isolated child), but may read local files and
private addresses, since the person running it owns the machine.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from services.demo import DATA_DIR, with_data_url
from services.worker.isolation import INDEX, Limits, RunRequest, run_isolated
from services.worker.state import RunState
from shared.config import Settings
from shared.errors import SourceError
from shared.sources import entry_timeout_s, get_entry, list_entries, load_source


def source_path_of(path: Path) -> str:
    """``.../sources/us/ks/lane_county.json`` → ``us/ks/lane_county``; else the file's stem."""
    parts = path.resolve().with_suffix("").parts
    if "sources" in parts:
        index = len(parts) - 1 - parts[::-1].index("sources")
        return "/".join(parts[index + 1:])
    return path.stem


def process_one(
    settings: Settings, source_file: str, outdir: str, layer: str, name: str | None,
    *, data_url: str | None = None,
) -> int:
    """Process one entry; print the path of index.json; 0 on success or skip, 1 on failure.

    ``{data_url}`` in the source (the demo sources' placeholder) becomes ``data_url``, by
    default the bundled demo data folder.
    """
    path = Path(source_file)
    try:
        data = with_data_url(path.read_bytes(), data_url or DATA_DIR.resolve().as_uri())
        source = load_source(data, path=str(path))
        refs = [ref for ref in list_entries(source) if ref.layer == layer]
        if not refs:
            raise SourceError(f"{path}: no entries in layer {layer!r}")
        entry_name = name if name is not None else refs[0].name
        entry = get_entry(source, layer, entry_name)
    except (OSError, SourceError) as exc:
        print(f"oa-machine process-one: {exc}", file=sys.stderr)
        return 1
    out = Path(outdir).resolve()
    # Progress and the summary line are for a person watching, on the terminal the run's
    # child writes its progress to; through a pipe only the outcome is printed.
    watched = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="oa-process-one-") as work:
        request = RunRequest(
            source=source, source_path=source_path_of(path), layer=layer,
            entry_name=entry_name, outdir=str(out), workdir=work, allow_files=True,
            allow_private=True, max_unpacked_bytes=settings.max_unpacked_bytes,
            max_download_bytes=settings.max_download_bytes,
            progress=watched,
        )
        limits = Limits(entry_timeout_s(entry, settings.run_timeout_s), settings.run_memory_bytes)
        state = asyncio.run(run_isolated(request, limits))
    print(out / INDEX)
    if state.source_problem and not state.skipped:
        print(f"failed ({state.source_problem}): {state.error}", file=sys.stderr)
        return 1
    if watched:
        print(summary(state), file=sys.stderr)
    return 0


def summary(state: RunState) -> str:
    """The last line on a terminal: ``240 features, 1 dropped row, 0.8 s``."""
    if state.skipped:
        return f"skipped: {state.error}"
    features, dropped = state.feature_count or 0, state.dropped_rows
    return (f"{features:,} feature{'s' * (features != 1)}, {dropped:,} dropped "
            f"row{'s' * (dropped != 1)}, {state.process_time or 0:.1f} s")
