"""Beyond kube-scheduler's node sample: with more than 100 nodes kube-scheduler looks at a sample of them
(percentageOfNodesToScore, adaptive in the chart), while the Hi Scheduler places each pod on its whole view. A node
outside the sample is nominated (status.nominatedNodeName) and kube-scheduler's next attempt tries it alone.

The 200 extra nodes have no agent process: their inventories are published as an agent would, and republished
while the test runs (their heartbeat); they are deleted at the end, so the session's other tests see 3 nodes."""

from __future__ import annotations

import re
import threading
from collections import Counter

import httpx

from flexai.k8s import names
from tests.k8s_real.controlplane import ControlPlane, sim_inventory_json
from tests.k8s_real.helpers import (
    NODES,
    clear_pods,
    container,
    create_pod,
    get_pod,
    pod_body,
    vxpu,
    wait_bound,
    wait_until,
)

EXTRA_NODES = [f"sampled-{i:03d}" for i in range(200)]
PODS = 24


def nominations(cluster: ControlPlane) -> float:
    """Nominations written: ahead of kube-scheduler as pods arrive (verb nominate), and by filter for a pod
    kube-scheduler got to first (verb filter)."""
    text = httpx.get(f"http://127.0.0.1:{cluster.extender_ports[0]}/metrics", timeout=10).text
    found = re.findall(r'flexai_scheduling_attempts_total\{result="nominated",verb="(?:filter|nominate)"\} (\S+)', text)
    return sum(float(value) for value in found)


def publish_inventories(cluster: ControlPlane, nodes: list[str]) -> None:
    patch = {"metadata": {"annotations": {names.ANNOTATION_INVENTORY: sim_inventory_json()}}}
    for node in nodes:
        cluster.request("PATCH", f"/api/v1/nodes/{node}", patch)


def schedulable(cluster: ControlPlane, nodes: list[str]) -> bool:
    """kwok made them Ready, and the node lifecycle controller took the not-ready taint off."""
    wanted = set(nodes)
    items = cluster.request("GET", "/api/v1/nodes")["items"]
    ok = {
        n["metadata"]["name"]
        for n in items
        if not (n.get("spec") or {}).get("taints")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in (n.get("status") or {}).get("conditions", []))
    }
    return wanted <= ok


def test_the_hi_schedulers_node_outside_kube_schedulers_sample_is_nominated_and_bound(cluster: ControlPlane) -> None:
    clear_pods(cluster)
    cluster.add_nodes(EXTRA_NODES)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(20):
            publish_inventories(cluster, EXTRA_NODES)

    beating = threading.Thread(target=heartbeat, daemon=True)
    try:
        publish_inventories(cluster, EXTRA_NODES)
        beating.start()
        wait_until("200 more nodes to be Ready and untainted", lambda: schedulable(cluster, EXTRA_NODES), 180, 2)
        before = nominations(cluster)
        pod_names = [f"sampled-{i}" for i in range(PODS)]
        for name in pod_names:
            create_pod(cluster, pod_body(name, [container("main", vxpu(500, 8192))]))
        bound = [wait_bound(cluster, name, timeout_s=180) for name in pod_names]

        # kube-scheduler samples 100 of 203 nodes per attempt, from a rotating start: Hi's packing choice is
        # written into each pod's nominatedNodeName (kube-scheduler tries that node alone first), and bound there.
        assert nominations(cluster) > before
        per_device: Counter[tuple[str, str]] = Counter()
        for pod in bound:
            placement = names.Placement.from_json(pod["metadata"]["annotations"][names.ANNOTATION_PLACEMENT])
            assert placement.node == pod["spec"]["nodeName"]
            for grant in placement.slices:
                per_device[(placement.node, grant.uuid)] += grant.share_milli
        assert max(per_device.values()) <= 1000
        # Hi packed them: 24 half devices fill 12 devices, on 2 nodes, wherever kube-scheduler's sample was.
        assert len({pod["spec"]["nodeName"] for pod in bound}) <= 2, Counter(p["spec"]["nodeName"] for p in bound)
        nominated = [get_pod(cluster, n).get("status", {}).get("nominatedNodeName") for n in pod_names]
        assert all(not n or n in {p["spec"]["nodeName"] for p in bound} for n in nominated), nominated
    finally:
        stop.set()
        clear_pods(cluster)
        for node in EXTRA_NODES:
            cluster.request("DELETE", f"/api/v1/nodes/{node}", ok=(200, 202, 404))
        wait_until(
            "the extra nodes to be gone",
            lambda: {n["metadata"]["name"] for n in cluster.request("GET", "/api/v1/nodes")["items"]} == set(NODES),
            120,
            1,
        )


