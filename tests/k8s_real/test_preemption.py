"""Priority preemption through the real Eviction API, and a PodDisruptionBudget (status kept by the real
disruption controller) that holds."""

from __future__ import annotations

import time

from tests.k8s_real.controlplane import ControlPlane
from tests.k8s_real.helpers import (
    DEVICES,
    NODES,
    clear_pods,
    container,
    create_pod,
    events_of,
    get_pod,
    pod_body,
    vxpu,
    wait_bound,
    wait_until,
)

LOW, HIGH = "flexai-test-low", "flexai-test-high"


def priority_classes(cluster: ControlPlane) -> None:
    for name, value in ((LOW, -10), (HIGH, 1_000_000)):
        cluster.request("POST", "/apis/scheduling.k8s.io/v1/priorityclasses", {
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value, "preemptionPolicy": "PreemptLowerPriority"}, ok=(201, 409))  # fmt: skip


def low_pod(name: str) -> dict:
    body = pod_body(name, [container("main", vxpu())], priorityClassName=LOW)
    body["metadata"]["labels"] = {"tier": "low"}
    return body


def fill_every_device_with_low_pods(cluster: ControlPlane, prefix: str) -> list[str]:
    pods = [f"{prefix}-{i}" for i in range(DEVICES)]
    for name in pods:
        create_pod(cluster, low_pod(name))
    for name in pods:
        wait_bound(cluster, name)
    return pods


def alive(cluster: ControlPlane, names: list[str]) -> list[str]:
    present = {p["metadata"]["name"]: p for p in cluster.request("GET", "/api/v1/namespaces/default/pods")["items"]}
    return [n for n in names if n in present and not present[n]["metadata"].get("deletionTimestamp")]


def test_a_high_pod_preempts_a_low_pod_through_the_eviction_api(cluster: ControlPlane) -> None:
    clear_pods(cluster)
    priority_classes(cluster)
    lows = fill_every_device_with_low_pods(cluster, "low")
    create_pod(cluster, pod_body("urgent", [container("main", vxpu())], priorityClassName=HIGH))
    urgent = wait_bound(cluster, "urgent", timeout_s=120)
    survivors = alive(cluster, lows)
    assert len(survivors) == DEVICES - 1, "exactly one victim: one whole device was needed"
    (victim,) = set(lows) - set(survivors)
    evicted = [e for e in events_of(cluster, victim) if e["reason"] == "FlexaiPreempted"]
    assert evicted, "the victim carries the extender's FlexaiPreempted event"
    assert urgent["spec"]["nodeName"] in NODES


def test_a_pod_disruption_budget_holds_against_preemption(cluster: ControlPlane) -> None:
    clear_pods(cluster)
    priority_classes(cluster)
    cluster.request("POST", "/apis/policy/v1/namespaces/default/poddisruptionbudgets", {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "guard-low"},
        "spec": {"minAvailable": DEVICES, "selector": {"matchLabels": {"tier": "low"}}}}, ok=(201,))  # fmt: skip
    try:
        lows = fill_every_device_with_low_pods(cluster, "guarded")

        def budget_observed() -> bool:
            status = cluster.request("GET", "/apis/policy/v1/namespaces/default/poddisruptionbudgets/guard-low")[
                "status"]  # fmt: skip
            return status.get("currentHealthy", 0) >= DEVICES - 1 and status.get("observedGeneration", 0) >= 1

        wait_until("the disruption controller to observe the budget", budget_observed, 60)
        create_pod(cluster, pod_body("blocked", [container("main", vxpu())], priorityClassName=HIGH))
        time.sleep(15)  # several scheduling cycles and eviction attempts
        assert alive(cluster, lows) == lows, "no guarded pod was evicted"
        assert not get_pod(cluster, "blocked")["spec"].get("nodeName")
    finally:
        cluster.request("DELETE", "/apis/policy/v1/namespaces/default/poddisruptionbudgets/guard-low", ok=(200, 404))
        clear_pods(cluster)
