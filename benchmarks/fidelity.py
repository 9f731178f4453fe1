"""Our reproductions of the FGD paper's six policies against the paper artifact's numbers (acceptance 1).

    python benchmarks/fidelity.py [--trace default] [--seeds 42-51] [--results flexai-report/results.json]

With --results, reads a `flexai simulate --json` document instead of running the policies again.
Prints mean unallocated GPU % at arrived 100 % (ours and the paper's), the difference, and the bar
(0.5 points for fgd and bestfit, 1.0 for packing, dotprod and random; clustering has no bar).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
from importlib import resources

import numpy as np

from flexai.sim.runner import default_jobs, run_many

PAPER_NAMES = {
    "random": "Random",
    "dotprod": "DotProd",
    "clustering": "GpuClustering",
    "packing": "GpuPacking",
    "bestfit": "BestFit",
    "fgd": "FGD",
}
BARS = {"fgd": 0.5, "bestfit": 0.5, "packing": 1.0, "dotprod": 1.0, "random": 1.0}


def reference(trace: str) -> dict[str, tuple[float, float]]:
    raw = (resources.files("flexai.sim.data") / "reference_unallocated_gpu_pct.csv.gz").read_bytes()
    rows = csv.DictReader(io.StringIO(gzip.decompress(raw).decode()))
    return {
        r["policy"]: (float(r["unalloc_mean"]), float(r["unalloc_sd"]))
        for r in rows
        if r["trace"] == trace and r["arrived_pct"] == "100"
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default="default")
    parser.add_argument("--seeds", default="42-51")
    parser.add_argument("--results", default="")
    args = parser.parse_args()
    ours: dict[str, tuple[float, float]] = {}
    if args.results:
        with open(args.results) as fh:
            doc = json.load(fh)
        for s in doc["summary"]:
            ours[s["policy"]] = (s["unallocated_gpu_pct_at_100"]["mean"], s["unallocated_gpu_pct_at_100"]["sd"])
    else:
        lo, _, hi = args.seeds.partition("-")
        seeds = list(range(int(lo), int(hi or lo) + 1))
        runs, _ = run_many(args.trace, "gpu", list(PAPER_NAMES), seeds, 1.3, default_jobs(), False)
        for policy in PAPER_NAMES:
            values = [r.unallocated_gpu_pct[100] for r in runs if r.policy == policy]
            ours[policy] = (float(np.mean(values)), float(np.std(values, ddof=1)))
    paper = reference(args.trace)
    print(f"{'policy':<12} {'ours':>13} {'paper':>13} {'diff':>6}  bar")
    for policy, name in PAPER_NAMES.items():
        if policy not in ours or name not in paper:
            continue
        (m, sd), (pm, psd) = ours[policy], paper[name]
        bar = BARS.get(policy)
        verdict = "" if bar is None else ("within" if abs(m - pm) <= bar else "OUTSIDE") + f" {bar}"
        print(f"{policy:<12} {m:6.2f} ± {sd:4.2f} {pm:6.2f} ± {psd:4.2f} {m - pm:+6.2f}  {verdict}")


if __name__ == "__main__":
    main()
