"""`make bench`: run every benchmark in turn; each prints its table and writes JSON to
benchmarks/results/. Pass --quick for a smoke run."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "benchmarks.bench_tiles",
    "benchmarks.bench_merge",
    "benchmarks.bench_upload",
    "benchmarks.bench_farm",
    "benchmarks.bench_render_overhead",
    "benchmarks.bench_coordinator",
    "benchmarks.bench_verify_compare",
    "benchmarks.bench_verify",
)


def main() -> int:
    extra = sys.argv[1:]
    failed = 0
    for module in BENCHMARKS:
        print(f"\n=== {module} ===", flush=True)
        failed += (
            subprocess.run([sys.executable, "-m", module, *extra], check=False).returncode != 0
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
