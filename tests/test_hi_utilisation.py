"""The Hi Scheduler's utilisation levers: time-sharing of idle share (guests) and defragmentation by bounded
migration. Scenario tables for the decisions, property tests for the invariants."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexai.hi import HiConfig, HiError, HiScheduler, PriorityClass, QueueSpec, Quota
from flexai.model import Placement
from tests.test_hi_scheduler import HIGH, LOW, NORMAL, item, make

MIB = 81_920  # device memory of the test nodes (A100 80 GB)
TIMESHARE = HiConfig(timeshare=True, timeshare_memory_headroom_pct=5.0)


def observe(hi: HiScheduler, busy: float | np.ndarray = 0.0, memory_mib: int | np.ndarray = 0) -> None:
    shape = hi.state.free_share_milli.shape
    hi.observe_devices(
        np.broadcast_to(np.asarray(busy, dtype=float), shape).copy(),
        np.broadcast_to(np.asarray(memory_mib), shape).copy(),
    )


def owned(hi: HiScheduler, *names: str) -> None:
    """Start ``normal`` owners that take whole devices."""
    for name in names:
        hi.submit(item(name, 1000, NORMAL), 0.0)
    result = hi.cycle(0.0)
    assert {s.item.id for s in result.starts} == set(names)


# ----------------------------------------------------------------------------------------- time-sharing
def test_a_low_item_runs_as_a_guest_on_idle_granted_share_and_counts_against_no_quota() -> None:
    hi = make([("n0", 2)], TIMESHARE, queues=[QueueSpec("q", borrowing_limit=Quota({"*": 0}))])
    owned(hi, "o0", "o1")
    hi.submit(item("g", 500, LOW, queue="q"), 1.0)
    assert hi.cycle(1.0).starts == []  # nothing observed yet: no guest
    observe(hi, busy=0.02, memory_mib=20_000)
    result = hi.cycle(2.0)
    [start] = result.starts
    assert start.opportunistic and start.item.id == "g" and "opportunistic" in start.reason
    assert start.placement.device_memory_mib == MIB // 2  # its share of the device's memory
    assert "g" in hi.guests and "g" not in hi.pending and "g" not in hi.running
    assert hi.state.grants.get("g") is None  # nothing in the ledger
    # Its queue may borrow nothing, yet the guest runs: it is charged to no quota.
    [queue] = [row for row in hi.queue_view() if row["queue"] == "q"]
    assert queue["used_share_milli"] == 0
    assert hi.release("g") is not None and "g" not in hi.guests


@pytest.mark.parametrize(
    "case,busy,memory_mib,owners,item_cls,share,started",
    [
        ("idle owned device with room", 0.1, 20_000, 2, LOW, 500, True),
        ("owners busy", 0.6, 20_000, 2, LOW, 500, False),
        ("memory short", 0.0, 50_000, 2, LOW, 500, False),  # 50 + 40 GiB > 95 % of 80
        ("no owner: the device is free, placement seats it", 0.0, 0, 0, LOW, 500, True),
        ("normal work is never a guest", 0.0, 0, 2, NORMAL, 500, False),
        ("two devices of one node", 0.0, 10_000, 2, LOW, 1000, True),
    ],
)
def test_where_a_guest_may_start(
    case: str, busy: float, memory_mib: int, owners: int, item_cls: PriorityClass, share: int, started: bool
) -> None:
    hi = make([("n0", 2)], TIMESHARE)
    owned(hi, *[f"o{i}" for i in range(owners)])
    observe(hi, busy, memory_mib)
    count = 2 if case == "two devices of one node" else 1
    hi.submit(item("w", share, item_cls, count=count, memory=20_000 if count == 2 else 0), 1.0)
    result = hi.cycle(1.0)
    assert bool(result.starts) is started, case
    if owners and started:
        assert result.starts[0].opportunistic


def test_at_most_max_guests_per_device() -> None:
    hi = make([("n0", 1)], HiConfig(timeshare=True, timeshare_max_guests=2))
    owned(hi, "o")
    observe(hi, 0.0, 1_000)
    for name in "abc":
        hi.submit(item(name, 100, LOW), 1.0)
    result = hi.cycle(1.0)
    assert [s.item.id for s in result.starts] == ["a", "b"]
    assert hi.reason("c") != ""


def test_guests_pause_while_owners_are_busy_and_resume_when_idle() -> None:
    hi = make([("n0", 1)], TIMESHARE)
    owned(hi, "o")
    observe(hi, 0.0, 1_000)
    hi.submit(item("g", 300, LOW), 1.0)
    assert hi.cycle(1.0).starts[0].opportunistic
    observe(hi, 0.9, 1_000)
    result = hi.cycle(2.0)
    assert (result.pauses, result.resumes) == (["g"], [])
    assert hi.cycle(3.0).pauses == []  # said once
    observe(hi, 0.95, 1_000)
    assert hi.cycle(3.5).pauses == []
    observe(hi, 0.1, 1_000)
    result = hi.cycle(4.0)
    assert (result.pauses, result.resumes) == ([], ["g"])


def test_a_guest_yields_when_its_owners_need_the_memory_and_goes_back_to_its_queue() -> None:
    hi = make([("n0", 1)], TIMESHARE)
    owned(hi, "o")
    observe(hi, 0.0, 10_000)
    hi.submit(item("g", 500, LOW), 1.0)
    assert hi.cycle(1.0).starts[0].opportunistic
    observe(hi, 0.0, 40_000)  # 40 + 40 GiB > 95 % of 80: the guest is in the way
    result = hi.cycle(2.0)
    [yielded] = result.preemptions
    assert yielded.kind == "yield" and yielded.victim.id == "g" and "memory" in yielded.reason
    assert "g" in hi.stopping and "g" not in hi.guests
    hi.requeue("g", 2.0)
    assert "g" in hi.pending
    assert hi.cycle(3.0).starts == []  # the memory is still short
    observe(hi, 0.0, 10_000)
    assert hi.cycle(4.0).starts[0].item.id == "g"


def test_newest_guest_yields_first() -> None:
    hi = make([("n0", 1)], HiConfig(timeshare=True, timeshare_max_guests=2))
    owned(hi, "o")
    observe(hi, 0.0, 1_000)
    hi.submit(item("old", 200, LOW), 1.0)
    hi.cycle(1.0)
    hi.submit(item("new", 200, LOW), 2.0)
    assert hi.cycle(2.0).starts == []  # guests are decided when the devices have been looked at
    observe(hi, 0.0, 1_000)
    assert hi.cycle(2.5).starts[0].item.id == "new"
    observe(hi, 0.0, 60_000)  # room for one 16 GiB guest: 60 + 16 < 77.8 GiB
    assert [p.victim.id for p in hi.cycle(3.0).preemptions] == ["new"]


def test_observations_are_checked() -> None:
    hi = make([("n0", 1)], TIMESHARE)
    with pytest.raises(HiError, match="shape"):
        hi.observe_devices(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(HiError, match="finite"):
        hi.observe_devices(np.full((1, 1), np.nan), np.zeros((1, 1)))
    for bad in ({"timeshare_busy_pct": 120.0}, {"timeshare_max_guests": 0}, {"defrag_max_moves": -1}):
        with pytest.raises(HiError, match="is not allowed"):
            HiConfig(**bad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    owners=st.lists(st.sampled_from([200, 500, 1000]), min_size=1, max_size=6),
    guests=st.lists(st.tuples(st.sampled_from([100, 300, 500, 1000]), st.integers(1, 2)), min_size=1, max_size=8),
    looks=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 80_000)), min_size=1, max_size=5),
)
def test_guests_stay_within_memory_count_and_owned_devices(owners, guests, looks) -> None:  # noqa: ANN001
    hi = make([("n0", 2), ("n1", 2)], HiConfig(timeshare=True, timeshare_max_guests=2))
    for i, share in enumerate(owners):
        hi.submit(item(f"o{i}", share, NORMAL), 0.0)
    hi.cycle(0.0)
    for j, (share, count) in enumerate(guests):
        hi.submit(item(f"g{j}", 1000 if count > 1 else share, LOW, t=1.0, count=count), 1.0)
    rng = np.random.default_rng(len(owners) * 31 + len(guests))
    for k, (busy, memory) in enumerate(looks):
        shape = hi.state.free_share_milli.shape
        observe(hi, rng.uniform(0, busy, shape), rng.integers(0, memory + 1, shape))
        result = hi.cycle(2.0 + k)
        for p in result.preemptions:
            hi.requeue(p.victim.id, 2.0 + k)
        sharing = hi.timesharing
        room = sharing.room_mib()
        assert (room >= 0).all() or not hi.guests or (room[sharing.guest_count > 0] >= 0).all()
        assert (sharing.guest_count <= 2).all()
        for guest in hi.guests.values():
            n, devices = guest.placement.node_index, list(guest.placement.device_indices)
            assert hi.guests[guest.item_id].request.device_count == len(devices)
            # A guest only ever sits on share granted to others.
            assert (
                ((hi.state.free_share_milli < hi.state.capacity_share_milli)[n, devices]).all()
                or (hi.state.free_share_milli[n, devices] == 1000).all()
            )
        assert not (set(hi.guests) & (set(hi.pending) | set(hi.running)))


# ----------------------------------------------------------------------------------------- defragmentation
DEFRAG = HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0)


def fragmented(config: HiConfig, cls: PriorityClass = NORMAL) -> HiScheduler:
    """Two 1-GPU nodes half used by movable work: 1.0 GPU free in total, but no node with a whole one."""
    hi = make([("n0", 1), ("n1", 1)], config)
    for node, name in enumerate("ab"):
        work = item(name, 500, cls)
        hi.adopt(work, Placement.for_request(work.request, node, (0,)), 0.0)
    return hi


def test_the_blocked_head_gets_a_hole_by_moves_and_waits_for_them() -> None:
    hi = fragmented(HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0, preemption="none"))
    hi.submit(item("big", 1000, NORMAL, t=1.0), 1.0)
    result = hi.cycle(1.0)
    assert len(result.moves) == 1
    [move] = result.moves
    [start] = result.starts
    assert start.item.id == "big" and start.after == (move.item.id,)
    assert move.source.node_index == start.placement.node_index != move.target.node_index
    assert hi.running[move.item.id].placement == move.target
    assert (hi.state.free_share_milli >= 0).all() and hi.state.grants["big"] == start.placement
    assert not hi.head_blocked_by_fragmentation()


@pytest.mark.parametrize(
    "case,config,blocker_class,moves",
    [
        ("defrag on", HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0, preemption="none"), NORMAL, 1),
        ("defrag off", HiConfig(normal_min_runtime_s=0.0, preemption="none"), NORMAL, 0),
        ("high is never moved", HiConfig(defrag_max_moves=4, preemption="none"), HIGH, 0),
        ("protected normal is not moved", HiConfig(defrag_max_moves=4, preemption="none"), NORMAL, 0),
    ],
)
def test_what_may_move(case: str, config: HiConfig, blocker_class: PriorityClass, moves: int) -> None:
    hi = fragmented(config, blocker_class)
    hi.submit(item("big", 1000, LOW, t=1.0), 1.0)
    hi.cycle(1.0)
    assert hi.head_blocked_by_fragmentation() is (moves == 0), case
    result = hi.cycle(1.0)
    assert len(result.moves) == moves or (moves == 1 and "big" in hi.running), case


def test_a_moved_item_is_not_moved_again_within_the_backoff() -> None:
    hi = fragmented(HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0, preemption="none"))
    hi.submit(item("big", 1000, NORMAL, t=1.0), 1.0)
    [move] = hi.cycle(1.0).moves
    running = hi.running[move.item.id]
    assert running.protected_until_s >= 1.0 + hi.config.preempt_backoff_s
    assert move.item.id not in hi._movable(2.0)[0]


def test_work_marked_unmovable_is_never_moved() -> None:
    """A remote lease (its client holds a session) is marked unmovable: the head waits instead."""
    hi = make([("n0", 1), ("n1", 1)], HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0, preemption="none"))
    for node, name in enumerate("ab"):
        work = replace(item(name, 500, NORMAL), movable=False)
        hi.adopt(work, Placement.for_request(work.request, node, (0,)), 0.0)
    hi.submit(item("big", 1000, NORMAL, t=1.0), 1.0)
    result = hi.cycle(1.0)
    assert result.moves == [] and "big" in hi.pending and hi.head_blocked_by_fragmentation()
    [move] = fragmented_move_reason()
    assert move.why.startswith("to open a hole for big") and move.reason.endswith(f"({move.why})")


def fragmented_move_reason() -> list:
    hi = fragmented(HiConfig(defrag_max_moves=4, normal_min_runtime_s=0.0, preemption="none"))
    hi.submit(item("big", 1000, NORMAL, t=1.0), 1.0)
    return hi.cycle(1.0).moves
