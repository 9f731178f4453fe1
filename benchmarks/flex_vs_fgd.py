"""flex against FGD on every bundled trace, each with its lower bound (acceptance 2 of the engine issue).

    python benchmarks/flex_vs_fgd.py [--seeds 42-51] [--traces default,gpushare40,...] [--jobs 2]

Prints one row per trace: mean unallocated GPU % at arrived 100 % for fgd and flex, their ratio, the
lower bound, and the share of the FGD-to-bound gap that flex closes; then the mean ratio over traces.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from flexai.sim.openb import bundled_names
from flexai.sim.runner import default_jobs, run_many


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="42-51")
    parser.add_argument("--traces", default=",".join(bundled_names("pods")))
    parser.add_argument("--jobs", type=int, default=default_jobs())
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    rows = []
    print(f"{'trace':<12} {'fgd':>7} {'flex':>7} {'ratio':>6} {'bound':>7} {'closed':>7}  wall s fgd/flex")
    for trace in args.traces.split(","):
        started = time.perf_counter()
        runs, bounds = run_many(trace, "gpu", ["fgd", "flex"], seeds, 1.3, args.jobs, True)
        by = {p: [r for r in runs if r.policy == p] for p in ("fgd", "flex")}
        fgd = float(np.mean([r.unallocated_gpu_pct[100] for r in by["fgd"]]))
        flex = float(np.mean([r.unallocated_gpu_pct[100] for r in by["flex"]]))
        bound = float(np.mean([b.unallocated_gpu_pct for b in bounds.values()]))
        closed = (fgd - flex) / (fgd - bound) * 100 if fgd > bound else 0.0
        walls = [float(np.mean([r.wall_s for r in by[p]])) for p in ("fgd", "flex")]
        rows.append(
            {
                "trace": trace,
                "fgd": fgd,
                "flex": flex,
                "ratio": flex / fgd,
                "bound": bound,
                "gap_closed_pct": closed,
                "wall_s": walls,
                "elapsed_s": time.perf_counter() - started,
            }
        )
        print(
            f"{trace:<12} {fgd:7.3f} {flex:7.3f} {flex / fgd:6.3f} {bound:7.3f} {closed:6.1f}%  "
            f"{walls[0]:.2f}/{walls[1]:.2f}",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    print(f"mean ratio flex/fgd over {len(rows)} traces: {np.mean(ratios):.3f} (max {max(ratios):.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
