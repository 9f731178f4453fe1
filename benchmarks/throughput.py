"""Engine decision throughput on a synthetic cluster (acceptance 3 of the engine issue).

    python benchmarks/throughput.py [--nodes 5000] [--gpus 8] [--policies fgd,flex,bestfit] [--pods 3000]

Builds a cluster of NODES x GPUS devices, fills it to 50 % and to 90 % of its GPU capacity with pods drawn
from the default trace's shape population (seeded), then times the next PODS decisions (filter, score,
select devices, reserve) and reports pods/s. kube-scheduler's own threshold for pods with extended
resources is 180 pods/s at 5,000 nodes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flexai.model import ClusterState, Node
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy
from flexai.sim.openb import load_pods

MODELS = ("A100", "H100", "L40S", "T4")


def build_nodes(count: int, gpus: int) -> list[Node]:
    return [Node(f"node-{i:05d}", 128_000, 1_048_576, gpus, MODELS[i % len(MODELS)]) for i in range(count)]


def measure(policy: str, nodes: list[Node], fill: float, pods: int, seed: int = 1) -> tuple[float, int]:
    trace = load_pods("default")
    rng = np.random.default_rng(seed)
    gpu_pods = [r for r in trace.requests if r.device_count > 0]
    state = ClusterState(nodes)
    scheduler = Scheduler(state, create_policy(policy, PolicyContext(profile=trace.profile(), rng=rng)))
    target = fill * state.total_share_milli
    i = 0
    while state.allocated_share_milli < target:
        scheduler.schedule(gpu_pods[int(rng.integers(len(gpu_pods)))], f"fill-{i}")
        i += 1
    batch = [trace.requests[int(rng.integers(len(trace.requests)))] for _ in range(pods)]
    scheduled = 0
    started = time.perf_counter()
    for j, request in enumerate(batch):
        scheduled += scheduler.schedule(request, f"bench-{j}").status is Status.SCHEDULED
    elapsed = time.perf_counter() - started
    return pods / elapsed, scheduled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--policies", default="fgd,flex,bestfit")
    parser.add_argument("--pods", type=int, default=3000)
    args = parser.parse_args()
    nodes = build_nodes(args.nodes, args.gpus)
    print(f"{args.nodes} nodes x {args.gpus} GPUs, {args.pods} timed decisions per point")
    for policy in args.policies.split(","):
        for fill in (0.5, 0.9):
            rate, scheduled = measure(policy, nodes, fill, args.pods)
            print(f"{policy:<8} fill {fill:.0%}: {rate:8.0f} pods/s ({scheduled} of {args.pods} placed)", flush=True)


if __name__ == "__main__":
    main()
