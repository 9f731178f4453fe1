"""`flexai k8s scheduler`: informers for Nodes and Pods feeding the cluster view, the extender, and leader
election, wired together."""

from __future__ import annotations

import logging
import socket
import threading
import uuid

from flexai.hi import HiConfig, QueueSpec
from flexai.k8s import names
from flexai.k8s.apiclient import Informer, KubeClient, LeaderElector
from flexai.k8s.cluster import KubeCluster, PodRecord, slim_pod
from flexai.k8s.extender import DEFAULT_ASSUME_TTL_S, Extender

log = logging.getLogger(__name__)


def unique_identity() -> str:
    """This replica's name in the Lease: the host name and a random suffix, as client-go's leader election, since
    two replicas may share a host name (hostNetwork pods on one node, or processes outside a cluster) and would
    then both hold the Lease."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"


def _slim_node(node: dict) -> dict:
    """Only what the view reads of a Node: its name, topology labels, the inventory annotation and allocatable."""
    meta = node.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    inventory = annotations.get(names.ANNOTATION_INVENTORY)
    labels = meta.get("labels") or {}
    return {
        "metadata": {
            "name": meta.get("name", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
            "labels": {k: labels[k] for k in names.TOPOLOGY_LABELS if k in labels},
            "annotations": {names.ANNOTATION_INVENTORY: inventory} if inventory is not None else {},
        },
        "status": {"allocatable": (node.get("status") or {}).get("allocatable") or {}},
    }


class SchedulerService:
    def __init__(
        self,
        client: KubeClient,
        namespace: str = "flexai-system",
        identity: str | None = None,
        policy: str = "flex",
        inventory_timeout_s: float = 120.0,
        lease_s: int = 15,
        leader_election: bool = True,
        assume_ttl_s: float = DEFAULT_ASSUME_TTL_S,
        hi: bool = True,
        queues: list[QueueSpec] | None = None,
        hi_config: HiConfig | None = None,
        nominate: bool = True,
        nominate_every_s: float = 5.0,
    ) -> None:
        """``nominate`` (with ``hi``): a thread runs a Hi cycle as pods arrive (a burst in one cycle) and writes
        each placement into the pod's ``status.nominatedNodeName`` ahead of kube-scheduler, and again every
        ``nominate_every_s`` for what other changes made placeable."""
        self.client = client
        self.cluster = KubeCluster(inventory_timeout_s)
        self.elector = LeaderElector(client, namespace, names.LEASE_NAME, identity or unique_identity(), lease_s)
        self.leader_election = leader_election
        self.extender = Extender(
            self.cluster,
            client,
            policy,
            is_leader=self.elector.is_leader if leader_election else (lambda: True),
            assume_ttl_s=assume_ttl_s,
            hi=hi,
            hi_config=hi_config,
            queues=queues,
        )
        lock = self.extender.lock
        cluster = self.cluster

        def replace_nodes(items: list[dict]) -> None:
            with lock:
                cluster.replace_nodes(items)

        def node_event(kind: str, node: dict) -> None:
            with lock:
                if kind == "DELETED":
                    cluster.delete_node(node["metadata"]["name"])
                else:
                    cluster.upsert_node(node)

        def replace_pods(items: list[PodRecord]) -> None:
            with lock:
                cluster.replace_pods(items)
            self._arrivals.set()

        def pod_event(kind: str, pod: PodRecord) -> None:
            with lock:
                if kind == "DELETED":
                    cluster.delete_pod(pod.key)
                else:
                    cluster.upsert_pod(pod)
            if kind == "DELETED" or (kind == "ADDED" and not pod.node):
                self._arrivals.set()  # a pod to place, or room freed

        # Pods and Nodes are cut down to what the view reads as they arrive: 150,000 pods fit in the extender's
        # memory limit (docs/kubernetes.md).
        self.node_informer = Informer(client, "/api/v1/nodes", replace_nodes, node_event, transform=_slim_node)
        self.pod_informer = Informer(client, "/api/v1/pods", replace_pods, pod_event, transform=slim_pod)
        # Until both lists are in, every device would look free: answer "retry" instead of deciding.
        self.extender.ready = lambda: self.node_informer.synced.is_set() and self.pod_informer.synced.is_set()
        self._stop = threading.Event()
        self._elector_thread = threading.Thread(target=self._elect, name="flexai-leader-election", daemon=True)
        self.nominate = nominate and hi
        self.nominate_every_s = nominate_every_s
        self._arrivals = threading.Event()
        self._nominator_thread = threading.Thread(target=self._nominate, name="flexai-nominator", daemon=True)

    def start(self) -> None:
        self.node_informer.start()
        self.pod_informer.start()
        if self.leader_election:
            self._elector_thread.start()
        if self.nominate:
            self._nominator_thread.start()

    def _nominate(self) -> None:
        while not self._stop.is_set():
            self._arrivals.wait(self.nominate_every_s)
            if self._stop.wait(0.05):  # the rest of a burst of arrivals goes in the same cycle
                return
            self._arrivals.clear()
            try:
                self.extender.nominate_pending()
            except Exception:  # noqa: BLE001  (the next pass tries again; filter decides meanwhile)
                log.exception("flexai scheduler: nominating pending pods")

    def wait_synced(self, timeout_s: float = 30) -> bool:
        return self.node_informer.synced.wait(timeout_s) and self.pod_informer.synced.wait(timeout_s)

    def _elect(self) -> None:
        while not self._stop.is_set():
            self.elector.try_acquire_or_renew()
            self._stop.wait(max(1.0, self.elector.lease_s / 3))

    def stop(self) -> None:
        self._stop.set()
        self.node_informer.stop()
        self.pod_informer.stop()
        self.extender.close()
