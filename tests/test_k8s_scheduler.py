"""The scheduler extender in kube-scheduler's wire format, and the scheduler against a fake API server that
serves list+watch and injects 409 Conflict, 410 Gone and 500."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from flexai.k8s import names
from flexai.k8s.apiclient import KubeClient, LeaderElector
from flexai.k8s.cluster import KubeCluster
from flexai.k8s.extender import Extender, create_extender_app
from flexai.k8s.service import SchedulerService
from tests.fake_apiserver import FakeApiServer
from tests.k8s_objects import node, pod
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
    service = SchedulerService(KubeClient(apiserver.url), leader_election=False)
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


def test_extender_http_endpoints() -> None:
    from fastapi.testclient import TestClient

    client = TestClient(create_extender_app(Extender(cluster_of(node("n1", 2)))))
    body = {"Pod": pod("p", 1, 300), "NodeNames": ["n1"]}
    assert client.post("/filter", json=body).json()["NodeNames"] == ["n1"]
    assert client.post("/prioritize", json=body).json() == [{"Host": "n1", "Score": 10}]
    assert json.loads(client.get("/healthz").text) == {"status": "ok"}


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
