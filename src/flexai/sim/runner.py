"""Runs many (policy, seed) experiments over worker processes and gathers their results."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from flexai.sim.experiment import RunResult, build_arrivals, run_fill
from flexai.sim.metrics import events_behind_point
from flexai.sim.openb import NodeList, PodTrace, load_nodes, load_pods

if TYPE_CHECKING:
    from flexai.sim.bound import BoundResult


@dataclass(frozen=True)
class RunSummary:
    """What a report needs of one run (the per-pod arrays are reduced to curves and counts)."""

    policy: str
    seed: int
    unallocated_gpu_pct: dict[int, float]
    curve: dict[int, float]
    placed_demand_curve: dict[int, float]
    """GPU demand of the placed pods, % of capacity, against arrived % (what sharing buys over whole GPUs)."""
    failed_pods: int
    failed_pods_at_100: int
    placed_pods_at_100: int
    placed_demand_pct_at_100: float
    fragmentation_pct_at_100: float
    wall_s: float
    max_migrations: int = 0
    """M: moves allowed per failed pod (0: none)."""
    migrations: int = 0
    """Moves made in the run."""
    unblocked_pods: int = 0
    """Pods placed after moves (they had failed without them)."""

    @classmethod
    def of(cls, run: RunResult) -> RunSummary:
        return cls(
            policy=run.policy,
            seed=run.seed,
            unallocated_gpu_pct=run.unallocated_gpu_pct,
            curve=run.curve(),
            placed_demand_curve=run.placed_demand_curve(),
            failed_pods=run.failed_pods,
            failed_pods_at_100=run.failed_pods_at(100),
            placed_pods_at_100=run.placed_pods_at(100),
            placed_demand_pct_at_100=run.placed_demand_pct_at(100),
            fragmentation_pct_at_100=run.fragmentation_pct_at_100,
            wall_s=run.wall_s,
            max_migrations=run.max_migrations,
            migrations=run.migrations,
            unblocked_pods=run.unblocked_pods,
        )


@lru_cache(maxsize=4)
def _trace(source: str) -> PodTrace:
    return load_pods(source)


@lru_cache(maxsize=4)
def _nodes(source: str) -> NodeList:
    return load_nodes(source)


def _run_one(trace: str, nodes: str, policy: str, seed: int, inflate: float, migrations: int = 0) -> RunSummary:
    return RunSummary.of(run_fill(_trace(trace), _nodes(nodes), policy, seed, inflate, migrations=migrations))


def _bound_one(trace: str, nodes: str, seed: int, inflate: float, time_limit_s: float) -> tuple[int, BoundResult]:
    from flexai.sim.bound import lower_bound_unallocated  # scipy loads only when a bound is asked for

    pods, node_list = _trace(trace), _nodes(nodes)
    arrivals = build_arrivals(pods, node_list, seed, inflate, np.random.default_rng(seed))
    capacity = sum(n.device_count for n in node_list.nodes) * 1000
    arrived = np.cumsum(pods.total_share_milli[arrivals.pod_index])
    upto = events_behind_point(arrived, capacity, 100)
    requests = [pods.requests[i] for i in arrivals.pod_index[:upto]]
    return seed, lower_bound_unallocated(node_list.nodes, requests, time_limit_s)


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def run_many(
    trace: str,
    nodes: str,
    policies: Sequence[str],
    seeds: Sequence[int],
    inflate: float,
    jobs: int,
    with_bound: bool,
    on_done: Callable[[str], None] | None = None,
    bound_time_limit_s: float = 20.0,
    migrations: int = 0,
) -> tuple[list[RunSummary], dict[int, BoundResult]]:
    """All (policy, seed) runs plus, if asked, the lower bound per seed. ``on_done`` is told after each task.
    ``migrations``: at most this many moves per failed pod (0: none)."""
    tasks: list[tuple] = [("run", trace, nodes, p, s, inflate, migrations) for p in policies for s in seeds]
    if with_bound:
        tasks += [("bound", trace, nodes, s, inflate, bound_time_limit_s) for s in seeds]
    runs: list[RunSummary] = []
    bounds: dict[int, BoundResult] = {}

    def collect(kind: str, value: object) -> None:
        if kind == "run":
            assert isinstance(value, RunSummary)
            runs.append(value)
            label = f"{value.policy} seed {value.seed}"
        else:
            seed, bound = value  # type: ignore[misc]
            bounds[seed] = bound
            label = f"bound seed {seed}"
        if on_done:
            on_done(label)

    if jobs <= 1:
        for task in tasks:
            fn = _run_one if task[0] == "run" else _bound_one
            collect(task[0], fn(*task[1:]))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            pending = {pool.submit(_run_one if t[0] == "run" else _bound_one, *t[1:]): t[0] for t in tasks}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    collect(pending.pop(future), future.result())
    order = {p: i for i, p in enumerate(policies)}
    runs.sort(key=lambda r: (order[r.policy], r.seed))
    return runs, bounds
