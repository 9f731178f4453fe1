"""`flexai k8s scheduler`: informers for Nodes and Pods feeding the cluster view, the extender, and leader
election, wired together."""

from __future__ import annotations

import socket
import threading

from flexai.k8s import names
from flexai.k8s.apiclient import Informer, KubeClient, LeaderElector
from flexai.k8s.cluster import KubeCluster, pod_key
from flexai.k8s.extender import Extender


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
    ) -> None:
        self.client = client
        self.cluster = KubeCluster(inventory_timeout_s)
        self.elector = LeaderElector(client, namespace, names.LEASE_NAME, identity or socket.gethostname(), lease_s)
        self.leader_election = leader_election
        self.extender = Extender(
            self.cluster, client, policy, is_leader=self.elector.is_leader if leader_election else (lambda: True)
        )
        lock = self.extender.lock
        cluster = self.cluster

        def replace_nodes(items: list[dict]) -> None:
            with lock:
                for name in list(cluster.nodes):
                    cluster.delete_node(name)
                for node in items:
                    cluster.upsert_node(node)

        def node_event(kind: str, node: dict) -> None:
            with lock:
                if kind == "DELETED":
                    cluster.delete_node(node["metadata"]["name"])
                else:
                    cluster.upsert_node(node)

        def replace_pods(items: list[dict]) -> None:
            with lock:
                for key in list(cluster.pods):
                    cluster.delete_pod(key)
                for pod in items:
                    cluster.upsert_pod(pod)

        def pod_event(kind: str, pod: dict) -> None:
            with lock:
                if kind == "DELETED":
                    cluster.delete_pod(pod_key(pod))
                else:
                    cluster.upsert_pod(pod)

        self.node_informer = Informer(client, "/api/v1/nodes", replace_nodes, node_event)
        self.pod_informer = Informer(client, "/api/v1/pods", replace_pods, pod_event)
        # Until both lists are in, every device would look free: answer "retry" instead of deciding.
        self.extender.ready = lambda: self.node_informer.synced.is_set() and self.pod_informer.synced.is_set()
        self._stop = threading.Event()
        self._elector_thread = threading.Thread(target=self._elect, name="flexai-leader-election", daemon=True)

    def start(self) -> None:
        self.node_informer.start()
        self.pod_informer.start()
        if self.leader_election:
            self._elector_thread.start()

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
