"""Running one layer entry in a child process with a wall-clock and a memory limit.

The child (:func:`services.worker.child.main`, forked from the pre-imported
:mod:`services.worker.zygote`) does all the work and writes ``index.json`` into the output
folder. Whatever happens to it — a time limit, an address-space limit, a
segfault in a C library, a catastrophic regular expression — the parent survives and turns it
into a failed :class:`~services.worker.state.RunState` with the reason, keeping the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.worker.state import RunState
from services.worker.version import CODE_VERSION
from services.worker.zygote import ZYGOTE, RunProcess, ZygoteLost
from shared.messages import SourceProblem

INDEX = "index.json"
LOG = "output.txt"


@dataclass(frozen=True)
class RunRequest:
    """Everything the child needs; written as JSON next to the outputs."""

    source: dict[str, Any]
    source_path: str
    layer: str
    entry_name: str
    outdir: str
    workdir: str
    allow_files: bool = False
    allow_private: bool = False
    max_unpacked_bytes: int = 20 * 1024**3
    max_download_bytes: int = 10 * 1024**3
    #: ESRI_HOST_LIMIT (None: its default) and the worker's slot folder shared by its runs
    #: (None: each download keeps its own; see services/worker/sources/hosts.py).
    esri_host_limit: int | None = None
    host_slots_dir: str | None = None
    #: USER_AGENT (None: ours).
    user_agent: str | None = None
    #: From the latest successful run of this entry, for conditional GET and reuse.
    previous: dict[str, Any] | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_bytes: int


async def run_isolated(request: RunRequest, limits: Limits) -> RunState:
    """Run ``request`` in a child process and return its state, whatever happened to it."""
    outdir = Path(request.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    Path(request.workdir).mkdir(parents=True, exist_ok=True)
    request_path = Path(request.workdir) / "request.json"
    request_path.write_text(json.dumps(asdict(request), default=str))
    started = time.monotonic()
    stderr_path = outdir / "child-stderr.txt"
    problem: SourceProblem | None = None
    error: str | None = None
    returncode: int | None = None
    try:
        process = await ZYGOTE.fork(
            str(request_path), str(stderr_path), memory_bytes=limits.memory_bytes,
            # Progress bars go to the terminal of `process-one`; logs go to output.txt.
            terminal=request.progress,
        )
    except ZygoteLost as exc:
        problem, error = "conform_failed", str(exc)
    else:
        try:
            returncode = await asyncio.wait_for(process.wait(), limits.timeout_s)
        except TimeoutError:
            process.kill()
            returncode = await _reaped(process)
            problem = "timeout"
            error = f"the run passed its time limit of {limits.timeout_s:g} s and was stopped"
        except ZygoteLost as exc:
            process.kill()
            problem, error = "conform_failed", f"{exc}; the run was stopped"
        except asyncio.CancelledError:
            process.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(_reaped(process))
            raise
    _append_child_output(outdir / LOG, stderr_path)
    elapsed = time.monotonic() - started
    index = outdir / INDEX
    if problem is None and returncode == 0 and index.exists():
        return RunState.read(index)
    if problem is None:
        problem, error = _explain_exit(returncode, outdir / LOG, limits)
    state = RunState.model_validate({
        "source": request.source_path, "layer": request.layer, "name": request.entry_name,
        "source problem": problem, "error": error, "code version": CODE_VERSION,
        "process time": round(elapsed, 3), "output": LOG if (outdir / LOG).exists() else None,
    })
    state.write(index)
    return state


async def _reaped(process: RunProcess) -> int | None:
    """The return code of a killed child, once the zygote has reaped it."""
    try:
        return await asyncio.wait_for(process.wait(), 30)
    except (TimeoutError, ZygoteLost):
        return None


def _explain_exit(
    returncode: int | None, log_path: Path, limits: Limits
) -> tuple[SourceProblem, str]:
    tail = _tail(log_path)
    if looks_out_of_memory(tail):
        return "out_of_memory", (
            f"the run needed more than its memory limit of {limits.memory_bytes // 2**20} MiB"
        )
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        return "conform_failed", f"the run's process was killed by {name}; see output.txt"
    return "conform_failed", f"the run's process exited with status {returncode}; see output.txt"


#: What running out of address space looks like in a child's output. Under RLIMIT_AS a child
#: often fails before any MemoryError: the dynamic loader cannot map a C extension (numpy,
#: GDAL, pydantic-core) and raises ImportError, or OpenBLAS gives up allocating its buffers.
_MEMORY_SIGNS = (
    "MemoryError",
    "bad_alloc",
    "Cannot allocate memory",
    "failed to map segment from shared object",
    "Memory allocation still failed",
)


def looks_out_of_memory(text: str) -> bool:
    """Whether ``text`` (a log tail, an exception) says the process ran out of memory."""
    return any(sign in text for sign in _MEMORY_SIGNS)


def _tail(path: Path, size: int = 4096) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode("utf-8", "replace")


def _append_child_output(log_path: Path, stderr_path: Path) -> None:
    """Tracebacks and C-library messages the child printed go to the end of the run's log."""
    data = stderr_path.read_bytes() if stderr_path.exists() else b""
    if data.strip():
        with log_path.open("ab") as log:
            log.write(b"\n--- process output ---\n" + data)
    stderr_path.unlink(missing_ok=True)
