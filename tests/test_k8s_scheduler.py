"""The scheduler extender in kube-scheduler's wire format, and the scheduler against a fake API server that
serves list+watch and injects 409 Conflict, 410 Gone and 500."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator

import pytest

from flexai.k8s import names
from flexai.k8s.apiclient import KubeClient, LeaderElector
from flexai.k8s.cluster import KubeCluster, PodRecord
from flexai.k8s.extender import Extender, create_extender_app
from flexai.k8s.service import SchedulerService
from tests.fake_apiserver import FakeApiServer
from tests.k8s_objects import FakeApi, node, pod
from tests.pool_helpers import wait_for


def placed(the_pod: dict, node_name: str, *slices: tuple[int, int]) -> dict:
    grant = names.Placement(
        node_name, tuple(names.SliceGrant(d, f"GPU-{node_name}-{d}", share, 0) for d, share in slices)
    )
    the_pod["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] = grant.to_json()
    the_pod["spec"]["nodeName"] = node_name
    return the_pod


def cluster_of(*nodes: dict, pods: tuple[dict, ...] = ()) -> KubeCluster:
    cluster = KubeCluster()
    for n in nodes:
        cluster.upsert_node(n)
    for p in pods:
        cluster.upsert_pod(p)
    return cluster


def test_filter_answers_in_kube_scheduler_format_with_reasons() -> None:
    stale = node("n-stale", 8, heartbeat=time.time() - 3600)
    bare = {"metadata": {"name": "n-bare"}, "status": {"allocatable": {"cpu": "8", "memory": "32Gi"}}}
    busy = node("n-busy", 1)
    cluster = cluster_of(
        node("n-a100", 8),
        node("n-t4", 2, model="T4"),
        stale,
        bare,
        busy,
        pods=(placed(pod("holder", 1), "n-busy", (0, 1000)),),
    )
    extender = Extender(cluster)
    args = {"Pod": pod("p", 1, 300, 8192, model="A100"), "NodeNames": ["n-a100", "n-t4", "n-stale", "n-bare", "n-busy"]}
    result = extender.filter(args)
    assert result["NodeNames"] == ["n-a100"] and result["Error"] == ""
    assert result["FailedNodes"]["n-t4"] == "flexai: no allowed device model"
    assert result["FailedNodes"]["n-busy"] == "flexai: not enough free device share or memory"
    assert "heartbeat" in result["FailedAndUnresolvableNodes"]["n-stale"]
    assert "no flexai inventory" in result["FailedAndUnresolvableNodes"]["n-bare"]
    # The same with full Node objects (nodeCacheCapable: false).
    items = [node("n-a100", 8), node("n-t4", 2, model="T4")]
    full = extender.filter({"Pod": pod("p", 1, 300, 8192, model="A100"), "Nodes": {"items": items}})
    assert [n["metadata"]["name"] for n in full["Nodes"]["items"]] == ["n-a100"] and full["NodeNames"] is None


def test_pods_without_flexai_resources_pass_untouched() -> None:
    extender = Extender(cluster_of(node("n1", 2)))
    plain = {"metadata": {"name": "web", "namespace": "default"}, "spec": {"containers": [{"name": "c"}]}}
    assert extender.filter({"Pod": plain, "NodeNames": ["n1", "other"]})["NodeNames"] == ["n1", "other"]


def test_a_pod_that_can_never_fit_is_unresolvable() -> None:
    extender = Extender(cluster_of(node("n1", 2)))
    result = extender.filter({"Pod": pod("huge", 4), "NodeNames": ["n1"]})
    assert (
        result["NodeNames"] == [] and "no flexai node could ever hold it" in result["FailedAndUnresolvableNodes"]["n1"]
    )


def test_prioritize_scores_0_to_10_and_prefers_the_tighter_node() -> None:
    cluster = cluster_of(node("n-empty", 8), node("n-used", 8), pods=(placed(pod("old", 1, 500), "n-used", (0, 500)),))
    scores = Extender(cluster).prioritize({"Pod": pod("p", 1, 500), "NodeNames": ["n-empty", "n-used"]})
    assert {s["Host"] for s in scores} == {"n-empty", "n-used"}
    assert all(0 <= s["Score"] <= 10 for s in scores)
    best = max(scores, key=lambda s: s["Score"])
    assert best["Host"] == "n-used"  # the half-used GPU takes the other half


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    yield server
    server.stop()


def schedule_like_kube_scheduler(service: SchedulerService, the_pod: dict, node_names: list[str]) -> dict:
    """What kube-scheduler does with the extender: filter, prioritize, pick the best, bind."""
    extender = service.extender
    passed = extender.filter({"Pod": the_pod, "NodeNames": node_names})["NodeNames"]
    if not passed:
        return {"Error": "unschedulable"}
    scores = extender.prioritize({"Pod": the_pod, "NodeNames": passed})
    best = max(scores, key=lambda s: (s["Score"], -passed.index(s["Host"])))["Host"]
    meta = the_pod["metadata"]
    return extender.bind(
        {"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"], "Node": best}
    )


def device_usage(server: FakeApiServer) -> dict[str, int]:
    used: dict[str, int] = {}
    for p in server.pods.values():
        raw = p["metadata"].get("annotations", {}).get(names.ANNOTATION_PLACEMENT)
        if raw:
            for s in names.Placement.from_json(raw).slices:
                used[s.uuid] = used.get(s.uuid, 0) + s.share_milli
    return used


def test_scheduler_binds_through_faults_without_losing_or_double_granting(apiserver: FakeApiServer) -> None:
    for n in (node("n1", 2), node("n2", 2)):
        apiserver.add_node(n)
    service = SchedulerService(KubeClient(apiserver.url), leader_election=False, hi=False)  # binds without filter
    service.start()
    try:
        assert service.wait_synced(10)
        pods = [pod(f"p{i}", 1, 500) for i in range(8)]
        for p in pods:
            apiserver.add_pod(p)
        wait_for(lambda: len(service.cluster.pods) == 8)
        apiserver.fail("POST", "/pods/p0/binding", 500)  # transient: retried
        apiserver.fail("POST", "/pods/p1/binding", 409)  # conflict: checked, then retried
        for p in pods[:4]:
            assert schedule_like_kube_scheduler(service, p, ["n1", "n2"]) == {"Error": ""}
        apiserver.expire_history()  # watches now get 410 Gone: the informers list again
        wait_for(lambda: service.pod_informer.relists >= 2 and service.node_informer.relists >= 2, timeout_s=5)
        for p in pods[4:]:
            assert schedule_like_kube_scheduler(service, p, ["n1", "n2"]) == {"Error": ""}
        extra = pod("p-extra", 1, 500)
        apiserver.add_pod(extra)
        wait_for(lambda: "uid-p-extra" in service.cluster.pods)
        assert schedule_like_kube_scheduler(service, extra, ["n1", "n2"])["Error"] == "unschedulable"
        usage = device_usage(apiserver)
        assert len(usage) == 4 and all(v == 1000 for v in usage.values())  # full, never over
        assert all(apiserver.pods[f"default/p{i}"]["spec"]["nodeName"] in ("n1", "n2") for i in range(8))
        # A pod bound behind our back to another node: the conflict is reported and nothing is kept.
        stolen = pod("stolen", 1, 100)
        apiserver.add_pod(stolen)
        wait_for(lambda: "uid-stolen" in service.cluster.pods)
        apiserver.pods["default/stolen"]["spec"]["nodeName"] = "elsewhere"
        result = service.extender.bind(
            {"PodName": "stolen", "PodNamespace": "default", "PodUID": "uid-stolen", "Node": "n1"}
        )
        assert "bound elsewhere" in result["Error"] or "no longer fits" in result["Error"]
    finally:
        service.stop()


def test_leader_election_lets_one_replica_bind(apiserver: FakeApiServer) -> None:
    clock = [1000.0]
    a = LeaderElector(KubeClient(apiserver.url), "flexai-system", "flexai-scheduler", "a", 15, clock=lambda: clock[0])
    b = LeaderElector(KubeClient(apiserver.url), "flexai-system", "flexai-scheduler", "b", 15, clock=lambda: clock[0])
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    clock[0] += 5
    assert a.try_acquire_or_renew()
    clock[0] += 30  # a stopped renewing
    assert not a.is_leader()
    # b times the lease on its own clock from the moment it sees the record (skew-proof, as client-go):
    assert not b.try_acquire_or_renew()
    clock[0] += 16
    assert b.try_acquire_or_renew() and b.is_leader()
    lease = apiserver.leases["flexai-system/flexai-scheduler"]
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    extender = Extender(KubeCluster(), KubeClient(apiserver.url), is_leader=a.is_leader)
    assert "not the leader" in extender.bind({"PodName": "x", "PodNamespace": "default", "Node": "n1"})["Error"]


def test_two_replicas_on_one_host_name_never_both_lead(apiserver: FakeApiServer) -> None:
    """Seen against a real API server: two extender processes on one machine both took the host name as their
    Lease identity, so each renewed "its own" Lease and both bound."""
    a = SchedulerService(KubeClient(apiserver.url), lease_s=15)
    b = SchedulerService(KubeClient(apiserver.url), lease_s=15)
    assert a.elector.identity != b.elector.identity
    assert a.elector.try_acquire_or_renew()
    assert not b.elector.try_acquire_or_renew() and not b.elector.is_leader()


def test_extender_http_endpoints() -> None:
    from fastapi.testclient import TestClient

    client = TestClient(create_extender_app(Extender(cluster_of(node("n1", 2)))))
    body = {"Pod": pod("p", 1, 300), "NodeNames": ["n1"]}
    assert client.post("/filter", json=body).json()["NodeNames"] == ["n1"]
    assert client.post("/prioritize", json=body).json() == [{"Host": "n1", "Score": 10}]
    assert json.loads(client.get("/healthz").text) == {"status": "ok"}
    many = TestClient(create_extender_app(Extender(cluster_of(node("n1", 2), node("n2", 2)))))
    three = {"Pod": pod("q", 1, 300), "NodeNames": ["n2", "n1", 'odd"name']}  # the last one is no flexai node
    assert many.post("/filter", json=three).json()["NodeNames"] == ["n2", "n1"]
    assert many.post("/prioritize", json=three).json() == [
        {"Host": "n2", "Score": 9},
        {"Host": "n1", "Score": 10},  # equal nodes: the first row is held for the pod
        {"Host": 'odd"name', "Score": 0},
    ]


def test_metrics_endpoint_reports_attempts_latency_and_allocation() -> None:
    from fastapi.testclient import TestClient

    cluster = cluster_of(node("n1", 2), pods=(placed(pod("old", 1, 300), "n1", (0, 300)), pod("waiting", 1, 300)))
    client = TestClient(create_extender_app(Extender(cluster)))
    client.post("/filter", json={"Pod": pod("p", 1, 300), "NodeNames": ["n1"]})
    client.post("/filter", json={"Pod": pod("big", 3), "NodeNames": ["n1"]})
    text = client.get("/metrics").text
    assert 'flexai_scheduling_attempts_total{result="scheduled",verb="filter"} 1.0' in text
    assert 'flexai_scheduling_attempts_total{result="unschedulable",verb="filter"} 1.0' in text
    assert "flexai_decision_latency_seconds_bucket" in text
    assert 'flexai_share_allocated_ratio{device="0",node="n1"} 0.3' in text
    assert 'flexai_slices_allocated{device="0",node="n1"} 1.0' in text
    assert "flexai_pending_pods 1.0" in text


def test_kube_schedulers_json_tags_are_read() -> None:
    """kube-scheduler sends its JSON tags (pod, nodes, nodenames, podName...), not Go field names."""
    extender = Extender(cluster_of(node("n1", 2), node("n2", 2, model="T4")))
    the_pod = pod("p", 1, 300, model="A100")
    items = [node("n1", 2), node("n2", 2, model="T4")]
    result = extender.filter({"pod": the_pod, "nodes": {"items": items}})
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["n1"]
    assert extender.filter({"pod": the_pod, "nodenames": ["n1", "n2"]})["NodeNames"] == ["n1"]
    assert extender.prioritize({"pod": the_pod, "nodenames": ["n1"]}) == [{"Host": "n1", "Score": 10}]


def test_a_pending_pod_cannot_reserve_by_annotation_and_bad_annotations_are_ignored() -> None:
    squatter = pod("squatter", 2)
    squatter["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] = names.Placement(
        "n1", (names.SliceGrant(0, "GPU-n1-0", 1000, 0), names.SliceGrant(1, "GPU-n1-1", 1000, 0))
    ).to_json()  # written by a user, never bound
    broken = pod("broken", 1, node_name="n1")
    broken["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] = '{"node": "n1", "slices": [{"share_milli": "x"}]}'
    odd_node = node("n-odd", 2)
    odd_node["metadata"]["annotations"][names.ANNOTATION_INVENTORY] = "[]"
    cluster = cluster_of(node("n1", 2), odd_node, pods=(squatter, broken))
    result = Extender(cluster).filter({"Pod": pod("p", 2), "NodeNames": ["n1", "n-odd"]})
    assert result["NodeNames"] == ["n1"]
    assert "unreadable" in result["FailedAndUnresolvableNodes"]["n-odd"]


def test_a_bind_in_flight_keeps_its_slices_through_a_node_change() -> None:
    """A node event while a bind waits on the API server must not free the slices being bound."""
    cluster = cluster_of(node("n1", 1))
    first, second = pod("first", 1, 600), pod("second", 1, 600)
    stored = {"first": first, "second": second}
    cluster.upsert_pod(first)
    cluster.upsert_pod(second)

    class SlowApi:
        def get_pod(self, namespace: str, name: str) -> dict:
            return stored[name]

        def bind_pod(self, namespace: str, name: str, uid: str, node_name: str, annotations: dict | None) -> None:
            # Meanwhile the agent's inventory changes and the other pod asks to be placed.
            cluster.upsert_node(node("n1", 1, memory_mib=40960))
            verdict["second"] = extender.filter({"Pod": second, "NodeNames": ["n1"]})["NodeNames"]

        def create_event(self, *args: object, **kwargs: object) -> None:
            return None

    verdict: dict[str, list[str]] = {}
    extender = Extender(cluster, SlowApi())
    assert extender.bind({"podName": "first", "podNamespace": "default", "podUID": "uid-first", "node": "n1"}) == {
        "Error": ""
    }
    assert verdict["second"] == []  # 600m + 600m never on one device
    assert extender.filter({"Pod": second, "NodeNames": ["n1"]})["NodeNames"] == []


def test_heartbeats_alone_change_nothing_to_schedule_on() -> None:
    cluster = cluster_of(node("n1", 2))
    assert cluster.state is not None
    version, layout = cluster.version, cluster.layout_version
    cluster.upsert_node(node("n1", 2))  # same inventory, newer heartbeat
    assert cluster.state is not None and (cluster.version, cluster.layout_version) == (version, layout)
    cluster.upsert_node(node("n1", 2, healthy=False))  # no healthy device left: its row is vacated
    assert cluster.state is None and cluster.version == version and cluster.layout_version == layout + 1


# ------------------------------------------------------------------------------------------- stale agents


def test_a_node_whose_agent_was_silent_comes_back_with_its_next_heartbeat() -> None:
    clock = [10_000.0]
    cluster = KubeCluster(inventory_timeout_s=120, clock=lambda: clock[0])
    cluster.upsert_node(node("n1", 2, heartbeat=clock[0]))
    cluster.upsert_pod(placed(pod("old", 1, 700), "n1", (0, 700)))
    api = FakeApi([])
    extender = Extender(cluster, api)
    args = {"Pod": pod("p", 1, 500), "NodeNames": ["n1"]}
    assert extender.filter(args)["NodeNames"] == ["n1"]

    clock[0] += 121  # the agent says nothing for longer than the timeout
    silent = extender.filter(args)
    assert silent["NodeNames"] == []
    assert silent["FailedAndUnresolvableNodes"]["n1"] == "flexai agent heartbeat is 121 s old"
    assert api.events == []  # a silent agent is no reason to tell the pod it can never fit

    cluster.upsert_node(node("n1", 2, heartbeat=clock[0]))  # the same inventory, a fresh heartbeat
    assert extender.filter(args)["NodeNames"] == ["n1"]
    state = cluster.state
    assert state is not None and int(state.free_share_milli[cluster.index_of["n1"], 0]) == 300  # kept its pod


# ------------------------------------------------------------------------------------ incremental view


def test_a_node_change_rewrites_only_its_row_and_growth_carries_the_ledger() -> None:
    cluster = cluster_of(
        *(node(f"n{i}", 4) for i in range(3)),
        pods=tuple(placed(pod(f"p{i}", 1, 300), f"n{i}", (1, 300)) for i in range(3)),
    )
    state = cluster.state
    assert state is not None
    version, before = cluster.version, state.free_share_milli.copy()
    row = cluster.index_of["n1"]

    # Device 0 of n1 goes unhealthy: n1's row is rewritten (its pod keeps its slice on device 1, now column 0).
    sick = node("n1", 4)
    inventory = names.Inventory.from_json(sick["metadata"]["annotations"][names.ANNOTATION_INVENTORY])
    devices = (dataclasses.replace(inventory.devices[0], healthy=False), *inventory.devices[1:])
    sick["metadata"]["annotations"][names.ANNOTATION_INVENTORY] = dataclasses.replace(
        inventory, devices=devices
    ).to_json()
    cluster.upsert_node(sick)
    assert cluster.state is state and cluster.version == version and cluster.rebuilds == 0
    assert state.free_share_milli[row].tolist() == [700, 1000, 1000, 0]
    others = [r for r in range(state.node_count) if r != row]
    assert (state.free_share_milli[others] == before[others]).all()

    # New nodes take vacant rows; past the headroom the state grows once, the ledger copied, not replayed.
    for i in range(3, 30):
        cluster.upsert_node(node(f"n{i}", 4))
    assert cluster.rebuilds == 1 and cluster.version == version + 1
    grown = cluster.state
    assert grown is not None and grown is not state
    assert grown.allocated_share_milli == 900 and set(grown.grants) == {"uid-p0", "uid-p1", "uid-p2"}
    assert int(grown.free_share_milli[cluster.index_of["n2"], 1]) == 700

    # A node that brings a new device model and more devices: one more rebuild, and it schedules.
    cluster.upsert_node(node("big", 16, model="H100"))
    extender = Extender(cluster)
    assert extender.filter({"Pod": pod("h", 16, model="H100"), "NodeNames": ["big", "n0"]})["NodeNames"] == ["big"]


def test_the_view_keeps_small_records_not_the_api_servers_objects() -> None:
    cluster = cluster_of(node("n1", 2), pods=(placed(pod("a", 1, 300), "n1", (0, 300)),))
    record = cluster.pods["uid-a"]
    assert isinstance(record, PodRecord) and not hasattr(record, "__dict__")
    assert record.node == "n1" and record.placement is not None and record.demand is not None


# ------------------------------------------------------------------------- requests translated by the webhook


@pytest.mark.parametrize(
    ("case", "limits", "annotations", "expect"),
    [
        ("part of two GPUs", {names.RESOURCE_VXPU: "2", names.RESOURCE_SHARE: "500"}, {}, [(500, 0), (500, 0)]),
        (
            "the whole device memory (HAMi's default)",
            {names.RESOURCE_VXPU: "1", names.RESOURCE_SHARE: "300"},
            {names.ANNOTATION_MEMORY_PERCENTAGE: '{"main": 100}'},
            [(300, 81920)],
        ),
        (
            "a vNPU template: a model pattern and a memory percentage",
            {names.RESOURCE_VXPU: "1", names.RESOURCE_SHARE: "200"},
            {names.ANNOTATION_MODEL: "A10*", names.ANNOTATION_MEMORY_PERCENTAGE: '{"main": 13}'},
            [(200, 10649)],
        ),
    ],
)
def test_translated_requests_are_placed(case: str, limits: dict, annotations: dict, expect: list) -> None:
    the_pod = pod("t")
    the_pod["spec"]["containers"][0]["resources"]["limits"] = limits
    the_pod["metadata"]["annotations"] = annotations
    api = FakeApi([the_pod])
    extender = Extender(cluster_of(node("n1", 4, model="T4"), node("n2", 4)), api)
    assert schedule(extender, the_pod, ["n1", "n2"]) == {"Error": ""}
    placement = names.Placement.from_json(api.pods["t"]["metadata"]["annotations"][names.ANNOTATION_PLACEMENT])
    assert [(s.share_milli, s.memory_mib) for s in placement.slices] == expect
    if names.ANNOTATION_MODEL in annotations:
        assert placement.node == "n2"  # A100 matches A10*, T4 does not
    assert len({s.uuid for s in placement.slices}) == len(expect)


# ----------------------------------------------------------------------------- the filter/bind race


def schedule(extender: Extender, the_pod: dict, node_names: list[str]) -> dict:
    passed = extender.filter({"pod": the_pod, "nodenames": node_names})["NodeNames"]
    if not passed:
        return {"Error": "unschedulable"}
    scores = extender.prioritize({"pod": the_pod, "nodenames": passed})
    best = max(scores, key=lambda s: s["Score"])["Host"]
    meta = the_pod["metadata"]
    return extender.bind({"podName": meta["name"], "podNamespace": "default", "podUID": meta["uid"], "node": best})


def race(nodes: int, gpus: int, fill: list[tuple[str, int, int]], pods: list[dict], in_flight: int, assume: bool):
    """kube-scheduler's pipeline, deterministically: filter and prioritize one pod at a time, the best score
    wins (ties at random, as kube-scheduler breaks them), and each bind runs ``in_flight`` decisions later.
    Returns (refused binds, binds)."""
    cluster = KubeCluster()
    names_ = [f"n{i:04d}" for i in range(nodes)]
    for name in names_:
        cluster.upsert_node(node(name, gpus))
    for i, (where, device, share) in enumerate(fill):
        cluster.upsert_pod(placed(pod(f"fill{i}", 1, share), where, (device, share)))
    api = FakeApi(pods, watch=cluster.upsert_pod)
    extender = Extender(cluster, api, assume_ttl_s=30.0 if assume else 0.0)
    for p in pods:
        cluster.upsert_pod(p)
    rng = random.Random(7)
    queue: list[dict] = []
    refused = 0

    def bind_next() -> None:
        nonlocal refused
        refused += extender.bind(queue.pop(0))["Error"] != ""

    for p in pods:
        passed = extender.filter({"pod": p, "nodenames": names_})["NodeNames"]
        if passed:
            scores = extender.prioritize({"pod": p, "nodenames": passed})
            top = max(s["Score"] for s in scores)
            best = rng.choice([s["Host"] for s in scores if s["Score"] == top])
            meta = p["metadata"]
            queue.append({"podName": meta["name"], "podNamespace": "default", "podUID": meta["uid"], "node": best})
        if len(queue) > in_flight:
            bind_next()
    while queue:
        bind_next()
    return refused, len(pods)


@pytest.mark.parametrize("assume", [False, True], ids=["bind-only", "assumed-at-prioritize"])
def test_concurrent_decisions_see_the_node_held_for_the_pod_before(assume: bool) -> None:
    """1,000 nodes, 300 pods; and a nearly full 50-node cluster, 100 pods: 8 binds in flight at any time."""
    shares = [100, 200, 300, 500, 700, 1000]
    spread = [pod(f"a{k}", 1, shares[k % 6]) for k in range(300)]
    refused_a, binds_a = race(1000, 8, [], spread, in_flight=8, assume=assume)
    # 50 nodes x 8 GPUs, all full but one device per node with 600m free: room for 100 pods of 300m.
    full = [(f"n{i:04d}", d, 1000) for i in range(50) for d in range(1, 8)] + [(f"n{i:04d}", 0, 400) for i in range(50)]
    tight = [pod(f"b{k}", 1, 300) for k in range(100)]
    refused_b, binds_b = race(50, 8, full, tight, in_flight=8, assume=assume)
    if assume:
        assert refused_a <= binds_a // 100 and refused_b <= binds_b // 100
    else:  # what kube-scheduler's concurrent binds did to the extender before it held its choice
        assert refused_a > binds_a // 100 and refused_b > binds_b // 10


def test_an_assumption_without_a_bind_expires_and_a_bind_elsewhere_replaces_it() -> None:
    clock = [10_000.0]
    cluster = KubeCluster(clock=lambda: clock[0])
    cluster.upsert_node(node("n1", 1, heartbeat=clock[0]))
    cluster.upsert_node(node("n2", 1, heartbeat=clock[0]))
    first, second = pod("first", 1, 600), pod("second", 1, 600)
    api = FakeApi([first, second], watch=cluster.upsert_pod)
    extender = Extender(cluster, api, assume_ttl_s=30)
    ranked = extender.prioritize({"pod": first, "nodenames": ["n1", "n2"]})
    held = next(s["Host"] for s in ranked if s["Score"] == 10)
    other = "n2" if held == "n1" else "n1"
    assert extender.filter({"pod": second, "nodenames": [held]})["NodeNames"] == []  # held for "first"
    clock[0] += 31  # no bind came: the assumption expires
    cluster.upsert_node(node("n1", 1, heartbeat=clock[0]))
    cluster.upsert_node(node("n2", 1, heartbeat=clock[0]))
    assert extender.filter({"pod": second, "nodenames": [held]})["NodeNames"] == [held]
    # kube-scheduler may bind elsewhere (its own scores count too): the assumption moves with the bind.
    extender.prioritize({"pod": first, "nodenames": ["n1", "n2"]})
    args = {"podName": "first", "podNamespace": "default", "podUID": "uid-first", "node": other}
    assert extender.bind(args) == {"Error": ""}
    assert extender.filter({"pod": second, "nodenames": ["n1", "n2"]})["NodeNames"] == [held]


# --------------------------------------------------------------------------------------- least privilege


def test_the_placement_travels_in_the_binding_and_no_pod_is_patched(apiserver: FakeApiServer) -> None:
    apiserver.add_node(node("n1", 2))
    service = SchedulerService(KubeClient(apiserver.url), leader_election=False)
    service.start()
    try:
        assert service.wait_synced(10)
        apiserver.add_pod(pod("p", 1, 300))
        wait_for(lambda: "uid-p" in service.cluster.pods)
        assert schedule_like_kube_scheduler(service, apiserver.pods["default/p"], ["n1"]) == {"Error": ""}
        (binding,) = apiserver.bindings
        placement = names.Placement.from_json(binding["metadata"]["annotations"][names.ANNOTATION_PLACEMENT])
        stored = apiserver.pods["default/p"]
        assert stored["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] == placement.to_json()
        assert stored["spec"]["nodeName"] == "n1" and apiserver.pod_patches == 0
        wait_for(
            lambda: service.cluster.holds.get("uid-p") is not None and service.cluster.holds["uid-p"].kind == "bound"
        )
    finally:
        service.stop()


def test_extender_args_are_read_whatever_their_layout() -> None:
    """The node-name list is reused between calls; everything else is parsed as JSON would be."""
    from flexai.k8s.extender import ArgsReader

    reader = ArgsReader()
    the_pod = pod("p", 1, 300)
    go = json.dumps({"pod": the_pod, "nodes": None, "nodenames": ["n1", "n2"]}, separators=(",", ":")).encode()
    first, second = reader.read(go), reader.read(go)
    assert first == {"pod": the_pod, "nodes": None, "nodenames": ["n1", "n2"]}
    assert second is not None and second["nodenames"] is first["nodenames"]  # parsed once
    spaced = b'{ "nodenames" : [ "n1" ] , "pod" : {} }'
    assert reader.read(spaced) == {"nodenames": ["n1"], "pod": {}}
    nodes_only = json.dumps({"pod": the_pod, "nodes": {"items": [node("n1", 1)]}}).encode()
    assert reader.read(nodes_only) == json.loads(nodes_only)
    tricky = json.dumps({"nodenames": ["n1"], "pod": {"metadata": {"annotations": {"x": '"nodenames":[]'}}}})
    assert reader.read(tricky.encode()) == json.loads(tricky)
    assert reader.read(b"[1, 2]") is None and reader.read(b"{not json") is None
    mine = ["n2", "n9"]
    reader.remember(b'["n2","n9"]', mine)  # what filter answered comes back to prioritize
    assert reader.read(b'{"pod":{},"nodes":null,"nodenames":["n2","n9"]}')["nodenames"] is mine


# ------------------------------------------------------------------------------ the view's ledger invariant

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPS = st.lists(
    st.tuples(
        st.sampled_from(["node", "sick", "drop-node", "bind", "finish", "drop-pod"]),
        st.integers(0, 5),  # which node
        st.integers(0, 9),  # which pod
        st.sampled_from([50, 100]),  # ten pods never overfill a device: every order holds the same
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_the_view_updated_step_by_step_holds_what_a_fresh_one_holds(ops: list[tuple[str, int, int, int]]) -> None:
    """Whatever the order of node and pod events, the incremental view's ledger is the one a view built from
    the final objects would have (rows may differ: compare per node name)."""
    nodes: dict[str, dict] = {}
    pods: dict[str, dict] = {}
    live = KubeCluster(clock=lambda: 1e9)
    live.upsert_node(node("seed", 1, heartbeat=1e9))
    assert live.state is not None  # built from here on: every later change is incremental
    nodes["seed"] = node("seed", 1, heartbeat=1e9)
    for op, n, p, share in ops:
        name, key = f"n{n}", f"p{p}"
        if op == "node":
            nodes[name] = node(name, 1 + n % 3, heartbeat=1e9)
            live.upsert_node(nodes[name])
        elif op == "sick" and name in nodes:
            nodes[name] = node(name, 1 + n % 3, heartbeat=1e9, healthy=False)
            live.upsert_node(nodes[name])
        elif op == "drop-node" and name in nodes:
            del nodes[name]
            live.delete_node(name)
        elif op == "bind":
            pods[key] = placed(pod(key, 1, share), name, (0, share))
            live.upsert_pod(pods[key])
        elif op == "finish" and key in pods:
            pods[key]["status"] = {"phase": "Succeeded"}
            live.upsert_pod(pods[key])
        elif op == "drop-pod" and key in pods:
            del pods[key]
            live.delete_pod(f"uid-{key}")
    fresh = cluster_of(*nodes.values(), pods=tuple(pods.values()))
    a, b = live.state, fresh.state
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert set(live.index_of) == set(fresh.index_of)
    for name in fresh.index_of:
        i, j = live.index_of[name], fresh.index_of[name]
        width = int(b.device_count[j])
        assert a.free_share_milli[i, :width].tolist() == b.free_share_milli[j, :width].tolist(), name
        assert a.free_cpu_milli[i] == b.free_cpu_milli[j]
    assert set(a.grants) == set(b.grants)
    assert (a.free_share_milli >= 0).all() and (a.free_share_milli <= 1000).all()


def test_the_reason_a_pod_never_fits_counts_real_nodes_not_the_views_vacant_rows() -> None:
    """The extender's view keeps vacant rows as headroom for nodes that join; a user reading "0/19 nodes fit" on a
    3-node cluster (as the real control plane showed) is misled."""
    from flexai.k8s.cluster import ElasticState, _vacant
    from flexai.model import Node, Request
    from flexai.scheduler import PolicyContext, Scheduler, create_policy

    nodes = [Node(f"n{i}", 32_000, 131_072, 8, "A100", 81_920) for i in range(3)] + [_vacant(i) for i in range(3, 19)]
    state = ElasticState(nodes)
    assert state.real_rows().tolist() == [True] * 3 + [False] * 16
    scheduler = Scheduler(state, create_policy("k8s-whole-gpu", PolicyContext()))
    result = scheduler.schedule(Request(1, 500, allowed_models=frozenset({"H100"})), "x")
    assert result.reason == "0/3 nodes fit: 3 no allowed device model"
