"""Engine scenarios written as data: nodes, a sequence of requests, and the expected placements."""

from __future__ import annotations

import numpy as np
import pytest

from flexai.model import ClusterState, Node, Request, RequestError
from flexai.model.workload import Shape, WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy, policy_names
from flexai.scheduler.registry import UnknownPolicyError

T4x2 = Node("a-t4", 32_000, 131_072, 2, "T4")
V100x4 = Node("b-v100", 64_000, 262_144, 4, "V100M32")
T4x1 = Node("c-t4", 16_000, 65_536, 1, "T4")
CPU = Node("d-cpu", 96_000, 393_216)


def R(count: int = 1, share: int = 1000, cpu: int = 1_000, models: str = "") -> Request:
    return Request(
        device_count=count,
        share_milli=share if count else 0,
        cpu_milli=cpu,
        host_memory_mib=1_024,
        allowed_models=frozenset(m for m in models.split("|") if m),
    )


# (policy, nodes, requests, expected [(node name, devices) or None for unschedulable])
SCENARIOS = [
    # Tightest fit: the second slice joins the partly used device; a whole GPU goes to a free device.
    ("bestfit", [T4x2], [R(1, 300), R(1, 600), R(1, 1000)], [("a-t4", (0,)), ("a-t4", (0,)), ("a-t4", (1,))]),
    # Packing prefers the smaller idle node (1 GPU scores 32 > 2 GPUs 31), then a used device.
    ("packing", [T4x2, T4x1], [R(1, 500), R(1, 400)], [("c-t4", (0,)), ("c-t4", (0,))]),
    # Model constraint: only the V100 node qualifies.
    ("fgd", [T4x2, V100x4], [R(1, 1000, models="V100M32")], [("b-v100", (0,))]),
    # Multi-device request needs 4 whole free devices on one node.
    ("fgd", [T4x2, V100x4], [R(4, 1000), R(1, 1000)], [("b-v100", (0, 1, 2, 3)), ("a-t4", (0,))]),
    # Nothing fits: five whole GPUs on a cluster whose largest node has four.
    ("bestfit", [T4x2, V100x4], [R(5, 1000)], [None]),
    # DotProd: a CPU-only pod goes where the free-CPU dot product is smallest; a GPU pod never to a CPU node.
    ("dotprod", [CPU, T4x1], [R(0, cpu=8_000), R(1, 1000)], [("c-t4", ()), ("c-t4", (0,))]),
    ("dotprod", [CPU, T4x1], [R(0, cpu=12_000), R(1, 1000, cpu=8_000)], [("c-t4", ()), None]),
    # The no-sharing baseline rounds a slice up to a whole device: the second slice needs the other GPU.
    ("k8s-whole-gpu", [T4x2], [R(1, 100), R(1, 100), R(1, 100)], [("a-t4", (0,)), ("a-t4", (1,)), None]),
    # Fragmentation-aware policies keep slices together so that a whole device stays free for a whole pod.
    ("fgd", [T4x2], [R(1, 300), R(1, 300), R(1, 300), R(1, 1000)], [("a-t4", (0,))] * 3 + [("a-t4", (1,))]),
    ("flex", [T4x2], [R(1, 300), R(1, 300), R(1, 300), R(1, 1000)], [("a-t4", (0,))] * 3 + [("a-t4", (1,))]),
]


def profile_for(requests: list[Request]) -> WorkloadProfile:
    return WorkloadProfile.from_shapes([Shape.of(r) for r in requests], coverage=1.0)


@pytest.mark.parametrize(("policy", "nodes", "requests", "expected"), SCENARIOS)
def test_scenario(policy: str, nodes: list[Node], requests: list[Request], expected: list) -> None:
    state = ClusterState(nodes)
    scheduler = Scheduler(state, create_policy(policy, PolicyContext(profile=profile_for(requests))))
    got = []
    for i, request in enumerate(requests):
        result = scheduler.schedule(request, f"r{i}")
        assert result.status in (Status.SCHEDULED, Status.UNSCHEDULABLE), result.reason
        got.append(
            None
            if result.placement is None
            else (state.nodes[result.placement.node_index].name, result.placement.device_indices)
        )
    assert got == expected


def test_flex_keeps_cpu_beside_idle_gpus() -> None:
    """A CPU-only pod goes where it strands no GPU: FGD takes the first node by priority, flex the node whose
    CPU is plentiful for its idle GPUs."""
    lean = Node("a-lean", 26_000, 262_144, 2, "T4")
    rich = Node("b-rich", 104_000, 524_288, 2, "T4")
    workload = [R(1, 1000, cpu=10_000)] * 8 + [R(0, cpu=8_000)]
    profile = WorkloadProfile.from_requests(workload)
    chosen = {}
    for policy in ("fgd", "flex"):
        state = ClusterState([lean, rich])
        result = Scheduler(state, create_policy(policy, PolicyContext(profile=profile))).schedule(R(0, cpu=8_000), "c")
        assert result.placement is not None
        chosen[policy] = state.nodes[result.placement.node_index].name
    assert chosen == {"fgd": "a-lean", "flex": "b-rich"}


def test_flex_keeps_a_scarce_model_for_the_requests_that_need_it() -> None:
    """Half the demand may only run on T4, which holds a quarter of the capacity: T4 is under pressure 2.0,
    and flex widens FGD's preference for sending a pod that may run anywhere to the other model."""
    t4 = Node("a-t4", 64_000, 262_144, 2, "T4")
    g2 = Node("b-g2", 64_000, 262_144, 6, "G2")
    profile = WorkloadProfile.from_requests([R(1, 1000, models="T4")] * 4 + [R(1, 1000)] * 4)
    gaps = {}
    for policy in ("fgd", "flex"):
        state = ClusterState([t4, g2])
        chosen = create_policy(policy, PolicyContext(profile=profile))
        scheduler = Scheduler(state, chosen)
        scores = chosen.score(state, R(1, 1000), scheduler.feasible(R(1, 1000)))
        gaps[policy] = int(scores[1] - scores[0])
        if policy == "flex":
            assert chosen.model_pressure[state.model_index["T4"]] == pytest.approx(2.0)
            assert chosen.model_pressure[state.model_index["G2"]] == pytest.approx(0.0)
        assert scheduler.schedule(R(1, 1000), "x").placement.node_index == 1
    assert gaps["flex"] > gaps["fgd"] > 0


def test_unschedulable_reason_names_the_constraint() -> None:
    scheduler = Scheduler(ClusterState([T4x2]), create_policy("fgd", PolicyContext(profile=profile_for([R()]))))
    result = scheduler.schedule(R(1, 1000, models="A100"), "x")
    assert result.status is Status.UNSCHEDULABLE
    assert result.reason == "0/1 nodes fit: 1 no allowed device model"


def test_ties_go_to_node_priority() -> None:
    nodes = [Node(f"n{i}", 8_000, 8_192, 1, "T4") for i in range(4)]
    state = ClusterState(nodes)
    scheduler = Scheduler(state, create_policy("packing"), node_priority=np.array([3, 1, 0, 2]))
    result = scheduler.schedule(R(1, 1000), "x")
    assert result.placement is not None and result.placement.node_index == 2


@pytest.mark.parametrize(
    "name", ["random", "dotprod", "clustering", "packing", "bestfit", "fgd", "flex", "k8s-whole-gpu"]
)
def test_every_published_and_own_policy_is_registered(name: str) -> None:
    assert name in policy_names()


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(UnknownPolicyError, match="policy='nope' is not known: choose from"):
        create_policy("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_count": 1, "share_milli": 1500}, "share_milli=1500 is not allowed: 1..1000 per device"),
        ({"device_count": 2, "share_milli": 500}, "share_milli=500 is not allowed: 1000 (whole devices)"),
        ({"device_count": -1}, "device_count=-1 is not allowed: 0..64"),
        ({"cpu_milli": -5}, "cpu_milli=-5 is not allowed"),
    ],
)
def test_bad_requests_are_refused_with_field_value_and_allowed(kwargs: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Request(**kwargs)


def test_fgd_score_cache_matches_fresh_computation() -> None:
    """Cached per-(node, shape) scores equal a from-scratch evaluation after many placements."""
    rng = np.random.default_rng(7)
    nodes = [Node(f"n{i:02d}", 32_000, 65_536, int(rng.integers(1, 9)), "T4") for i in range(30)]
    shapes = [R(1, s, cpu=c) for s in (250, 500, 810, 1000) for c in (1_000, 4_000)] + [R(2, 1000), R(0, cpu=8_000)]
    profile = profile_for(shapes)
    state = ClusterState(nodes)
    policy = create_policy("fgd", PolicyContext(profile=profile))
    scheduler = Scheduler(state, policy)
    for i in range(150):
        scheduler.schedule(shapes[int(rng.integers(len(shapes)))], str(i))
    for request in shapes:
        feasible = scheduler.feasible(request)
        cached = policy.score(state, request, feasible)[feasible]
        fresh = create_policy("fgd", PolicyContext(profile=profile))
        fresh.bind_state(state)
        assert np.array_equal(cached, fresh.score(state, request, feasible)[feasible])
