"""Defragmentation by bounded migration (flexai.hi.defrag): scenario tables, the ledger's invariants as a
property, and `flexai simulate --migrations` end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexai.hi.defrag import (
    Move,
    MovePlan,
    blocked_by_fragmentation,
    commit_moves,
    commit_plan,
    find_consolidation,
    find_moves,
)
from flexai.model import ClusterState, Node, Request
from flexai.model.cluster import Placement
from flexai.model.state import LedgerError
from flexai.model.workload import WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, create_policy

GRID = WorkloadProfile.from_requests(
    [Request(device_count=1, share_milli=s) for s in range(100, 1001, 100)]
    + [Request(device_count=k, share_milli=1000) for k in (2, 4)],
    coverage=1.0,
)


def slice_of(share: int, cpu: int = 1000) -> Request:
    return Request(device_count=1, share_milli=share, cpu_milli=cpu, host_memory_mib=1024)


def cluster(
    devices: list[int], grants: list[tuple[str, int, tuple[int, ...], int]], cpu: int = 32_000, policy: str = "flex"
) -> tuple[Scheduler, dict[str, tuple[Request, Placement]]]:
    """Nodes n0, n1, ... with the given device counts; grants (id, node, devices, share) reserved as given.
    Ids starting with 'hi' are high work (not movable); the others are returned as movable."""
    nodes = [Node(f"n{i}", cpu, 256_000, count, "A100", 81_920) for i, count in enumerate(devices)]
    engine = Scheduler(ClusterState(nodes), create_policy(policy, PolicyContext(profile=GRID)))
    movable: dict[str, tuple[Request, Placement]] = {}
    for replica_id, node, devs, share in grants:
        request = (
            Request(device_count=len(devs), share_milli=1000, cpu_milli=1000, host_memory_mib=1024)
            if len(devs) > 1
            else slice_of(share)
        )
        placement = Placement.for_request(request, node, devs)
        engine.state.reserve(replica_id, placement)
        engine.policy.placed(request, placement)
        if not replica_id.startswith("hi"):
            movable[replica_id] = (request, placement)
    return engine, movable


def snapshot(state: ClusterState) -> tuple[object, ...]:
    return (
        state.free_share_milli.tolist(),
        state.free_device_memory_mib.tolist(),
        state.free_cpu_milli.tolist(),
        state.free_host_memory_mib.tolist(),
        dict(state.grants),
        state.allocated_share_milli,
        state.checkpoint(),
    )


def consistent(state: ClusterState) -> None:
    """Free = capacity - what the grants hold, nothing negative, no device granted beyond its capacity."""
    share = state.capacity_share_milli.copy()
    cpu = state.capacity_cpu_milli.copy()
    for p in state.grants.values():
        share[p.node_index, list(p.device_indices)] -= p.share_milli
        cpu[p.node_index] -= p.cpu_milli
    assert (share == state.free_share_milli).all()
    assert (cpu == state.free_cpu_milli).all()
    assert (state.free_share_milli >= 0).all() and (state.free_cpu_milli >= 0).all()


# ------------------------------------------------------------------------------------------- scenario table
SCENARIOS = [
    # name, devices per node, grants (id, node, devices, share), request share/count, max_moves,
    # expected: number of moves (None: no plan), hole node, moved ids
    (
        "one move opens a hole",
        [1, 1],
        [("a", 0, (0,), 500), ("b", 1, (0,), 300)],
        (1, 800),
        4,
        (1, None, None),
    ),
    (
        "fewest moves wins over an emptier node",
        [1, 1, 1],
        [("s1", 0, (0,), 200), ("s2", 0, (0,), 200), ("s3", 0, (0,), 200), ("big", 1, (0,), 500), ("hi", 2, (0,), 300)],
        (1, 900),
        4,
        (1, 1, {"big"}),
    ),
    (
        "high work is never moved",
        [1, 1],
        [("hi-a", 0, (0,), 500), ("hi-b", 1, (0,), 500)],
        (1, 800),
        4,
        (None, None, None),
    ),
    (
        "max_moves is respected (three needed, two allowed)",
        [1, 1, 1],
        [("s1", 0, (0,), 300), ("s2", 0, (0,), 300), ("s3", 0, (0,), 300), ("hi", 1, (0,), 100), ("hi2", 2, (0,), 100)],
        (1, 1000),
        2,
        (None, None, None),
    ),
    (
        "three moves when three are needed and allowed",
        [1, 1, 1],
        [("s1", 0, (0,), 300), ("s2", 0, (0,), 300), ("s3", 0, (0,), 300), ("hi", 1, (0,), 100), ("hi2", 2, (0,), 100)],
        (1, 1000),
        3,
        (3, 0, {"s1", "s2", "s3"}),
    ),
    (
        "a move inside the node frees a whole device",
        [2, 1],
        [("a", 0, (0,), 400), ("b", 0, (1,), 400), ("hi", 1, (0,), 900)],
        (1, 1000),
        1,
        (1, 0, None),
    ),
    (
        "two whole devices for a 2-device request",
        [2, 2],
        [("a", 0, (0,), 300), ("b", 0, (1,), 300), ("hi", 1, (0,), 500), ("hi2", 1, (1,), 500)],
        (2, 1000),
        4,
        (2, 0, {"a", "b"}),
    ),
    (
        "no target anywhere: no plan",
        [1, 1],
        [("a", 0, (0,), 600), ("b", 1, (0,), 600)],
        (1, 500),
        4,
        (None, None, None),
    ),
]


@pytest.mark.parametrize(("name", "devices", "grants", "shape", "max_moves", "expected"), SCENARIOS)
def test_scenarios(name, devices, grants, shape, max_moves, expected) -> None:
    engine, movable = cluster(devices, grants)
    count, share = shape
    request = Request(device_count=count, share_milli=share, cpu_milli=1000, host_memory_mib=1024)
    assert not engine.feasible(request).any(), name
    before = snapshot(engine.state)
    plan = find_moves(engine, request, movable, max_moves)
    assert snapshot(engine.state) == before, "find_moves changed the state"
    moves, hole_node, moved = expected
    if moves is None:
        assert plan is None, name
        return
    assert plan is not None, name
    assert len(plan.moves) == moves, name
    assert len(plan.moves) <= max_moves
    if hole_node is not None:
        assert plan.hole.node_index == hole_node, name
    if moved is not None:
        assert {m.id for m in plan.moves} == moved, name
    assert not any(m.id.startswith("hi") for m in plan.moves)
    commit_plan(engine, plan, "new", request)
    consistent(engine.state)
    assert engine.state.grants["new"] == plan.hole
    for m in plan.moves:
        assert engine.state.grants[m.id] == m.target and m.target != m.source


def test_blocked_by_fragmentation() -> None:
    engine, _ = cluster([1, 1], [("a", 0, (0,), 500), ("b", 1, (0,), 300)])
    assert blocked_by_fragmentation(engine, slice_of(800))  # 1.2 free in total, no device with 0.8
    assert not blocked_by_fragmentation(engine, slice_of(500))  # fits now
    assert not blocked_by_fragmentation(engine, Request(device_count=2, share_milli=1000))  # 2 > 1.2 free
    assert not blocked_by_fragmentation(engine, Request(device_count=4, share_milli=1000))  # never fits
    other_model = Request(device_count=1, share_milli=800, allowed_models=frozenset({"T4"}))
    assert not blocked_by_fragmentation(engine, other_model)  # no T4 share at all


def test_fewest_moves_then_least_lost_work() -> None:
    # Either 'a' (node 0) or 'b' (node 1) can move to the other node; lost work decides.
    engine, movable = cluster([1, 1], [("a", 0, (0,), 400), ("b", 1, (0,), 400)])
    request = slice_of(700)
    plan = find_moves(engine, request, movable, 2, lost_work_s={"a": 100.0, "b": 5.0})
    assert plan is not None and [m.id for m in plan.moves] == ["b"] and plan.hole.node_index == 1
    plan = find_moves(engine, request, movable, 2, lost_work_s={"a": 5.0, "b": 100.0})
    assert plan is not None and [m.id for m in plan.moves] == ["a"] and plan.hole.node_index == 0


def test_node_mask_limits_hole_and_targets() -> None:
    engine, movable = cluster([1, 1, 1], [("a", 0, (0,), 500), ("b", 1, (0,), 500), ("hi", 2, (0,), 500)])
    request = slice_of(900)
    mask = np.array([True, True, False])
    plan = find_moves(engine, request, movable, 2, node_mask=mask)
    assert plan is not None and plan.hole.node_index in (0, 1)
    assert all(m.target.node_index != 2 for m in plan.moves)
    assert find_moves(engine, request, movable, 2, node_mask=np.array([False, False, True])) is None


def test_cpu_stands_in_the_way() -> None:
    # Node 0 has free share but its CPU is held by a movable CPU-only replica; node 1 has CPU to spare.
    engine, movable = cluster([1, 1], [("hi", 1, (0,), 1000)], cpu=8_000)
    hog = Request(cpu_milli=6_500)
    placement = Placement.for_request(hog, 0, ())
    engine.state.reserve("hog", placement)
    movable["hog"] = (hog, placement)
    request = slice_of(500, cpu=2_000)
    assert blocked_by_fragmentation(engine, request)  # enough free share in total, no node where it fits
    plan = find_moves(engine, request, movable, 1)
    assert plan is not None and [m.id for m in plan.moves] == ["hog"] and plan.moves[0].target.node_index == 1
    commit_plan(engine, plan, "new", request)
    consistent(engine.state)


def test_a_request_that_fits_gets_a_plan_without_moves() -> None:
    engine, movable = cluster([1], [("a", 0, (0,), 300)])
    plan = find_moves(engine, slice_of(500), movable, 0)
    assert plan is not None and plan.moves == () and plan.hole.node_index == 0
    with pytest.raises(ValueError, match="max_moves=-1"):
        find_moves(engine, slice_of(500), movable, -1)


def test_commit_plan_is_atomic() -> None:
    engine, movable = cluster([1, 1, 1], [("a", 0, (0,), 500), ("b", 1, (0,), 600), ("hi", 2, (0,), 500)])
    request = slice_of(900)
    plan = find_moves(engine, request, movable, 2)
    assert plan is not None and len(plan.moves) == 1
    target = plan.moves[0].target
    # Something else takes the target's room before the plan is carried out.
    free = int(engine.state.free_share_milli[target.node_index, target.device_indices[0]])
    engine.state.reserve("squatter", Placement(target.node_index, target.device_indices, free - 100, 0, 0, 0))
    before = snapshot(engine.state)
    with pytest.raises(LedgerError):
        commit_plan(engine, plan, "new", request)
    assert snapshot(engine.state) == before, "a failed commit left changes behind"
    assert "new" not in engine.state.grants


def test_commit_plan_refuses_a_stale_source_and_a_wrong_hole() -> None:
    engine, movable = cluster([1, 1], [("a", 0, (0,), 500), ("b", 1, (0,), 300)])
    request = slice_of(800)
    plan = find_moves(engine, request, movable, 1)
    assert plan is not None
    wrong = MovePlan(plan.moves, Placement.for_request(slice_of(100), plan.hole.node_index, plan.hole.device_indices))
    with pytest.raises(LedgerError, match="does not match"):
        commit_plan(engine, wrong, "new", request)
    engine.state.unreserve(plan.moves[0].id)
    with pytest.raises(LedgerError, match="no longer holds"):
        commit_plan(engine, plan, "new", request)


def test_commit_plan_tells_the_policy() -> None:
    engine, movable = cluster([1, 1], [("a", 0, (0,), 500), ("b", 1, (0,), 300)], policy="clustering")
    plan = find_moves(engine, slice_of(800), movable, 1)
    assert plan is not None
    commit_plan(engine, plan, "new", slice_of(800))
    tags = engine.policy.tag_pods[:, 0]  # type: ignore[attr-defined]
    per_node = [sum(1 for p in engine.state.grants.values() if p.node_index == n) for n in range(2)]
    assert tags.tolist() == per_node


CONSOLIDATION = [
    # name, devices, grants, max_moves, expected moved ids
    (
        "least-used node is emptied onto a partly used one",
        [1, 1, 1],
        [("a", 0, (0,), 300), ("b", 1, (0,), 600)],
        4,
        {"a"},
    ),
    (
        "bound respected: the node needing 3 moves is skipped, the next one emptied",
        [1, 1, 1],
        [("a", 0, (0,), 100), ("b", 0, (0,), 100), ("c", 0, (0,), 100), ("d", 1, (0,), 500)],
        2,
        {"d"},
    ),
    (
        "a node with high work is not emptied",
        [1, 1],
        [("hi", 0, (0,), 100), ("a", 0, (0,), 100), ("b", 1, (0,), 500)],
        4,
        {"b"},
    ),
    ("nothing with max_moves 0", [1, 1], [("a", 0, (0,), 300), ("b", 1, (0,), 600)], 0, set()),
]


@pytest.mark.parametrize(("name", "devices", "grants", "max_moves", "expected"), CONSOLIDATION)
def test_consolidation(name, devices, grants, max_moves, expected) -> None:
    engine, movable = cluster(devices, grants)
    before = snapshot(engine.state)
    moves = find_consolidation(engine, movable, max_moves)
    assert snapshot(engine.state) == before
    assert {m.id for m in moves} == expected, name
    assert len(moves) <= max_moves
    fully_free = [(n, d) for n in range(engine.state.node_count) for d in engine.state.fully_free_devices(n).tolist()]
    assert all((m.target.node_index, m.target.device_indices[0]) not in fully_free for m in moves)
    commit_moves(engine, moves)
    consistent(engine.state)
    assert all(engine.state.grants[m.id] == m.target for m in moves)
    if moves:
        emptied = {m.source.node_index for m in moves}
        assert all(not any(p.node_index == n for p in engine.state.grants.values()) for n in emptied)


def test_move_is_a_value() -> None:
    request = slice_of(100)
    move = Move("x", request, Placement.for_request(request, 0, (0,)), Placement.for_request(request, 1, (0,)))
    with pytest.raises(AttributeError):
        move.id = "y"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- property
@st.composite
def fragmented(draw: st.DrawFn) -> tuple[list[int], list[tuple[str, int, tuple[int, ...], int]], int, int]:
    """A small cluster whose devices are mostly partly used (some by high work), and a request."""
    devices = draw(st.lists(st.sampled_from([1, 2, 4]), min_size=2, max_size=4))
    grants = []
    for node, count in enumerate(devices):
        for device in range(count):
            free = 1000
            for share in draw(st.lists(st.sampled_from([100, 200, 300, 400, 500, 700]), min_size=1, max_size=3)):
                if free >= share:
                    free -= share
                    prefix = "hi" if draw(st.integers(0, 3)) == 0 else "r"
                    grants.append((f"{prefix}{len(grants)}", node, (device,), share))
    count = draw(st.sampled_from([1, 1, 1, 2]))
    share = 1000 if count > 1 else draw(st.sampled_from([500, 700, 900, 1000]))
    return devices, grants, count, share


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragmented(), st.integers(0, 4))
def test_property_commit_keeps_the_ledger_consistent(case, max_moves: int) -> None:
    devices, grants, count, share = case
    engine, movable = cluster(devices, grants)
    request = Request(device_count=count, share_milli=share, cpu_milli=1000, host_memory_mib=1024)
    if not engine.ever_fits(request):
        return
    before = snapshot(engine.state)
    plan = find_moves(engine, request, movable, max_moves)
    assert snapshot(engine.state) == before
    if plan is None:
        return
    assert len(plan.moves) <= max_moves
    assert all(m.id in movable for m in plan.moves)
    commit_plan(engine, plan, "new", request)
    consistent(engine.state)
    hole = engine.state.grants["new"]
    assert hole == plan.hole and hole.share_milli == share and len(hole.device_indices) == count
    for m in plan.moves:
        assert engine.state.grants[m.id] == m.target


# ------------------------------------------------------------------------------------------- the static experiment
@pytest.fixture
def tiny_with_qos(tmp_path):  # type: ignore[no-untyped-def]
    nodes = tmp_path / "nodes.csv"
    nodes.write_text(
        "sn,cpu_milli,memory_mib,gpu,model\n"
        + "".join(f"node-{i:02d},32000,131072,{[1, 2, 4, 8][i % 4]},{['T4', 'V100M32'][i % 2]}\n" for i in range(12))
    )
    pods = tmp_path / "pods.csv"
    rows = ["name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos"]
    shapes = [
        (1, 470, "", "BE"),
        (1, 1000, "", "LS"),
        (1, 810, "", "BE"),
        (2, 1000, "", "LS"),
        (0, 0, "", "BE"),
        (1, 230, "T4", "LS"),
        (1, 650, "", "Burstable"),
        (1, 320, "", "BE"),
        (1, 160, "", "BE"),
    ]
    for i in range(90):
        count, share, spec, qos = shapes[i % len(shapes)]
        rows.append(f"pod-{i:03d},{2000 + (i % 3) * 2000},4096,{count},{share},{spec},{qos}")
    pods.write_text("\n".join(rows) + "\n")
    return str(pods), str(nodes)


def test_fill_with_migrations_never_moves_high_pods(tiny_with_qos, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import flexai.sim.experiment as experiment
    from flexai.sim.openb import load_nodes, load_pods
    from flexai.sim.report import document
    from flexai.sim.runner import RunSummary

    moved: list[str] = []
    real = experiment.commit_plan

    def recording(engine, plan, request_id, request):  # type: ignore[no-untyped-def]
        moved.extend(m.request.qos for m in plan.moves)
        return real(engine, plan, request_id, request)

    monkeypatch.setattr(experiment, "commit_plan", recording)
    pods, nodes = load_pods(tiny_with_qos[0]), load_nodes(tiny_with_qos[1])
    total = 0
    for seed in (1, 2, 3, 5):
        plain = experiment.run_fill(pods, nodes, "flex", seed)
        run = experiment.run_fill(pods, nodes, "flex", seed, migrations=4)
        total += run.migrations
        assert plain.migrations == 0 and plain.max_migrations == 0
        assert run.failed_pods <= plain.failed_pods + run.unblocked_pods  # every unblocked pod was placed
        assert run.unblocked_pods <= run.migrations <= 4 * run.unblocked_pods
        entries = document("pods", "nodes", [RunSummary.of(plain), RunSummary.of(run)], {})["runs"]
        assert "migrations" not in entries[0] and entries[1]["migrations"] == run.migrations  # type: ignore[index]
    assert total > 0 and len(moved) == total
    assert "LS" not in moved


def test_simulate_with_migrations_end_to_end(tiny_with_qos, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from flexai.cli.main import app

    pods, nodes = tiny_with_qos
    common = ["simulate", "--trace", pods, "--nodes", nodes, "--policy", "flex", "--seeds", "1,5", "--jobs", "1"]
    common += ["--no-bound"]
    runner = CliRunner()
    moved = runner.invoke(
        app, [*common, "--migrations", "4", "--json", str(tmp_path / "m.json"), "--out", str(tmp_path / "m")]
    )
    assert moved.exit_code == 0, moved.output
    assert "moves per run" in moved.output
    doc = json.loads((tmp_path / "m.json").read_text())
    assert all(isinstance(r["migrations"], int) and r["max_migrations"] == 4 for r in doc["runs"])
    assert sum(r["migrations"] for r in doc["runs"]) > 0
    bad = runner.invoke(app, [*common, "--migrations", "-1", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--migrations=-1 is not allowed" in " ".join(bad.output.split())


@pytest.mark.parametrize(("name", "devices", "grants", "shape", "max_moves", "expected"), SCENARIOS[:6])
def test_the_exact_milp_agrees_on_the_scenarios(name, devices, grants, shape, max_moves, expected) -> None:
    from flexai.sim.defrag_milp import milp_moves

    engine, movable = cluster(devices, grants)
    request = Request(device_count=shape[0], share_milli=shape[1], cpu_milli=1000, host_memory_mib=1024)
    before = snapshot(engine.state)
    answer = milp_moves(engine, request, movable, max_moves)
    assert snapshot(engine.state) == before
    assert answer.optimal, name
    assert (None if answer.plan is None else len(answer.plan.moves)) == expected[0], name
    if answer.plan is not None:
        commit_plan(engine, answer.plan, "new", request)
        consistent(engine.state)


def test_a_replica_on_several_devices_counts_as_one_move() -> None:
    # n0: one 4-device replica; n1: two slices on two devices; n2: free, but too little CPU for the request.
    nodes = [Node("n0", 32_000, 256_000, 4, "A100"), Node("n1", 32_000, 256_000, 4, "A100")]
    nodes.append(Node("n2", 4_000, 256_000, 4, "A100"))
    engine = Scheduler(ClusterState(nodes), create_policy("flex", PolicyContext(profile=GRID)))
    movable: dict[str, tuple[Request, Placement]] = {}
    four = Request(device_count=4, share_milli=1000, cpu_milli=1000, host_memory_mib=1024)
    for replica_id, request, node, devices in [
        ("big4", four, 0, (0, 1, 2, 3)),
        ("s1", slice_of(300), 1, (0,)),
        ("s2", slice_of(300), 1, (1,)),
    ]:
        placement = Placement.for_request(request, node, devices)
        engine.state.reserve(replica_id, placement)
        movable[replica_id] = (request, placement)
    request = Request(device_count=4, share_milli=1000, cpu_milli=8_000, host_memory_mib=1024)
    assert blocked_by_fragmentation(engine, request)
    plan = find_moves(engine, request, movable, 4)
    assert plan is not None and [m.id for m in plan.moves] == ["big4"] and plan.hole.node_index == 0
    assert plan.moves[0].target.node_index == 2 and len(plan.moves[0].target.device_indices) == 4
