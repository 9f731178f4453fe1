"""kube-scheduler samples nodes (percentageOfNodesToScore); the Hi Scheduler places a pod on its whole view. When
the node Hi chose is not in kube-scheduler's sample, the extender writes it into the pod's
``status.nominatedNodeName``, which kube-scheduler tries alone, first, on its next attempt."""

from __future__ import annotations

from collections import Counter

from flexai.k8s import names
from flexai.k8s.extender import ASKED_WITHIN_S
from tests.pool_helpers import wait_for
from tests.test_k8s_hi import Harness, workload_pod


def one_pod_and_hi_node(h: Harness) -> tuple[dict, str]:
    """A pending half-device pod ``p`` and the node the Hi Scheduler placed it on (what filter passes from all)."""
    h.server.add_pod(workload_pod("p", 500, "q", "normal"))
    h.settle()
    (pending,) = h.pending()
    (chosen,) = h.service.extender.filter({"Pod": pending, "NodeNames": h.nodes})["NodeNames"]
    return pending, chosen


def test_a_node_outside_kube_schedulers_sample_is_nominated_then_passes_alone() -> None:
    h = Harness({"node-0": 2, "node-1": 2, "node-2": 2, "node-3": 2})
    try:
        pending, chosen = one_pod_and_hi_node(h)
        extender = h.service.extender
        sample = [n for n in h.nodes if n != chosen]

        refused = extender.filter({"Pod": pending, "NodeNames": sample})
        assert refused["NodeNames"] == []
        assert set(refused["FailedNodes"]) == set(sample) and not refused["FailedAndUnresolvableNodes"]
        assert f"placed on {chosen}" in refused["FailedNodes"][sample[0]]
        assert "nominating it there" in refused["FailedNodes"][sample[0]]
        # Written in the background (filter runs on the event loop and does not wait on the API server).
        wait_for(lambda: bool(h.server.status_patches))
        (pending,) = h.pending()
        assert h.server.status_patches == [("default/p", {"status": {"nominatedNodeName": chosen}})]
        assert pending["status"]["nominatedNodeName"] == chosen
        h.settle()
        assert pending["spec"].get("nodeName") is None  # status only: nothing else changed

        # The same sample again: nominated already, so no second write.
        again = extender.filter({"Pod": pending, "NodeNames": sample})
        assert again["NodeNames"] == [] and len(h.server.status_patches) == 1
        assert "nominated there already" in again["FailedNodes"][sample[0]]

        # kube-scheduler's next attempt: the nominated node alone, which passes; then it binds there.
        assert extender.filter({"Pod": pending, "NodeNames": [chosen]})["NodeNames"] == [chosen]
        meta = pending["metadata"]
        answer = extender.bind(
            {"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"], "Node": chosen}
        )
        assert answer == {"Error": ""}
        with h.server.lock:
            stored = h.server.pods["default/p"]
            assert stored["spec"]["nodeName"] == chosen
            assert names.ANNOTATION_PLACEMENT in stored["metadata"]["annotations"]
        h.check_ledger()
    finally:
        h.stop()


def test_a_failed_nomination_still_refuses_with_the_reason_and_is_tried_again() -> None:
    h = Harness({"node-0": 2, "node-1": 2})
    try:
        pending, chosen = one_pod_and_hi_node(h)
        extender = h.service.extender
        other = [n for n in h.nodes if n != chosen]
        h.server.fail("PATCH", "/status", 500)
        refused = extender.filter({"Pod": pending, "NodeNames": other})
        assert refused["NodeNames"] == []
        assert "nominating it there" in refused["FailedNodes"][other[0]]
        wait_for(lambda: all(f["times"] == 0 for f in h.server.faults) and not extender._nominating)  # refused
        assert h.server.status_patches == [] and not h.bridge.published
        # kube-scheduler's next attempt (the pod still without a nomination) has it written again.
        retried = extender.filter({"Pod": pending, "NodeNames": other})
        assert "nominating it there" in retried["FailedNodes"][other[0]]
        wait_for(lambda: h.server.status_patches == [("default/p", {"status": {"nominatedNodeName": chosen}})])
    finally:
        h.stop()


def nominated_in_api(h: Harness) -> dict[str, str]:
    with h.server.lock:
        return {
            p["metadata"]["name"]: (p.get("status") or {}).get("nominatedNodeName", "")
            for p in h.server.pods.values()
            if not p["spec"].get("nodeName")
        }


def test_pods_are_nominated_as_they_arrive_before_kube_scheduler_asks() -> None:
    """The nominator runs a Hi cycle on arrivals: each pending pod that fits carries Hi's node before any filter
    call; one that can never fit carries none. kube-scheduler's first attempt then binds it there."""
    h = Harness({"node-0": 2, "node-1": 2, "node-2": 2}, nominate=True)
    try:
        h.server.add_pod(workload_pod("half-0", 500, "q", "normal"))
        h.settle()
        # kube-scheduler asks this replica (its first pod): from here on it nominates ahead.
        h.service.extender.filter({"Pod": h.pending()[0], "NodeNames": h.nodes})
        for i in range(1, 8):
            h.server.add_pod(workload_pod(f"half-{i}", 500, "q", "normal"))
        h.server.add_pod(workload_pod("too-big", 1000, "q", "normal", count=4))  # 4 devices: no node has them

        def all_fitting_nominated() -> bool:
            found = nominated_in_api(h)
            return all(found.get(f"half-{i}") for i in range(8))

        wait_for(all_fitting_nominated, timeout_s=10)
        nominated = nominated_in_api(h)
        assert nominated["too-big"] == ""
        # Hi packs: 8 halves on 4 devices, so on 2 of the 3 nodes, 2 devices each.
        assert Counter(nominated[f"half-{i}"] for i in range(8)).most_common() in (
            [(a, 4), (b, 4)] for a in h.nodes for b in h.nodes if a != b
        )
        patches = len(h.server.status_patches)

        # What filter says for each pod is the node it was nominated to: kube-scheduler's first attempt there passes.
        for p in h.pending():
            name = p["metadata"]["name"]
            if name == "too-big":
                continue
            node = nominated[name]
            assert h.service.extender.filter({"Pod": p, "NodeNames": [node]})["NodeNames"] == [node]
        h.run()
        with h.server.lock:
            bound = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in h.server.pods.values()}
        assert all(bound[f"half-{i}"] == nominated[f"half-{i}"] for i in range(8)), (bound, nominated)
        assert not bound["too-big"]
        assert len(h.server.status_patches) == patches  # nothing nominated twice
        h.check_ledger()

        # A pod arriving later is nominated as it arrives, where there is room (the third node).
        h.server.add_pod(workload_pod("late", 1000, "q", "normal", count=2))
        wait_for(lambda: bool(nominated_in_api(h).get("late")), timeout_s=10)
        assert nominated_in_api(h)["late"] not in set(nominated.values())
    finally:
        h.stop()


def test_a_replica_kube_scheduler_does_not_ask_nominates_nothing() -> None:
    """Several scheduler pods, the extender a sidecar without a Lease of its own: only the leading kube-scheduler
    asks its sidecar, so a sidecar never asked (or not for ASKED_WITHIN_S) leaves nominations to that one."""
    h = Harness({"node-0": 2}, nominate=True)
    try:
        h.server.add_pod(workload_pod("p", 500, "q", "normal"))
        h.settle()
        assert h.service.extender.nominate_pending() == 0
        assert h.server.status_patches == []
        h.service.extender.filter({"Pod": h.pending()[0], "NodeNames": ["elsewhere"]})  # asked now
        wait_for(lambda: len(h.server.status_patches) == 1)
        h.service.extender.last_asked_s -= ASKED_WITHIN_S + 1  # and no longer
        h.server.add_pod(workload_pod("q", 500, "q", "normal"))
        h.settle()
        assert h.service.extender.nominate_pending() == 0
        assert len(h.server.status_patches) == 1
    finally:
        h.stop()


def test_no_nominations_without_the_nominator() -> None:
    h = Harness({"node-0": 2}, nominate=False)
    try:
        h.server.add_pod(workload_pod("p", 500, "q", "normal"))
        h.settle()
        h.service.extender.filter({"Pod": h.pending()[0], "NodeNames": h.nodes})
        assert h.server.status_patches == []
    finally:
        h.stop()
