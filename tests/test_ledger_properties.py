"""Property tests of the ledger: never over capacity, no slice granted twice, unreserve restores exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexai.model import ClusterState, LedgerError, Node, Placement

NODES = [
    Node("a", 8_000, 16_384, 2, "T4", device_memory_mib=16_384),
    Node("b", 16_000, 32_768, 4, "A100", device_memory_mib=81_920),
    Node("c", 4_000, 8_192, 0),
]

placements = st.builds(
    lambda node, devs, share, mem, cpu, host: Placement(node, tuple(dict.fromkeys(devs)), share, mem, cpu, host),
    node=st.integers(0, 3),
    devs=st.lists(st.integers(-1, 4), min_size=0, max_size=3),
    share=st.integers(0, 1200),
    mem=st.integers(0, 20_000),
    cpu=st.integers(0, 9_000),
    host=st.integers(0, 20_000),
)
ops = st.lists(st.tuples(st.sampled_from(["reserve", "unreserve"]), st.integers(0, 6), placements), max_size=40)


def snapshot(state: ClusterState) -> tuple:
    return (
        state.free_share_milli.copy(),
        state.free_device_memory_mib.copy(),
        state.free_cpu_milli.copy(),
        state.free_host_memory_mib.copy(),
        dict(state.grants),
        state.allocated_share_milli,
    )


def assert_invariants(state: ClusterState) -> None:
    assert (state.free_share_milli >= 0).all() and (state.free_share_milli <= state.capacity_share_milli).all()
    assert (state.free_cpu_milli >= 0).all() and (state.free_host_memory_mib >= 0).all()
    assert (state.free_device_memory_mib >= 0).all()
    # The arrays equal capacity minus the sum of what the ledger grants: nothing counted twice or lost.
    used = np.zeros_like(state.free_share_milli)
    cpu = np.zeros_like(state.free_cpu_milli)
    for p in state.grants.values():
        used[p.node_index, list(p.device_indices)] += p.share_milli
        cpu[p.node_index] += p.cpu_milli
    assert (state.capacity_share_milli - used == state.free_share_milli).all()
    assert (state.capacity_cpu_milli - cpu == state.free_cpu_milli).all()
    assert state.allocated_share_milli == int(used.sum())


@settings(max_examples=150, deadline=None)
@given(ops)
def test_ledger_never_over_capacity_and_consistent(sequence: list) -> None:
    state = ClusterState(NODES)
    for op, rid, placement in sequence:
        before = snapshot(state)
        if op == "reserve":
            try:
                state.reserve(str(rid), placement)
            except LedgerError:
                after = snapshot(state)  # a refused grant changes nothing
                for x, y in zip(before, after, strict=True):
                    assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        else:
            state.unreserve(str(rid))
        assert_invariants(state)


@settings(max_examples=100, deadline=None)
@given(ops)
def test_rollback_restores_exactly(sequence: list) -> None:
    state = ClusterState(NODES)
    state.reserve("base", Placement(1, (0,), 500, 1_000, 1_000, 1_000))
    before = snapshot(state)
    checkpoint = state.checkpoint()
    for op, rid, placement in sequence:
        try:
            if op == "reserve":
                state.reserve(str(rid), placement)
            else:
                state.unreserve(str(rid))
        except LedgerError:
            pass
    state.rollback(checkpoint)
    after = snapshot(state)
    for x, y in zip(before, after, strict=True):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


def test_reserve_is_idempotent_and_unreserve_restores() -> None:
    state = ClusterState(NODES)
    p = Placement(1, (1, 2), 1000, 4_096, 2_000, 1_024)
    fresh = snapshot(state)
    state.reserve("r1", p)
    once = snapshot(state)
    state.reserve("r1", p)
    assert np.array_equal(once[0], state.free_share_milli)
    with pytest.raises(LedgerError, match="already holds"):
        state.reserve("r1", Placement(1, (3,), 1000, 0, 0, 0))
    assert state.unreserve("r1") == p
    assert state.unreserve("r1") is None
    for x, y in zip(fresh, snapshot(state), strict=True):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


def test_no_slice_granted_twice() -> None:
    state = ClusterState(NODES)
    state.reserve("r1", Placement(0, (0,), 600, 0, 0, 0))
    with pytest.raises(LedgerError, match="exceeds the 400 free on device 0"):
        state.reserve("r2", Placement(0, (0,), 600, 0, 0, 0))
    with pytest.raises(LedgerError, match="names a device twice"):
        state.reserve("r3", Placement(0, (1, 1), 100, 0, 0, 0))


def test_transaction_rolls_back_on_error() -> None:
    state = ClusterState(NODES)
    with pytest.raises(LedgerError), state.transaction():
        state.reserve("ok", Placement(1, (0,), 1000, 0, 0, 0))
        state.reserve("too-much", Placement(1, (0,), 1000, 0, 0, 0))
    assert state.grants == {} and state.allocated_share_milli == 0
