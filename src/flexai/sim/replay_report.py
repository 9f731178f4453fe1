"""Running many replays, summarising them with 95 % intervals, and writing the report folder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from pathlib import Path

import numpy as np

from flexai.sim.openb import NodeList, PodTrace, load_nodes, load_pods
from flexai.sim.replay import REPLAY_SCHEDULERS, ReplayResult, run_replay

SUMMARY_METRICS = (
    "gpu_allocated_pct",
    "gpu_busy_pct",
    "work_done_gpu_hours",
    "completed",
    "abandoned",
    "preemptions",
    "preempted_over_3",
    "lost_gpu_hours",
    "wall_s",
    "migrations",
    "migrated_pods_pct",
    "blocked_by_fragmentation_pct",
    "opportunistic_gpu_hours",
    "idle_unusable_for_memory_pct",
)


@lru_cache(maxsize=2)
def _inputs(trace: str, nodes: str) -> tuple[PodTrace, NodeList]:
    return load_pods(trace), load_nodes(nodes)


def _one(args: tuple[str, str, str, float, int, int, tuple[float, ...]]) -> list[ReplayResult]:
    """One simulation, reported at every interference alpha (alpha changes no decision, only the slowdown)."""
    trace, nodes, scheduler, load, seed, gpus, interference = args
    pods, node_list = _inputs(trace, nodes)
    result = run_replay(pods, node_list, scheduler, load, seed, gpus, interference=interference[0])
    return [result.with_interference(alpha) for alpha in interference]


def run_replays(
    trace: str,
    nodes: str,
    schedulers: Sequence[str],
    loads: Sequence[float],
    seeds: Sequence[int],
    gpus: int,
    workers: int,
    done: Callable[[ReplayResult], None] | None = None,
    interference: Sequence[float] = (0.02,),
) -> list[ReplayResult]:
    """Every (scheduler, load, seed), longest first, over ``workers`` processes (1: in this process); each
    reported at every interference alpha."""
    alphas = tuple(interference)
    tasks = [
        (trace, nodes, s, load, seed, gpus, alphas)
        for load in sorted(loads, reverse=True)
        for seed in seeds
        for s in schedulers
    ]
    results: list[ReplayResult] = []
    if workers <= 1 or len(tasks) == 1:
        for task in tasks:
            results.extend(_one(task))
            if done:
                done(results[-1])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(_one, task) for task in tasks}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    results.extend(future.result())
                    if done:
                        done(results[-1])
    order = {name: i for i, name in enumerate(REPLAY_SCHEDULERS)}
    results.sort(key=lambda r: (r.load, r.interference, order.get(r.scheduler, 99), r.seed))
    return results


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _interval(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t over seeds)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "ci95": 0.0}
    from scipy.stats import t

    half = float(t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return {"mean": mean, "ci95": half}


def summarise(results: Sequence[ReplayResult]) -> list[dict[str, object]]:
    groups: dict[tuple[str, float, float], list[ReplayResult]] = {}
    for r in results:
        groups.setdefault((r.scheduler, r.load, r.interference), []).append(r)
    rows = []
    for (scheduler, load, alpha), runs in groups.items():
        row: dict[str, object] = {
            "scheduler": scheduler,
            "load": load,
            "interference": alpha,
            "seeds": [r.seed for r in runs],
        }
        for metric in SUMMARY_METRICS:
            row[metric] = _interval([float(getattr(r, metric)) for r in runs])
        row["queue_delay_s"] = {
            cls: {q: _interval([r.queue_delay_s[cls][q] for r in runs]) for q in ("p50", "p99")}
            for cls in runs[0].queue_delay_s
        }
        row["high_slowdown"] = {q: _interval([r.high_slowdown[q] for r in runs]) for q in ("p50", "p99")}
        row["multi_gpu_queue_delay_s"] = {
            q: _interval([r.multi_gpu_queue_delay_s[q] for r in runs]) for q in ("p50", "p99")
        }
        pods = sum(r.pods for r in runs)
        row["preempted_over_3_pct_of_pods"] = 100.0 * sum(r.preempted_over_3 for r in runs) / max(1, pods)
        work = sum(r.work_done_gpu_hours for r in runs)
        row["lost_pct_of_work_done"] = 100.0 * sum(r.lost_gpu_hours for r in runs) / max(1e-9, work)
        rows.append(row)
    return rows


def document(trace: str, gpus: int, results: Sequence[ReplayResult]) -> dict[str, object]:
    return {"trace": trace, "gpus": gpus, "runs": [r.json() for r in results], "summary": summarise(results)}


def write_json(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc, indent=1, default=float))


def markdown(doc: dict[str, object]) -> str:
    lines = [
        f"# flexai replay — trace {doc['trace']}, sub-cluster of {doc['gpus']} GPUs",
        "",
        "Mean over seeds ± half-width of the 95 % interval. Allocated and busy: time-averaged % of the "
        "sub-cluster's GPUs over the 34-day window. Queueing delay: first start minus arrival (pods still "
        "waiting at the end count with their wait so far).",
        "",
        "| load | alpha | scheduler | allocated % | busy % | work done GPU-h | high p99 s | normal p99 s | low p99 s "
        "| preemptions | lost % of work | pods preempted >3 | opportunistic GPU-h | high slowdown p99 "
        "| idle short of memory % | migrations | migrated % | blocked by fragmentation % | multi-GPU p99 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(cell: dict[str, float], digits: int = 1) -> str:
        return f"{cell['mean']:,.{digits}f} ± {cell['ci95']:,.{digits}f}"

    for row in doc["summary"]:  # type: ignore[union-attr]
        delay = row["queue_delay_s"]
        lines.append(
            f"| {row['load']:g} | {row['interference']:g} | {row['scheduler']} | {fmt(row['gpu_allocated_pct'])} "
            f"| {fmt(row['gpu_busy_pct'])} "
            f"| {fmt(row['work_done_gpu_hours'], 0)} | {fmt(delay['high']['p99'], 0)} "
            f"| {fmt(delay['normal']['p99'], 0)} | {fmt(delay['low']['p99'], 0)} | {fmt(row['preemptions'], 0)} "
            f"| {row['lost_pct_of_work_done']:.2f} | {row['preempted_over_3_pct_of_pods']:.2f} % "
            f"| {fmt(row['opportunistic_gpu_hours'], 0)} | {fmt(row['high_slowdown']['p99'], 3)} "
            f"| {fmt(row['idle_unusable_for_memory_pct'])} | {fmt(row['migrations'], 0)} "
            f"| {fmt(row['migrated_pods_pct'], 2)} | {fmt(row['blocked_by_fragmentation_pct'])} "
            f"| {fmt(row['multi_gpu_queue_delay_s']['p99'], 0)} |"
        )
    lines += ["", "Schedulers:", ""]
    lines += [f"- `{s.name}`: {s.description}" for s in REPLAY_SCHEDULERS.values()]
    return "\n".join(lines) + "\n"


def plot(path_allocation: Path, path_delay: Path, results: Sequence[ReplayResult]) -> None:
    """Allocated and busy GPUs over time, and the queueing delay per class, one line per scheduler (first
    seed of the highest load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    load = max(r.load for r in results)
    seed = min(r.seed for r in results if r.load == load)
    chosen = [r for r in results if r.load == load and r.seed == seed]
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in chosen:
        days = np.asarray(r.series["hour"]) / 24.0
        axes[0].plot(days, _smooth(r.series["allocated_gpus"]), label=r.scheduler, linewidth=1)
        axes[1].plot(days, _smooth(r.series["busy_gpus"]), label=r.scheduler, linewidth=1)
    gpus = chosen[0].gpus
    axes[0].set_ylabel(f"allocated GPUs (of {gpus})")
    axes[1].set_ylabel(f"busy GPUs (of {gpus})")
    axes[1].set_xlabel("day of the trace window")
    axes[0].set_title(f"load {load:g}, seed {seed}: 6-hour moving average")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path_allocation, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, cls in zip(axes, ("high", "normal", "low"), strict=True):
        for r in chosen:
            days = np.asarray(r.series["hour"]) / 24.0
            values = np.asarray(r.series[f"mean_delay_s_{cls}"], dtype=np.float64)
            ax.plot(days, np.maximum(_smooth(values, nan=True), 1.0), label=r.scheduler, linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{cls}: mean queueing delay by arrival hour")
        ax.set_xlabel("day of the trace window")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds (log)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_delay, dpi=110)
    plt.close(fig)


def _smooth(values: Sequence[float], hours: int = 6, nan: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if nan:
        array = np.nan_to_num(array, nan=0.0)
    kernel = np.ones(hours) / hours
    return np.convolve(array, kernel, mode="same")
