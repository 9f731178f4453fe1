"""Whole-process wall time of `flexai replay` (acceptance 2 of the Hi Scheduler issue).

    python benchmarks/replay_speed.py [--schedulers hi,flex,fgd,k8s-default] [--defaults]

One run per scheduler: `flexai replay --scheduler S --load 1.1 --seeds 42 --jobs 1` (default trace, 128 GPUs,
including start-up, loading, the plots and the report) in a fresh process; with `--defaults`, also plain
`flexai replay` (its default schedulers, load and seeds on every core).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    flexai = Path(sys.executable).with_name("flexai")
    started = time.perf_counter()
    subprocess.run([str(flexai), "replay", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedulers", default="hi,flex,fgd,k8s-default")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in args.schedulers.split(","):
            wall = timed(["--scheduler", scheduler, "--load", "1.1", "--seeds", "42", "--jobs", "1", "--out", tmp])
            print(f"{scheduler:12s} one run (128 GPUs, load 1.1, seed 42), whole process: {wall:6.1f} s", flush=True)
        if args.defaults:
            print(f"flexai replay with its defaults: {timed(['--out', tmp]):.1f} s", flush=True)


if __name__ == "__main__":
    main()
