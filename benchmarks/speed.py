"""Whole-process wall time and peak memory of one simulation run (acceptance 3 of the engine issue).

    python benchmarks/speed.py [--policies fgd,flex] [--repeat 3]

Runs `flexai simulate --policy P --seeds 42 --no-bound --jobs 1` (default trace, about 10,800 pods on
1,213 nodes, including start-up, loading, the plot and the report) in a fresh process each time and
reports the best and median wall seconds and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(policy: str, out: Path) -> tuple[float, float]:
    flexai = Path(sys.executable).with_name("flexai")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(
        [str(flexai), "simulate", "--policy", policy, "--seeds", "42", "--no-bound", "--jobs", "1", "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    peak_kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return wall, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default="fgd,flex")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            results = [one_run(policy, Path(tmp) / policy) for _ in range(args.repeat)]
            walls = [w for w, _ in results]
            print(
                f"{policy:<14} wall best {min(walls):.2f} s, median {statistics.median(walls):.2f} s; "
                f"peak RSS {max(m for _, m in results):.0f} MiB (over {args.repeat} runs)",
                flush=True,
            )


if __name__ == "__main__":
    main()
