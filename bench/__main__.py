"""``python -m bench``: every benchmark, one after the other, each in its own process.

The micro-benchmarks (conform functions, readers, writers) first, then the end-to-end
``process-one`` benchmark (``bench.pipeline``), whose figures docs/benchmarks.md records.
Arguments after ``--`` go to ``bench.pipeline`` (e.g. ``python -m bench -- --repeat 1``).
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
    for module in (*MICRO, "bench.pipeline"):
        print(f"\n== python -m {module}", flush=True)
        args = pipeline_args if module == "bench.pipeline" else []
        failed |= subprocess.run([sys.executable, "-m", module, *args], check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
