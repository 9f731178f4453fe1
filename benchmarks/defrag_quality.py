"""The defragmentation heuristic against the exact MILP on blocked pods from the bundled traces.

    python benchmarks/defrag_quality.py [--traces default,multigpu40] [--seeds 42-44] [--samples 40]
                                        [--max-moves 16] [--hole-nodes 64] [--json PATH]

For each trace and seed: fill the 1,213 GPU nodes with ``flex`` as ``flexai simulate`` does (no moves),
and at ``--samples`` of the pods that fail while blocked by fragmentation (evenly spread over the run) ask
both ``flexai.hi.defrag.find_moves`` and ``flexai.sim.defrag_milp.milp_moves`` (HiGHS, exact on the
``--hole-nodes`` most promising hole nodes and every device with room for each replica) for the fewest
moves (at most ``--max-moves``) of non-``high`` pods that open a hole. Every plan is checked by carrying it
out in the ledger and rolling back. Prints how often each finds a plan, how often the heuristic finds one
when the MILP does, how many more moves it then uses, and the time each takes. ``no_hole_possible``
counts blocked pods for which no node could hold them even if every movable pod that fits elsewhere left
(no plan exists at all); ``exact`` those where the MILP saw every possible hole node and proved optimality;
``free_pct_at_100_by_device_free`` where the unallocated share lies when the arrived workload reaches 100 %
(as % of capacity, by the free share of its device: slivers beside big slices cannot be consolidated).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from flexai.hi.defrag import blocked_by_fragmentation, commit_plan, find_moves
from flexai.hi.work import QOS_CLASSES, PriorityClass
from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy
from flexai.sim.defrag_milp import milp_moves
from flexai.sim.experiment import build_arrivals, run_fill
from flexai.sim.openb import load_nodes, load_pods


def _valid(engine: Scheduler, plan, request: Request) -> bool:  # type: ignore[no-untyped-def]
    """Carry the plan out in the ledger and roll back (flex keeps no bookkeeping beyond the ledger)."""
    checkpoint = engine.state.checkpoint()
    try:
        commit_plan(engine, plan, "blocked", request)
    except Exception:
        return False
    engine.state.rollback(checkpoint)
    return True


SLIVER_BUCKETS_MILLI = (100, 200, 500)


def free_by_size(state: ClusterState) -> dict[str, float]:
    """Free share as % of capacity, by how much is free on its device (below 0.1, 0.1-0.2, 0.2-0.5, above)."""
    free = state.free_share_milli[state.device_present]
    edges = (0, *SLIVER_BUCKETS_MILLI, 1001)
    return {
        f"{lo / 1000:g}-{min(hi, 1000) / 1000:g}": round(
            100.0 * float(free[(free >= lo) & (free < hi)].sum()) / state.total_share_milli, 3
        )
        for lo, hi in zip(edges, edges[1:], strict=False)
    }


def instances(
    trace: str, seed: int, samples: int, max_moves: int, hole_nodes: int, at_100: list[dict[str, float]]
) -> list[dict[str, object]]:
    pods, nodes = load_pods(trace), load_nodes("gpu")
    failed = run_fill(pods, nodes, "flex", seed).failed
    failures = np.flatnonzero(failed)
    rng = np.random.default_rng(seed)
    arrivals = build_arrivals(pods, nodes, seed, 1.3, rng)
    state = ClusterState(nodes.nodes)
    engine = Scheduler(
        state, create_policy("flex", PolicyContext(profile=pods.profile(), rng=rng)), arrivals.node_priority
    )
    movable: dict[str, tuple[Request, Placement]] = {}
    # Blocked-by-fragmentation failures are most of them; spread the samples over all failures.
    wanted = set(failures[np.linspace(0, len(failures) - 1, min(samples, len(failures))).astype(int)].tolist())
    rows: list[dict[str, object]] = []
    arrived = np.cumsum(pods.total_share_milli[arrivals.pod_index])
    crossed_100_at = int(np.searchsorted(arrived, state.total_share_milli, side="right"))
    for event, pod in enumerate(arrivals.pod_index.tolist()):
        if event == crossed_100_at:
            at_100.append(free_by_size(state))
        request = pods.requests[pod]
        result = engine.schedule(request, str(event))
        if result.status is Status.SCHEDULED:
            if QOS_CLASSES.get(request.qos, PriorityClass.NORMAL) is not PriorityClass.HIGH:
                movable[str(event)] = (request, result.placement)  # type: ignore[assignment]
            continue
        if event not in wanted or not blocked_by_fragmentation(engine, request):
            continue
        started = time.perf_counter()
        heuristic = find_moves(engine, request, movable, max_moves)
        heuristic_s = time.perf_counter() - started
        started = time.perf_counter()
        exact = milp_moves(engine, request, movable, max_moves, hole_nodes=hole_nodes)
        milp_s = time.perf_counter() - started
        rows.append(
            {
                "trace": trace,
                "seed": seed,
                "event": event,
                "shape": f"{request.device_count}x{request.share_milli}",
                "heuristic_moves": None if heuristic is None else len(heuristic.moves),
                "heuristic_valid": heuristic is None or _valid(engine, heuristic, request),
                "heuristic_s": heuristic_s,
                "milp_moves": None if exact.plan is None else len(exact.plan.moves),
                "milp_valid": exact.plan is None or _valid(engine, exact.plan, request),
                "milp_optimal": exact.optimal,
                "milp_variables": exact.variables,
                "viable_nodes": exact.viable_nodes,
                "exact": exact.optimal and exact.viable_nodes <= hole_nodes,
                "milp_s": milp_s,
            }
        )
    return rows


def summarise(rows: list[dict[str, object]]) -> dict[str, object]:
    both = [r for r in rows if r["milp_moves"] is not None and r["heuristic_moves"] is not None]
    milp_found = [r for r in rows if r["milp_moves"] is not None]
    heuristic_found = [r for r in rows if r["heuristic_moves"] is not None]
    extra = [int(r["heuristic_moves"]) - int(r["milp_moves"]) for r in both]  # type: ignore[arg-type]
    return {
        "instances": len(rows),
        "milp_found": len(milp_found),
        "heuristic_found": len(heuristic_found),
        "heuristic_found_when_milp_did_pct": round(100.0 * len(both) / len(milp_found), 1) if milp_found else None,
        "heuristic_only": len(heuristic_found) - len(both),
        "extra_moves_mean": round(float(np.mean(extra)), 3) if extra else None,
        "extra_moves_max": max(extra) if extra else None,
        "same_moves_pct": round(100.0 * sum(1 for e in extra if e == 0) / len(extra), 1) if extra else None,
        "milp_optimal_pct": round(100.0 * sum(1 for r in rows if r["milp_optimal"]) / len(rows), 1) if rows else None,
        "no_hole_possible": sum(1 for r in rows if r["viable_nodes"] == 0),
        "exact_pct": round(100.0 * sum(1 for r in rows if r["exact"]) / len(rows), 1) if rows else None,
        "all_plans_valid": all(r["heuristic_valid"] and r["milp_valid"] for r in rows),
        "heuristic_ms_mean": round(1000 * float(np.mean([r["heuristic_s"] for r in rows])), 2) if rows else None,
        "heuristic_ms_p99": round(1000 * float(np.percentile([r["heuristic_s"] for r in rows], 99)), 2)
        if rows
        else None,
        "milp_ms_mean": round(1000 * float(np.mean([r["milp_s"] for r in rows])), 1) if rows else None,
        "milp_ms_p99": round(1000 * float(np.percentile([r["milp_s"] for r in rows], 99)), 1) if rows else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces", default="default,multigpu40")
    parser.add_argument("--seeds", default="42-44")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--max-moves", type=int, default=16)
    parser.add_argument("--hole-nodes", type=int, default=64)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    all_rows: list[dict[str, object]] = []
    per_trace = {}
    for trace in args.traces.split(","):
        at_100: list[dict[str, float]] = []
        rows = [r for s in seeds for r in instances(trace, s, args.samples, args.max_moves, args.hole_nodes, at_100)]
        all_rows += rows
        per_trace[trace] = summarise(rows)
        per_trace[trace]["free_pct_at_100_by_device_free"] = {
            k: round(float(np.mean([a[k] for a in at_100])), 3) for k in at_100[0]
        }
        print(trace, json.dumps(per_trace[trace]), flush=True)
    total = summarise(all_rows)
    print("all", json.dumps(total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_trace": per_trace, "all": total, "rows": all_rows}, f, indent=1)


if __name__ == "__main__":
    main()
