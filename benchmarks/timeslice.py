"""Time-slicing of the embedded pool on a sim device (acceptance 2 of the embedded-pool issue).

    python benchmarks/timeslice.py [--window 10]

Two CPU-bound stand-in jobs share one sim device at 30 % and 70 %; flexai gates their process groups so
each gets its share of device time, measured as CPU time while gated over the window. Then a lone 30 %
job with lending on (it should get the whole device) and with lending off (strict isolation: 30 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from flexai.local.pool import JobSubmission, Pool, PoolConfig
from flexai.local.procfs import group_cpu_seconds
from flexai.node.devices import discover


def busy_command(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass"]


def gated_cpu(pool: Pool, job_ids: list[str], window_s: float) -> dict[str, float]:
    pool.tick()
    pids = {j: pool.store.job(j).pid for j in job_ids}  # type: ignore[union-attr]
    start = {j: group_cpu_seconds(p) for j, p in pids.items()}  # type: ignore[arg-type]
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        pool.timeslice()
        time.sleep(0.005)
    return {j: group_cpu_seconds(p) - start[j] for j, p in pids.items()}  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args()
    for lending in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            backend, devices = discover("sim:1xA100-80GB")
            pool = Pool(Path(tmp), backend, devices, PoolConfig(lending=lending, timeslice_period_s=0.2))
            if lending:
                a = pool.submit(JobSubmission(busy_command(args.window + 30), share_milli=300, name="a30"))
                b = pool.submit(JobSubmission(busy_command(args.window + 30), share_milli=700, name="b70"))
                used = gated_cpu(pool, [a.id, b.id], args.window)
                share = used[a.id] / (used[a.id] + used[b.id])
                print(
                    f"30 % / 70 % jobs over {args.window:g} s: CPU {used[a.id]:.2f} s / {used[b.id]:.2f} s, "
                    f"split {share:.3f} : {1 - share:.3f} (target 0.300 : 0.700, error {abs(share - 0.3) / 0.3:.1%})"
                )
                pool.cancel(a.id)
                pool.cancel(b.id)
            lone = pool.submit(JobSubmission(busy_command(args.window + 30), share_milli=300, name="lone30"))
            used = gated_cpu(pool, [lone.id], args.window / 2)
            print(
                f"lone 30 % job, lending {'on ' if lending else 'off'}: {used[lone.id] / (args.window / 2):.2f} "
                f"of a core over {args.window / 2:g} s (expected {'1.00' if lending else '0.30'})"
            )
            pool.cancel(lone.id)
            pool.shutdown()


if __name__ == "__main__":
    main()
