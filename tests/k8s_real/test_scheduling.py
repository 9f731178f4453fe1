"""Pods through the real admission chain, the real kube-scheduler with the chart's configuration and the flexai
extender, bound with their placements, and run by kwok."""

from __future__ import annotations

import json

import pytest

from flexai.k8s import names
from tests.k8s_real.controlplane import ControlPlane
from tests.k8s_real.helpers import (
    container,
    create_pod,
    events_of,
    get_pod,
    pod_body,
    vxpu,
    wait_bound,
    wait_running,
    wait_until,
)


def placement_of(pod: dict) -> names.Placement:
    return names.Placement.from_json(pod["metadata"]["annotations"][names.ANNOTATION_PLACEMENT])


def test_a_vxpu_pod_is_mutated_scheduled_through_the_extender_and_bound_with_its_placement(
    cluster: ControlPlane,
) -> None:
    created = create_pod(cluster, pod_body("slice-30", [container("main", vxpu(300, 8192))]))
    assert created["spec"]["schedulerName"] == names.SCHEDULER_NAME, "the real admission chain called the webhook"
    pod = wait_bound(cluster, "slice-30")
    placement = placement_of(pod)
    assert placement.node == pod["spec"]["nodeName"]
    assert [(s.share_milli, s.memory_mib) for s in placement.slices] == [(300, 8192)]
    wait_running(cluster, "slice-30")


def test_a_pod_written_in_hamis_names_is_translated_then_scheduled(cluster: ControlPlane) -> None:
    limits = {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "40", "nvidia.com/gpumem": "10240"}
    created = create_pod(cluster, pod_body("hami-40", [container("main", limits)]))
    assert created["metadata"]["annotations"].get(names.ANNOTATION_TRANSLATED) == "hami"
    assert created["spec"]["containers"][0]["resources"]["limits"] == vxpu(400, 10240)
    placement = placement_of(wait_bound(cluster, "hami-40"))
    assert [(s.share_milli, s.memory_mib) for s in placement.slices] == [(400, 10240)]


@pytest.mark.parametrize(("name", "share_milli"), [("two-whole", 1000), ("two-halves", 500)])
def test_a_pod_with_devices_in_two_containers_is_scheduled(cluster: ControlPlane, name: str, share_milli: int) -> None:
    limits = vxpu(share_milli, 4096)
    body = pod_body(name, [container("trainer", limits), container("evaluator", limits)])
    create_pod(cluster, body)
    placement = placement_of(wait_bound(cluster, name))
    grants = {grant.name: slices for grant, slices in placement.per_container()}
    assert set(grants) == {"trainer", "evaluator"}
    assert all([(s.share_milli, s.memory_mib) for s in slices] == [(share_milli, 4096)] for slices in grants.values())
    assert len({s.uuid for s in placement.slices}) == 2, "two devices, one per container"
    wait_running(cluster, name)


def test_a_pod_that_can_never_fit_gets_an_event_naming_the_reason(cluster: ControlPlane) -> None:
    body = pod_body("h100-only", [container("main", vxpu(500))])
    body["metadata"]["annotations"] = {names.ANNOTATION_MODEL: "H100*"}
    create_pod(cluster, body)

    def failed_scheduling() -> list[str]:
        return [e["message"] for e in events_of(cluster, "h100-only") if e["reason"] == "FailedScheduling"]

    messages = wait_until("a FailedScheduling event", failed_scheduling, 90)
    assert any("device model" in m for m in messages), messages
    assert not get_pod(cluster, "h100-only")["spec"].get("nodeName")


def test_placements_never_over_grant_a_device(cluster: ControlPlane) -> None:
    """Every bound pod's placement, summed per device, stays within the device (read back from the API server)."""
    pods = cluster.request("GET", "/api/v1/pods")["items"]
    used: dict[tuple[str, str], int] = {}
    for pod in pods:
        raw = (pod["metadata"].get("annotations") or {}).get(names.ANNOTATION_PLACEMENT)
        if raw and pod["spec"].get("nodeName"):
            for grant in names.Placement.from_json(raw).slices:
                key = (pod["spec"]["nodeName"], grant.uuid)
                used[key] = used.get(key, 0) + grant.share_milli
    assert used and all(share <= 1000 for share in used.values()), json.dumps({"/".join(k): v for k, v in used.items()})
