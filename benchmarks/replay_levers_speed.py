"""Cost of the Hi Scheduler's utilisation levers in the replay (acceptance 4 of the time-sharing and
defragmentation issue): one run with everything on (`hi`) against the same run without time-sharing and
without defragmentation (the Hi Scheduler as it was before them), side by side in one process.

    python benchmarks/replay_levers_speed.py [--load 1.1] [--seeds 42] [--gpus 128]

Prints the wall time of each run (trace loading excluded: it is shared) and the ratio.
"""

from __future__ import annotations

import argparse
import time

from flexai.sim.openb import load_nodes, load_pods
from flexai.sim.replay import _HI, REPLAY_SCHEDULERS, ReplayScheduler, run_replay

PLAIN = "hi-without-levers"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=float, default=1.1)
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--gpus", type=int, default=128)
    args = parser.parse_args()
    REPLAY_SCHEDULERS[PLAIN] = ReplayScheduler(PLAIN, "flex", _HI, "hi without time-sharing and defragmentation")
    pods, nodes = load_pods("default"), load_nodes("gpu")
    for seed in (int(s) for s in args.seeds.split(",")):
        walls = {}
        for scheduler in (PLAIN, "hi"):
            started = time.perf_counter()
            result = run_replay(pods, nodes, scheduler, args.load, seed, args.gpus)
            walls[scheduler] = time.perf_counter() - started
            print(
                f"seed {seed} {scheduler:18s} {walls[scheduler]:6.1f} s  busy {result.gpu_busy_pct:5.2f} %  "
                f"moves {result.migrations}  guests {result.guest_starts}",
                flush=True,
            )
        print(f"seed {seed} ratio hi / {PLAIN}: {walls['hi'] / walls[PLAIN]:.2f}", flush=True)


if __name__ == "__main__":
    main()
