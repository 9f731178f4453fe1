"""The lower bound: exact on small cases it can see through, and never above what a policy reaches."""

from __future__ import annotations

import numpy as np

from flexai.model import Node, Request
from flexai.sim.bound import lower_bound_unallocated
from flexai.sim.experiment import run_fill
from flexai.sim.openb import NodeList, PodTrace


def slice_request(share: int, cpu: int = 1_000) -> Request:
    return Request(device_count=1, share_milli=share, cpu_milli=cpu, host_memory_mib=1)


def test_two_big_slices_never_share_a_device() -> None:
    nodes = [Node("n", 64_000, 1 << 20, 2, "T4")]
    # Three 0.6 slices on two devices: at most two fit, 0.8 of 2.0 stays idle = 40 %.
    result = lower_bound_unallocated(nodes, [slice_request(600)] * 3)
    assert result.optimal
    assert abs(result.unallocated_gpu_pct - 40.0) < 1e-6


def test_cpu_limits_whole_gpus() -> None:
    nodes = [Node("n", 10_000, 1 << 20, 4, "T4")]
    whole = Request(device_count=1, share_milli=1000, cpu_milli=4_000, host_memory_mib=1)
    # CPU allows two 4-core pods: two of four GPUs idle.
    assert abs(lower_bound_unallocated(nodes, [whole] * 4).unallocated_gpu_pct - 50.0) < 1e-6


def test_bound_is_below_every_policy_on_a_random_small_cluster() -> None:
    rng = np.random.default_rng(3)
    nodes = tuple(Node(f"n{i:02d}", 32_000, 1 << 18, int(rng.choice([1, 2, 4, 8])), "T4") for i in range(25))
    shares = rng.choice([230, 470, 650, 810, 1000], size=200)
    requests = tuple(slice_request(int(s), cpu=int(rng.choice([2_000, 6_000]))) for s in shares)
    trace = PodTrace("tiny", tuple(f"p{i:03d}" for i in range(200)), requests, ("",) * 200)
    node_list = NodeList("tiny", nodes)
    bound = lower_bound_unallocated(nodes, requests)
    for policy in ("fgd", "bestfit", "flex"):
        run = run_fill(trace, node_list, policy, seed=1, inflate=1.0)
        # Allocation after all arrivals can never beat the bound computed on all of them.
        assert 100.0 * (1 - run.allocated_milli[-1] / run.capacity_milli) >= bound.unallocated_gpu_pct - 1e-9
