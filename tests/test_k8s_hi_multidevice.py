"""Pods asking for part of a device on several devices (a slice on each of k distinct devices of one node),
decided through the Hi Scheduler against the fake API server: placed, never over-granted, waiting with a
readable reason, and preempting lower-class work when they are high."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from flexai.hi import HiConfig, HiScheduler, PriorityClass, WorkItem
from flexai.k8s import names
from flexai.model import ClusterState, Node, Request, RequestError
from flexai.scheduler import PolicyContext, Scheduler, create_policy
from flexai.scheduler.registry import policy_names
from tests.k8s_objects import pod
from tests.test_hi_scheduler import GRID
from tests.test_k8s_hi import Harness, workload_pod


def two_container_pod(name: str, share: int = 500, memory_mib: int = 4096, cls: str = "normal") -> dict:
    """trainer and evaluator, each with one device at ``share``: the pod's demand is 2 devices at ``share``."""
    p = workload_pod(name, share, "q", cls)
    limits = {names.RESOURCE_VXPU: "1", names.RESOURCE_SHARE: str(share), names.RESOURCE_MEMORY: str(memory_mib)}
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": limits}
    p["spec"]["containers"] = [
        {"name": "trainer", "image": "busybox", "resources": resources},
        {"name": "evaluator", "image": "busybox", "resources": resources},
    ]
    return p


def placement_of(h: Harness, name: str) -> names.Placement | None:
    with h.server.lock:
        stored = h.server.pods.get(f"default/{name}")
        if stored is None or not stored["spec"].get("nodeName"):
            return None
        return names.Placement.from_json(stored["metadata"]["annotations"][names.ANNOTATION_PLACEMENT])


def assert_hi_holds(h: Harness, name: str, placement: names.Placement) -> None:
    """Hi's ledger holds exactly the slices the pod was bound with."""
    with h.service.extender.lock:
        hi = h.bridge.hi
        assert hi is not None
        grant = hi.state.grants[f"uid-{name}"]
        row = h.service.cluster.index_of[placement.node]
        assert grant.node_index == row
        assert sorted(grant.device_indices) == sorted(s.device for s in placement.slices)
        assert {grant.share_milli} == {s.share_milli for s in placement.slices}


def test_two_containers_each_with_part_of_one_device_are_bound_on_two_devices() -> None:
    h = Harness({"node-0": 2, "node-1": 4})
    try:
        h.server.add_pod(two_container_pod("pair"))
        h.run()
        placement = placement_of(h, "pair")
        assert placement is not None
        assert len(placement.slices) == 2
        assert len({s.uuid for s in placement.slices}) == 2
        assert all(s.uuid.startswith(f"GPU-{placement.node}-") for s in placement.slices)
        assert [(s.share_milli, s.memory_mib) for s in placement.slices] == [(500, 4096), (500, 4096)]
        # One distinct device for each container.
        assert sorted(c.name for c in placement.containers) == ["evaluator", "trainer"]
        assert sorted(i for c in placement.containers for i in c.slices) == [0, 1]
        assert_hi_holds(h, "pair", placement)
        with h.service.extender.lock:
            assert "uid-pair" in h.bridge.hi.running and not h.bridge.problems  # type: ignore[union-attr]
        assert not [e for e in h.server.events if e["reason"] == "FlexaiUnschedulable"]
        h.check_ledger()
    finally:
        h.stop()


def test_one_container_with_two_devices_at_thirty_percent_is_bound() -> None:
    h = Harness({"node-0": 4})
    try:
        h.server.add_pod(workload_pod("p2x300", 300, "q", "normal", count=2))
        h.run()
        placement = placement_of(h, "p2x300")
        assert placement is not None
        assert len({s.uuid for s in placement.slices}) == 2
        assert {s.share_milli for s in placement.slices} == {300}
        assert_hi_holds(h, "p2x300", placement)
        h.check_ledger()
    finally:
        h.stop()


def test_filling_never_over_grants_a_device_and_the_pod_that_does_not_fit_says_why() -> None:
    h = Harness({"node-0": 2})
    try:
        # Three pods of 2 x 30 % fill both devices to 90 %; the fourth cannot fit.
        for i in range(4):
            h.server.add_pod(workload_pod(f"f{i}", 300, "q", "normal", count=2))
        h.run()
        bound = [i for i in range(4) if placement_of(h, f"f{i}") is not None]
        assert len(bound) == 3
        h.check_ledger()
        (waiting,) = h.pending()
        result = h.service.extender.filter({"Pod": waiting, "NodeNames": h.nodes})
        assert result["NodeNames"] == []
        reason = result["FailedNodes"]["node-0"]
        assert reason.startswith("flexai: needs 30 % on each of 2 devices on one node; at most 0 such on any node")
    finally:
        h.stop()


def test_mixed_shapes_never_over_grant_any_device() -> None:
    """Many pods of several shapes (slices on one and on several devices, whole devices): every device's
    slices stay within 1000 in the API server, and Hi's ledger holds exactly what the pods were bound with."""
    h = Harness({"node-0": 4, "node-1": 3, "node-2": 2})
    rng = random.Random(5)
    try:
        shapes = [(2, 300), (2, 500), (3, 200), (1, 700), (1, 400), (2, 1000), (4, 250)]
        names_ = []
        for i in range(40):
            count, share = shapes[rng.randrange(len(shapes))]
            name = f"m{i:02d}"
            names_.append(name)
            h.server.add_pod(workload_pod(name, share, "q", "normal", count=count))
        h.run()
        h.settle()
        used: Counter[tuple[str, str]] = Counter()
        placed = 0
        for name in names_:
            placement = placement_of(h, name)
            if placement is None:
                continue
            placed += 1
            assert len({s.uuid for s in placement.slices}) == len(placement.slices)
            for s in placement.slices:
                used[(placement.node, s.uuid)] += s.share_milli
            assert_hi_holds(h, name, placement)
        assert placed >= 5 and max(used.values()) <= 1000, (placed, sorted(used.items()))
        h.check_ledger()
        with h.service.extender.lock:
            state, hi = h.service.cluster.state, h.bridge.hi
            assert state is not None and hi is not None
            assert (state.free_share_milli == hi.state.free_share_milli).all()
        # Those that wait say why, from hi.
        for p in h.pending():
            result = h.service.extender.filter({"Pod": p, "NodeNames": h.nodes})
            assert all(text.startswith("flexai: ") for text in result["FailedNodes"].values())
            assert not result["FailedAndUnresolvableNodes"]
    finally:
        h.stop()


def test_a_high_pod_on_two_devices_evicts_the_low_work_that_opens_its_hole() -> None:
    h = Harness({"node-0": 2})
    try:
        # low-a 60 % on GPU 0, low-b 60 % on GPU 1, low-c 30 % on GPU 0 (tightest fit).
        for name, share in (("low-a", 600), ("low-b", 600), ("low-c", 300)):
            h.server.add_pod(workload_pod(name, share, "q", "low"))
            h.run()
        devices = {n: placement_of(h, n) for n in ("low-a", "low-b", "low-c")}
        assert all(p is not None for p in devices.values())
        # 2 x 50 %: GPU 0 has 10 % free, GPU 1 40 %; only evicting low-a and low-b opens 50 % on both.
        h.server.add_pod(two_container_pod("high", 500, cls="high"))
        h.run()
        h.settle()
        placement = placement_of(h, "high")
        assert placement is not None
        assert sorted(h.server.evictions) == ["default/low-a", "default/low-b"]
        assert h.server.pod_deletes == 0 and placement_of(h, "low-c") is not None
        assert {s.share_milli for s in placement.slices} == {500} and len(placement.slices) == 2
        assert_hi_holds(h, "high", placement)
        h.check_ledger()
    finally:
        h.stop()


def test_a_pod_that_never_fits_on_several_devices_is_unresolvable() -> None:
    """2 x 50 % on a cluster whose nodes have one device each: it can never be placed."""
    h = Harness({"node-0": 1, "node-1": 1})
    try:
        h.server.add_pod(pod("never", 2, 500, 4096, cpu="1", mem="1Gi"))
        h.settle()
        (waiting,) = h.pending()
        result = h.service.extender.filter({"Pod": waiting, "NodeNames": h.nodes})
        assert result["NodeNames"] == []
        texts = set(result["FailedNodes"].values()) | set(result["FailedAndUnresolvableNodes"].values())
        assert texts and all("can never fit" in t for t in texts), texts
    finally:
        h.stop()


def test_the_bridge_adopts_a_bound_pod_on_several_devices_again_after_a_rebuild() -> None:
    h = Harness({"node-0": 2})
    try:
        h.server.add_pod(two_container_pod("pair", 400))
        h.run()
        placement = placement_of(h, "pair")
        assert placement is not None
        with h.service.extender.lock:
            h.bridge.hi = None  # as after a node changed shape: a fresh Hi Scheduler adopts what is bound
            assert h.bridge._ensure() is not None and not h.bridge.problems
        assert_hi_holds(h, "pair", placement)
    finally:
        h.stop()


# ---------------------------------------------------------------------- the same shape in flexai.hi and the engine


def test_a_slice_on_several_devices_is_asked_for_explicitly() -> None:
    with pytest.raises(RequestError, match=r"share_milli=500 is not allowed: 1000 \(whole devices\)"):
        Request(device_count=2, share_milli=500)
    with pytest.raises(RequestError, match="multi_slice=True is not allowed: True only with device_count > 1"):
        Request(device_count=1, share_milli=500, multi_slice=True)
    with pytest.raises(RequestError, match="multi_slice=True is not allowed"):
        Request(device_count=2, share_milli=1000, multi_slice=True)
    request = Request(device_count=2, share_milli=500, multi_slice=True)
    assert request.total_share_milli == 1000 and not request.is_fractional
    assert request.whole_devices() == Request(device_count=2, share_milli=1000)


def _hi(devices: int, preemption: str = "fraction-aware", policy: str = "flex") -> HiScheduler:
    nodes = [Node("n0", 64_000, 256_000, devices, "A100", 81_920)]
    engine = Scheduler(ClusterState(nodes), create_policy(policy, PolicyContext(profile=GRID)))
    config = HiConfig(preemption=preemption, normal_min_runtime_s=0.0, preempt_backoff_s=0.0)
    return HiScheduler(engine, config)


def _work(name: str, count: int, share: int, cls: str = "normal", memory: int = 0) -> WorkItem:
    request = Request(
        device_count=count, share_milli=share, device_memory_mib=memory, multi_slice=count > 1 and share < 1000
    )
    return WorkItem(name, request, PriorityClass.parse(cls), name=name)


def test_every_policy_places_slices_on_distinct_devices_tightest_first() -> None:
    for policy in policy_names():
        hi = _hi(4, policy=policy)
        hi.submit(_work("one", 1, 700), 0.0)
        hi.cycle(0.0)
        hi.submit(_work("pair", 2, 300), 0.0)
        result = hi.cycle(0.0)
        (start,) = result.starts
        devices = start.placement.device_indices
        assert len(set(devices)) == 2, policy
        if policy == "k8s-whole-gpu":  # no sharing: rounded up to whole devices
            assert start.placement.share_milli == 1000
            continue
        assert start.placement.share_milli == 300
        one = hi.state.grants["one"].device_indices[0]
        if policy != "random":
            assert one in devices, policy  # the 30 % left beside the 70 % slice is the tightest fit
        free = hi.state.free_share_milli[0, :4]
        assert (free >= 0).all() and int(free.sum()) == 4000 - 700 - 600, policy


def test_hi_fills_a_node_without_over_granting_and_says_why_the_rest_waits() -> None:
    hi = _hi(3)
    for i in range(6):
        hi.submit(_work(f"p{i}", 3, 400, memory=30_000), 0.0)
    result = hi.cycle(0.0)
    assert [s.item.id for s in result.starts] == ["p0", "p1"]
    assert (hi.state.free_share_milli[0, :3] == 200).all()
    assert (hi.state.free_device_memory_mib[0, :3] == 81_920 - 60_000).all()
    assert hi.reason("p2").startswith("needs 40 % on each of 3 devices on one node; at most 0 such on any node")
    hi.release("p0")
    result = hi.cycle(1.0)
    assert [s.item.id for s in result.starts] == ["p2"]
    assert (hi.state.free_share_milli[0, :3] == 200).all()


def test_both_preemption_plugins_open_a_slice_on_every_device_it_needs() -> None:
    for plugin in ("fraction-aware", "k8s-default"):
        hi = _hi(3, preemption=plugin)
        for name, share in (("a", 600), ("b", 600), ("c", 300), ("d", 1000)):
            hi.submit(_work(name, 1, share, "low"), 0.0)
            hi.cycle(0.0)
        held = {n: hi.state.grants[n].device_indices for n in "abcd"}
        assert held == {"a": (0,), "b": (1,), "c": (0,), "d": (2,)}, held
        # 3 x 50 %: GPU 0 has 10 % free, GPU 1 40 %, GPU 2 none.
        hi.submit(_work("high", 3, 500, "high"), 1.0)
        result = hi.cycle(1.0)
        victims = {p.victim.id for p in result.preemptions}
        if plugin == "fraction-aware":
            assert victims == {"a", "b", "d"}, victims  # c stays: GPU 0 has 70 % once a leaves
        else:
            assert {"a", "b", "d"} <= victims, victims
        (start,) = result.starts
        assert sorted(start.placement.device_indices) == [0, 1, 2] and start.placement.share_milli == 500
        assert (hi.state.free_share_milli[0, :3] >= 0).all()
        assert set(start.after) == victims
