"""The scheduler's view of the cluster, kept from Node and Pod objects (as list+watch delivers them).

Each Node with a fresh ``flexai.io/inventory`` annotation becomes a node of the engine's ClusterState (its
CPU and memory from ``status.allocatable``, its devices of the inventory's most common model). Every bound
pod holds its CPU and memory requests on its node, and a pod with a ``flexai.io/placement`` annotation
also holds its slices. Node changes rebuild the state (rare); pod changes update the ledger in place.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from flexai.k8s import names
from flexai.k8s.quantity import QuantityError, count, cpu_milli, memory_mib
from flexai.model import ClusterState, LedgerError, Node, Placement, Request, RequestError


class PodRequestError(ValueError):
    """A pod whose flexai request cannot be read; the message names the field and the value."""


def pod_key(pod: dict) -> str:
    meta = pod.get("metadata", {})
    return meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"


def _resources(container: dict) -> dict[str, object]:
    res = container.get("resources") or {}
    merged = dict(res.get("requests") or {})
    merged.update(res.get("limits") or {})  # extended resources live in limits; limits win
    return merged


def pod_request(pod: dict) -> Request | None:
    """What the pod needs from flexai, or None when it asks for no flexai resource."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    device_count, share, memory = 0, None, None
    cpu = host_memory = 0
    try:
        for c in containers:
            requests = (c.get("resources") or {}).get("requests") or {}
            cpu += cpu_milli(requests.get("cpu", 0), "resources.requests.cpu")
            host_memory += memory_mib(requests.get("memory", 0), "resources.requests.memory")
            res = _resources(c)
            n = count(res.get(names.RESOURCE_VXPU, 0), names.RESOURCE_VXPU)
            if not n:
                continue
            device_count += n
            c_share = count(res.get(names.RESOURCE_SHARE, 1000), names.RESOURCE_SHARE)
            c_memory = count(res.get(names.RESOURCE_MEMORY, 0), names.RESOURCE_MEMORY)
            if share is not None and (c_share, c_memory) != (share, memory):
                raise PodRequestError(
                    f"containers ask for different {names.RESOURCE_SHARE}/{names.RESOURCE_MEMORY}: "
                    "one pod's devices must have the same slice"
                )
            share, memory = c_share, c_memory
    except QuantityError as exc:
        raise PodRequestError(str(exc)) from None
    if not device_count:
        return None
    models = (pod.get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_MODEL, "")
    try:
        return Request(
            device_count=device_count,
            share_milli=share or 1000,
            device_memory_mib=memory or 0,
            allowed_models=frozenset(m for m in models.split("|") if m),
            cpu_milli=cpu,
            host_memory_mib=host_memory,
            name=pod_key(pod),
        )
    except RequestError as exc:
        raise PodRequestError(str(exc)) from None


def _node_signature(node: dict) -> tuple[str, float]:
    """What scheduling reads of a Node (inventory without its heartbeat, allocatable), and the heartbeat."""
    annotations = node.get("metadata", {}).get("annotations") or {}
    raw = annotations.get(names.ANNOTATION_INVENTORY, "")
    heartbeat = 0.0
    try:
        data = json.loads(raw) if raw else {}
        if isinstance(data, dict):
            heartbeat = float(data.pop("heartbeat", 0.0))
            raw = json.dumps(data, sort_keys=True)
    except (ValueError, TypeError):
        pass
    allocatable = json.dumps((node.get("status") or {}).get("allocatable") or {}, sort_keys=True)
    return f"{raw}|{allocatable}", heartbeat


def pod_usage(pod: dict) -> tuple[int, int]:
    """CPU milli and memory MiB a bound pod holds on its node (its containers' requests)."""
    cpu = mem = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        requests = (c.get("resources") or {}).get("requests") or {}
        try:
            cpu += cpu_milli(requests.get("cpu", 0))
            mem += memory_mib(requests.get("memory", 0))
        except QuantityError:
            continue
    return cpu, mem


@dataclass(frozen=True)
class FlexNode:
    name: str
    inventory: names.Inventory
    model: str
    devices: tuple[names.InventoryDevice, ...]


class KubeCluster:
    def __init__(self, inventory_timeout_s: float = 120.0, clock: Callable[[], float] = time.time) -> None:
        self.inventory_timeout_s = inventory_timeout_s
        self.clock = clock
        self.nodes: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.version = 0
        """Bumped on every rebuild: policies bound to an older state must be recreated."""
        self._dirty = True
        self._state: ClusterState | None = None
        self.flex_nodes: list[FlexNode] = []
        self.index_of: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        """Why a known Node is not schedulable by flexai (no inventory, stale heartbeat...)."""
        self.in_flight: dict[str, tuple[str, Placement]] = {}
        """Binds in progress (pod key -> node, placement): held across rebuilds and stale pod events."""
        self._signature: dict[str, str] = {}
        self._heartbeat: dict[str, float] = {}

    # ----------------------------------------------------------------- updates
    def upsert_node(self, node: dict) -> None:
        name = node["metadata"]["name"]
        signature, heartbeat = _node_signature(node)
        self.nodes[name] = node
        self._heartbeat[name] = heartbeat
        # A heartbeat alone changes nothing to schedule on: no rebuild (staleness is checked on read).
        if self._signature.get(name) != signature:
            self._signature[name] = signature
            self._dirty = True

    def delete_node(self, name: str) -> None:
        self.nodes.pop(name, None)
        self._signature.pop(name, None)
        self._heartbeat.pop(name, None)
        self._dirty = True

    def upsert_pod(self, pod: dict) -> None:
        key = pod_key(pod)
        old = self.pods.get(key)
        self.pods[key] = pod
        if self._dirty or self._state is None or key in self.in_flight:
            return
        if old is not None:
            self._state.unreserve(key)
        self._safe_hold(pod)

    def delete_pod(self, pod: dict | str) -> None:
        key = pod if isinstance(pod, str) else pod_key(pod)
        self.pods.pop(key, None)
        if self._state is not None and not self._dirty:
            self._state.unreserve(key)

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> ClusterState | None:
        now = self.clock()
        if any(now - self._heartbeat.get(n.name, 0.0) > self.inventory_timeout_s for n in self.flex_nodes):
            self._dirty = True  # an agent went quiet
        if self._dirty:
            self._rebuild()
        return self._state

    def _rebuild(self) -> None:
        self.problems = {}
        flex_nodes: list[FlexNode] = []
        engine_nodes: list[Node] = []
        now = self.clock()
        for name, node in sorted(self.nodes.items()):
            annotations = node.get("metadata", {}).get("annotations") or {}
            raw = annotations.get(names.ANNOTATION_INVENTORY)
            if not raw:
                self.problems[name] = "no flexai inventory on the node (is the flexai agent running there?)"
                continue
            try:
                inventory = names.Inventory.from_json(raw)
            except ValueError as exc:
                self.problems[name] = f"unreadable {names.ANNOTATION_INVENTORY}: {exc}"
                continue
            if now - inventory.heartbeat > self.inventory_timeout_s:
                self.problems[name] = f"flexai agent heartbeat is {now - inventory.heartbeat:.0f} s old"
                continue
            healthy = [d for d in inventory.devices if d.healthy]
            if not healthy:
                self.problems[name] = "no healthy device"
                continue
            model = Counter(d.model for d in healthy).most_common(1)[0][0]
            devices = tuple(d for d in healthy if d.model == model)
            allocatable = (node.get("status") or {}).get("allocatable") or {}
            try:
                cpu = cpu_milli(allocatable.get("cpu", 0))
                memory = memory_mib(allocatable.get("memory", 0))
            except QuantityError as exc:
                self.problems[name] = str(exc)
                continue
            try:
                engine_node = Node(
                    name, cpu, memory, len(devices), model, device_memory_mib=min(d.memory_mib for d in devices)
                )
            except ValueError as exc:
                self.problems[name] = str(exc)
                continue
            flex_nodes.append(FlexNode(name, inventory, model, devices))
            engine_nodes.append(engine_node)
        self.flex_nodes = flex_nodes
        self.index_of = {n.name: i for i, n in enumerate(flex_nodes)}
        self._state = ClusterState(engine_nodes) if engine_nodes else None
        self.version += 1
        self._dirty = False
        if self._state is None:
            return
        for key, pod in self.pods.items():
            if key not in self.in_flight:
                self._safe_hold(pod)
        for key, (node_name, placement) in self.in_flight.items():
            index = self.index_of.get(node_name)
            if index is not None:
                try:
                    self._state.reserve(key, dataclasses.replace(placement, node_index=index))
                except LedgerError:
                    pass

    def _safe_hold(self, pod: dict) -> None:
        """One malformed pod must not stop the others from being held (nor fail a scheduling call)."""
        try:
            self._hold(pod)
        except Exception as exc:  # noqa: BLE001
            self.problems[f"pod {pod_key(pod)}"] = f"ignored: {exc}"

    def _hold(self, pod: dict) -> None:
        """Reserve what a bound (or placed) pod holds. Pods that finished hold nothing."""
        assert self._state is not None
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return
        annotations = pod.get("metadata", {}).get("annotations") or {}
        raw = annotations.get(names.ANNOTATION_PLACEMENT)
        node_name = (pod.get("spec") or {}).get("nodeName")
        placement = None
        if raw and node_name:
            try:
                placement = names.Placement.from_json(raw)
            except ValueError:
                placement = None
            # Only a bound pod's placement counts: a pending pod (or a user) cannot reserve by annotation.
            if placement is not None and placement.node != node_name:
                placement = None
        if not node_name or node_name not in self.index_of:
            return
        index = self.index_of[node_name]
        cpu, mem = pod_usage(pod)
        devices: tuple[int, ...] = ()
        share = memory = 0
        if placement is not None and placement.slices:
            by_uuid = {d.uuid: i for i, d in enumerate(self.flex_nodes[index].devices)}
            if not all(s.uuid in by_uuid for s in placement.slices):
                return
            devices = tuple(by_uuid[s.uuid] for s in placement.slices)
            share, memory = placement.slices[0].share_milli, placement.slices[0].memory_mib
        try:
            self._state.reserve(pod_key(pod), Placement(index, devices, share, memory, cpu, mem))
        except LedgerError:
            # Over capacity as reported (e.g. a node shrank): keep the devices, drop host resources.
            try:
                self._state.reserve(pod_key(pod), Placement(index, devices, share, memory, 0, 0))
            except LedgerError:
                pass
