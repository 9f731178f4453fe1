"""`flexai k8s agent`: one per node. Publishes the node's device inventory with a heartbeat, serves the
kubelet device plugin, and answers its Allocate calls from the placements the scheduler wrote on pods. With
``remote`` (``flexai.k8s.leases``) it also serves remote XPU leases for the remote slices placed on its node and
publishes their endpoint in the inventory."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from flexai.k8s import names
from flexai.k8s.apiclient import KubeClient
from flexai.k8s.deviceplugin.plugin import DEVICE_PLUGIN_DIR, DevicePluginServer, PendingPlacement
from flexai.k8s.extender import ApiError
from flexai.node.devices import DeviceBackend, DeviceInfo

if TYPE_CHECKING:
    from flexai.k8s.leases import RemoteLeases


class NodeAgent:
    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        backend: DeviceBackend,
        devices: list[DeviceInfo],
        share_step_milli: int = 100,
        heartbeat_s: float = 30.0,
        socket_dir: str = DEVICE_PLUGIN_DIR,
        health_interval_s: float | None = 10.0,
        device_list_strategy: str = "envvar",
        remote: RemoteLeases | None = None,
    ) -> None:
        self.client = client
        self.remote = remote
        self.node_name = node_name
        self.backend = backend
        self.devices = devices
        self.share_step_milli = share_step_milli
        self.heartbeat_s = heartbeat_s
        self.plugin = DevicePluginServer(
            backend,
            devices,
            placement_lookup=self.pending_placements,
            share_step_milli=share_step_milli,
            socket_dir=socket_dir,
            node_name=node_name,
            health_interval_s=health_interval_s,
            device_list_strategy=device_list_strategy,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="flexai-agent-heartbeat", daemon=True)

    def inventory(self) -> names.Inventory:
        try:
            current = {d.uuid: d for d in self.backend.devices()}
        except Exception:  # noqa: BLE001  (a failed read marks every device unhealthy rather than crash)
            current = {}
        return names.Inventory(
            devices=tuple(
                names.InventoryDevice(
                    d.index, d.uuid, d.model, d.memory_mib, bool(current.get(d.uuid, d).healthy) and d.uuid in current
                )
                for d in self.devices
            ),
            share_step_milli=self.share_step_milli,
            heartbeat=time.time(),
            vendor=self.backend.name,
            remote_endpoint=self.remote.endpoint if self.remote is not None else "",
        )

    def publish(self) -> names.Inventory:
        inventory = self.inventory()
        self.client.annotate_node(self.node_name, {names.ANNOTATION_INVENTORY: inventory.to_json()})
        return inventory

    def pending_placements(self) -> list[PendingPlacement]:
        """Pods bound to this node with a flexai placement and not started (phase Pending), oldest bind first."""
        items, _ = self.client.list(f"/api/v1/pods?fieldSelector={quote('spec.nodeName=' + self.node_name)}")
        pending = []
        for pod in items:
            meta = pod.get("metadata", {})
            annotations = meta.get("annotations") or {}
            raw = annotations.get(names.ANNOTATION_PLACEMENT)
            # The kubelet allocates devices while admitting a pod, before it runs: a running pod's placement is
            # never asked for again (and must not be matched by a new pod after an agent restart).
            if not raw or (pod.get("status") or {}).get("phase") not in (None, "", "Pending"):
                continue
            try:  # one pod's bad annotation must not break Allocate for the whole node
                placement = names.Placement.from_json(raw)
                bound_at = float(annotations.get(names.ANNOTATION_BOUND_AT, "0") or 0)
            except (ValueError, TypeError):
                continue
            pending.append(
                (
                    bound_at,
                    PendingPlacement(f"{meta.get('namespace')}/{meta.get('name')}", meta.get("uid", ""), placement),
                )
            )
        pending.sort(key=lambda item: item[0])
        return [p for _, p in pending]

    def start(self) -> None:
        if self.remote is not None:
            self.remote.start()  # first: its port goes into the inventory
        self.publish()
        self.plugin.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.plugin.stop()
        if self.remote is not None:
            self.remote.stop()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.publish()
            except ApiError:
                continue
