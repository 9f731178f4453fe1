"""kube-scheduler samples nodes (percentageOfNodesToScore); the Hi Scheduler places a pod on its whole view. When
the node Hi chose is not in kube-scheduler's sample, the extender writes it into the pod's
``status.nominatedNodeName``, which kube-scheduler tries alone, first, on its next attempt."""

from __future__ import annotations

from flexai.k8s import names
from tests.test_k8s_hi import Harness, workload_pod


def test_a_node_outside_kube_schedulers_sample_is_nominated_then_passes_alone() -> None:
    h = Harness({"node-0": 2, "node-1": 2, "node-2": 2, "node-3": 2})
    try:
        h.server.add_pod(workload_pod("p", 500, "q", "normal"))
        h.settle()
        (pending,) = h.pending()
        extender = h.service.extender

        (chosen,) = extender.filter({"Pod": pending, "NodeNames": h.nodes})["NodeNames"]
        sample = [n for n in h.nodes if n != chosen]

        refused = extender.filter({"Pod": pending, "NodeNames": sample})
        assert refused["NodeNames"] == []
        assert set(refused["FailedNodes"]) == set(sample) and not refused["FailedAndUnresolvableNodes"]
        assert f"placed on {chosen}" in refused["FailedNodes"][sample[0]]
        assert "nominated there" in refused["FailedNodes"][sample[0]]
        assert h.server.status_patches == [("default/p", {"status": {"nominatedNodeName": chosen}})]
        h.settle()
        (pending,) = h.pending()
        assert pending["status"]["nominatedNodeName"] == chosen
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
        h.server.add_pod(workload_pod("p", 500, "q", "normal"))
        h.settle()
        (pending,) = h.pending()
        extender = h.service.extender
        (chosen,) = extender.filter({"Pod": pending, "NodeNames": h.nodes})["NodeNames"]
        other = [n for n in h.nodes if n != chosen]
        h.server.fail("PATCH", "/status", 500)
        refused = extender.filter({"Pod": pending, "NodeNames": other})
        assert refused["NodeNames"] == []
        assert "nominating it failed" in refused["FailedNodes"][other[0]]
        retried = extender.filter({"Pod": pending, "NodeNames": other})
        assert "nominated there, so kube-scheduler tries it first" in retried["FailedNodes"][other[0]]
        assert [patch for _, patch in h.server.status_patches][-1] == {"status": {"nominatedNodeName": chosen}}
    finally:
        h.stop()
