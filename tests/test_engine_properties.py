"""Property tests of the engine: whatever the policy and the requests, every placement it reserves fits,
nothing is granted twice, and a refusal changes nothing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flexai.model import ClusterState, Node, Request
from flexai.model.workload import Shape, WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy, policy_names

MODELS = ("A100", "T4")

nodes_strategy = st.lists(
    st.builds(
        lambda i, gpus, model, cpu: (gpus, model, cpu),
        st.integers(0, 100),
        st.sampled_from([0, 1, 2, 4, 8]),
        st.sampled_from(MODELS),
        st.sampled_from([8_000, 32_000, 96_000]),
    ),
    min_size=1,
    max_size=12,
)
requests_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda s, c: Request(1, s, cpu_milli=c, host_memory_mib=1024),
            st.integers(1, 1000),
            st.sampled_from([0, 2_000, 12_000]),
        ),
        st.builds(
            lambda k, c: Request(k, 1000, cpu_milli=c), st.sampled_from([1, 2, 4, 8]), st.sampled_from([0, 8_000])
        ),
        st.builds(lambda c: Request(0, 0, cpu_milli=c, host_memory_mib=2048), st.sampled_from([1_000, 16_000])),
        st.builds(
            lambda s, m: Request(1, s, allowed_models=frozenset({m})), st.integers(1, 1000), st.sampled_from(MODELS)
        ),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(nodes_strategy, requests_strategy, st.sampled_from(policy_names()), st.integers(0, 3))
def test_every_policy_keeps_the_ledger_within_capacity(nodes: list, requests: list, policy: str, seed: int) -> None:
    cluster = [
        Node(f"n{i:02d}", cpu, 1 << 20, gpus, model if gpus else "") for i, (gpus, model, cpu) in enumerate(nodes)
    ]
    state = ClusterState(cluster)
    profile = WorkloadProfile.from_shapes([Shape.of(r) for r in requests], coverage=1.0)
    scheduler = Scheduler(state, create_policy(policy, PolicyContext(profile=profile, rng=np.random.default_rng(seed))))
    for i, request in enumerate(requests):
        before = (state.free_share_milli.copy(), state.free_cpu_milli.copy(), len(state.grants))
        result = scheduler.schedule(request, str(i))
        assert result.status is not Status.ERROR, result.reason
        if result.status is Status.UNSCHEDULABLE:
            assert np.array_equal(before[0], state.free_share_milli) and len(state.grants) == before[2]
            assert result.reason.startswith(f"0/{len(cluster)} nodes fit")
            continue
        placement = result.placement
        assert placement is not None and len(set(placement.device_indices)) == len(placement.device_indices)
        effective = request.whole_devices() if scheduler.policy.whole_devices_only else request
        assert len(placement.device_indices) == effective.device_count
        node = cluster[placement.node_index]
        if effective.allowed_models:
            assert node.device_model in effective.allowed_models
    assert (state.free_share_milli >= 0).all() and (state.free_cpu_milli >= 0).all()
    granted = sum(p.share_milli * len(p.device_indices) for p in state.grants.values())
    assert granted == state.allocated_share_milli == int((state.capacity_share_milli - state.free_share_milli).sum())
