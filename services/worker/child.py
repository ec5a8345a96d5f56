"""The child process of one run, forked by :mod:`services.worker.zygote`.

It logs to the run's ``output.txt`` (with a resource-usage line every 30 s), runs the entry, and
always leaves an ``index.json`` unless the process itself is killed; the parent covers that.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

from services.worker.isolation import INDEX, LOG, RunRequest, looks_out_of_memory
from services.worker.run import run_entry
from services.worker.state import RunState
from services.worker.version import CODE_VERSION

log = logging.getLogger("oa.run")

#: How often the log records memory and CPU use, so a slow or growing run can be diagnosed.
USAGE_INTERVAL_S = 30.0


def main(argv: list[str]) -> int:
    request = RunRequest(**json.loads(Path(argv[1]).read_text()))
    outdir = Path(request.outdir)
    _log_to(outdir / LOG)
    log.info("run of %s %s %r in process %d", request.source_path, request.layer,
             request.entry_name, os.getpid())
    stop = threading.Event()
    threading.Thread(target=_report_usage, args=(stop,), daemon=True).start()
    try:
        state = run_entry(request)
    except MemoryError:
        log.error("out of memory")
        state = _failed(request, "out_of_memory", "the run ran out of memory")
    except Exception as exc:  # the last line of defence: a bug must still give a state
        log.exception("unexpected error")
        if looks_out_of_memory(repr(exc)):
            # e.g. ImportError "failed to map segment" of a lazily imported C extension.
            state = _failed(request, "out_of_memory", f"the run ran out of memory: {exc!r}")
        else:
            state = _failed(request, "conform_failed", f"unexpected error: {exc!r}")
    finally:
        stop.set()
    state.output = LOG
    state.write(outdir / INDEX)
    return 0


def _failed(request: RunRequest, problem: str, error: str) -> RunState:
    return RunState.model_validate({
        "source": request.source_path, "layer": request.layer, "name": request.entry_name,
        "source problem": problem, "error": error, "code version": CODE_VERSION,
    })


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _report_usage(stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(USAGE_INTERVAL_S):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        log.info(
            "resources: %.0f s elapsed, %.1f s cpu, peak rss %.0f MiB",
            time.monotonic() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
