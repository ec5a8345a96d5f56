"""``python -m bench``: every benchmark, one after the other, each in its own process.

The micro-benchmarks (conform functions, readers, writers) first, then the end-to-end
``process-one`` benchmark (``bench.pipeline``), then the service's (``bench.bench_service``:
the dequeuer's settling rate and the whole pipeline's latency, on the local PostgreSQL and
RabbitMQ), then the results site's (``bench.bench_site``: a million runs, 20 clients);
docs/benchmarks.md records their figures. Arguments after ``--`` go to ``bench.pipeline``
(e.g. ``python -m bench -- --repeat 1``).
"""

from __future__ import annotations

import subprocess
import sys

MICRO = (
    "bench.bench_functions", "bench.bench_read", "bench.bench_writers", "bench.bench_isolation",
)


def main(argv: list[str]) -> int:
    pipeline_args = argv[argv.index("--") + 1:] if "--" in argv else []
    failed = 0
    runs: list[tuple[str, list[str]]] = [(module, []) for module in MICRO]
    runs += [
        ("bench.pipeline", pipeline_args),
        ("bench.bench_service", ["settle"]),
        ("bench.bench_service", ["pipeline"]),
        ("bench.bench_site", []),
    ]
    for module, args in runs:
        print(f"\n== python -m {module} {' '.join(args)}", flush=True)
        failed |= subprocess.run([sys.executable, "-m", module, *args], check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
