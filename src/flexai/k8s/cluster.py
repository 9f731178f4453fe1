"""The scheduler's view of the cluster, kept from Node and Pod objects (as list+watch delivers them).

**Nodes.** Each Node with a readable ``flexai.io/inventory`` annotation owns one *row* of the engine's
``ClusterState`` (its CPU and memory from ``status.allocatable``, its healthy devices of the inventory's most
common model). Rows are stable: a node whose inventory or allocatable changes is rewritten in its own row
(its pods' holds are taken off and put back, nothing else moves), a node that goes away leaves its row vacant
for the next one, and the state is rebuilt only when no vacant row is left (25 % headroom) or a node brings
a device model or more devices than the state has columns for; a rebuild copies the ledger's arrays, it does
not replay the pods. A heartbeat alone changes nothing but the node's liveness: a node whose agent has been
silent for longer than ``inventory_timeout_s`` is not *live* (the extender places nothing there, its pods
keep their slices) and is live again as soon as a fresh heartbeat arrives.

**Pods.** Pods are kept as small ``PodRecord`` objects (``slim_pod``), never as the API server's objects.
A pod holds resources on a node through a ``Hold``:

* ``bound``: read from the pod (``spec.nodeName``, its CPU and memory requests, and the slices of its
  ``flexai.io/placement`` when that names the same node); released when the pod finishes or is deleted;
* ``binding``: written by the extender's bind before it calls the API server; replaced by the ``bound``
  hold when the watch shows the pod bound, dropped when the bind fails;
* ``assumed``: written by the extender's prioritize for the node it ranks first, so that the decisions that
  follow see it before the bind arrives (kube-scheduler's own assume/forget); it expires after its TTL.

Holds name devices by UUID, so a node rewritten in its row (devices reordered, one gone) keeps them right.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from flexai.k8s import names
from flexai.k8s.quantity import QuantityError, count, cpu_milli, memory_mib
from flexai.k8s.workload import PodWork, WorkloadError, pod_work
from flexai.model import FULL_SHARE_MILLI, ClusterState, LedgerError, Node, Placement, Request, RequestError

HEADROOM = 0.25
"""Vacant rows kept for nodes that join later, as a fraction of the nodes at the last (re)build (16 at least)."""


class PodRequestError(ValueError):
    """A pod whose flexai request cannot be read; the message names the field and the value."""


def pod_key(pod: dict) -> str:
    meta = pod.get("metadata", {})
    return meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"


# --------------------------------------------------------------------------------------------- pod demand


@dataclass(frozen=True, slots=True)
class ContainerDemand:
    name: str
    count: int
    init: bool = False
    """A (non-sidecar) init container: its devices are handed on to the containers after it."""


@dataclass(frozen=True, slots=True)
class PodDemand:
    """What a pod needs from flexai: ``count`` devices with ``share_milli`` and memory each.

    ``count`` follows Kubernetes' rule for a pod's effective request: the larger of the largest init container
    and the sum of the app containers (sidecars, i.e. init containers with ``restartPolicy: Always``, count with
    the app containers and with the init containers after them). Memory is ``memory_mib`` per device, or, when
    ``memory_pct`` is set, that percent of the device's memory (resolved on each node)."""

    count: int
    share_milli: int
    memory_mib: int
    memory_pct: int
    models: tuple[str, ...]
    """Allowed device models as written (``*`` and ``?`` match like shell patterns); empty: any."""
    cpu_milli: int
    host_memory_mib: int
    containers: tuple[ContainerDemand, ...]
    remote: bool = False
    """A remote slice (``flexai.io/vxpu-remote``): one device's share served over the network; the pod's own CPU
    and memory are on its node, not with the slice (``cpu_milli`` and ``host_memory_mib`` are 0)."""

    def engine_request(self, name: str = "") -> Request:
        """The closest request the engine accepts, for scoring: the engine takes part of a device only on
        one device, so a partial share on several devices is scored as one slice of it."""
        partial_multi = self.count > 1 and self.share_milli < FULL_SHARE_MILLI
        return Request(
            device_count=1 if partial_multi else self.count,
            share_milli=self.share_milli,
            device_memory_mib=self.memory_mib,
            cpu_milli=self.cpu_milli,
            host_memory_mib=self.host_memory_mib,
            name=name,
        )

    @property
    def engine_exact(self) -> bool:
        """True when ``engine_request`` is exactly this demand (the engine may choose the devices)."""
        return not self.memory_pct and (self.count == 1 or self.share_milli == FULL_SHARE_MILLI)


def _requests_of(container: dict) -> tuple[dict, dict]:
    res = container.get("resources") or {}
    return dict(res.get("requests") or {}), dict(res.get("limits") or {})


def _host_request(container: dict) -> tuple[int, int]:
    requests, limits = _requests_of(container)
    cpu = requests.get("cpu", limits.get("cpu", 0))  # the API server defaults requests to limits
    mem = requests.get("memory", limits.get("memory", 0))
    return cpu_milli(cpu, "resources.requests.cpu"), memory_mib(mem, "resources.requests.memory")


def _effective(app: Iterable[int], init: Sequence[tuple[int, bool]]) -> int:
    """Kubernetes' effective pod request: max(sum(app) + sum(sidecars), max over init i of init_i + sidecars
    started before i). ``init``: (request, is_sidecar) in spec order."""
    sidecars = 0
    largest_init = 0
    for value, sidecar in init:
        if sidecar:
            sidecars += value
        else:
            largest_init = max(largest_init, value + sidecars)
    return max(sum(app) + sidecars, largest_init)


def _is_sidecar(container: dict) -> bool:
    return container.get("restartPolicy") == "Always"


def pod_host_usage(pod: dict) -> tuple[int, int]:
    """CPU milli and memory MiB the pod holds on its node (effective requests plus ``spec.overhead``)."""
    spec = pod.get("spec") or {}
    apps = [_host_request(c) for c in spec.get("containers") or []]
    inits = [(_host_request(c), _is_sidecar(c)) for c in spec.get("initContainers") or []]
    overhead = spec.get("overhead") or {}
    cpu = _effective((a[0] for a in apps), [(r[0], s) for r, s in inits]) + cpu_milli(
        overhead.get("cpu", 0), "spec.overhead.cpu"
    )
    mem = _effective((a[1] for a in apps), [(r[1], s) for r, s in inits]) + memory_mib(
        overhead.get("memory", 0), "spec.overhead.memory"
    )
    return cpu, mem


def pod_demand(pod: dict) -> PodDemand | None:
    """What the pod needs from flexai, or None when it asks for no flexai resource."""
    spec = pod.get("spec") or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        percentages = json.loads(annotations.get(names.ANNOTATION_MEMORY_PERCENTAGE) or "{}")
    except ValueError:
        percentages = None
    if not isinstance(percentages, dict):
        raise PodRequestError(
            f"{names.ANNOTATION_MEMORY_PERCENTAGE}={annotations.get(names.ANNOTATION_MEMORY_PERCENTAGE)!r} "
            'is not allowed: a JSON object {"<container>": percent}'
        )
    containers: list[ContainerDemand] = []
    app_counts: list[int] = []
    init_counts: list[tuple[int, bool]] = []
    slice_shape: tuple[int, int, int] | None = None
    remote = False
    try:
        cpu, host_memory = pod_host_usage(pod)
        for list_name in ("initContainers", "containers"):
            for c in spec.get(list_name) or []:
                requests, limits = _requests_of(c)
                res = {**requests, **limits}  # extended resources live in limits; limits win
                n = count(res.get(names.RESOURCE_VXPU, 0), names.RESOURCE_VXPU)
                wants_remote = count(res.get(names.RESOURCE_REMOTE, 0), names.RESOURCE_REMOTE)
                if wants_remote:
                    if wants_remote != 1 or n or list_name != "containers" or remote:
                        raise PodRequestError(
                            f"{names.RESOURCE_REMOTE}={wants_remote} in container {c.get('name', '')!r} is not "
                            f"allowed: 1, in one app container of the pod, without {names.RESOURCE_VXPU}"
                        )
                    remote = True
                    n = 1
                sidecar = list_name == "initContainers" and _is_sidecar(c)
                if list_name == "containers":
                    app_counts.append(n)
                else:
                    init_counts.append((n, sidecar))
                if not n:
                    continue
                name = str(c.get("name", ""))
                containers.append(ContainerDemand(name, n, list_name == "initContainers" and not sidecar))
                share = count(res.get(names.RESOURCE_SHARE, FULL_SHARE_MILLI), names.RESOURCE_SHARE)
                mib = count(res.get(names.RESOURCE_MEMORY, 0), names.RESOURCE_MEMORY)
                pct = percentages.get(name, 0)
                if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
                    raise PodRequestError(
                        f"{names.ANNOTATION_MEMORY_PERCENTAGE}: {name}={pct!r} is not allowed: a whole percent 1..100"
                    )
                shape = (share, 0 if pct else mib, pct)
                if slice_shape is not None and shape != slice_shape:
                    raise PodRequestError(
                        f"containers ask for different {names.RESOURCE_SHARE}/{names.RESOURCE_MEMORY}: "
                        "every device of one pod must have the same slice"
                    )
                slice_shape = shape
    except QuantityError as exc:
        raise PodRequestError(str(exc)) from None
    if not containers or slice_shape is None:
        return None
    share, mib, pct = slice_shape
    if not 1 <= share <= FULL_SHARE_MILLI:
        raise PodRequestError(f"{names.RESOURCE_SHARE}={share} is not allowed: 1..{FULL_SHARE_MILLI} per device")
    total = _effective(app_counts, init_counts)
    if total > 64:
        raise PodRequestError(f"{names.RESOURCE_VXPU}={total} (the pod's effective request) is not allowed: 1..64")
    models = tuple(m for m in str(annotations.get(names.ANNOTATION_MODEL, "")).split("|") if m)
    if remote:
        if len(containers) > 1 or pct:
            raise PodRequestError(
                f"{names.RESOURCE_REMOTE}: a remote pod asks for one slice in one container, with its memory in MiB "
                f"(allowed: no other container with {names.RESOURCE_VXPU}, no memory percentage)"
            )
        return PodDemand(1, share, mib, 0, models, 0, 0, tuple(containers), remote=True)
    return PodDemand(total, share, mib, pct, models, cpu, host_memory, tuple(containers))


def pod_request(pod: dict) -> Request | None:
    """The engine's request for the pod (see ``PodDemand.engine_request``), or None without flexai resources."""
    demand = pod_demand(pod)
    if demand is None:
        return None
    try:
        return demand.engine_request(pod_key(pod))
    except RequestError as exc:
        raise PodRequestError(str(exc)) from None


def layout(demand: PodDemand, uuids: Sequence[str]) -> tuple[tuple[str, ...], tuple[names.ContainerGrant, ...]]:
    """Split the pod's devices over its containers the way the kubelet will hand them out.

    The devices are ordered as the kubelet sorts device IDs (so the devices an init container hands on go to
    the containers after it in the order the kubelet picks them); each container takes the devices handed on
    by the init containers before it first, then devices no other container holds. Returns the ordered UUIDs
    and one ``ContainerGrant`` per flexai container (indices into the UUIDs)."""
    ordered = tuple(sorted(uuids, key=lambda u: u + "::"))
    reusable: list[int] = []
    taken: set[int] = set()
    grants = []
    for c in demand.containers:
        got = sorted(reusable)[: c.count]
        fresh = [i for i in range(len(ordered)) if i not in taken and i not in reusable and i not in got]
        got += fresh[: c.count - len(got)]
        if len(got) < c.count:
            raise ValueError(f"container {c.name!r} needs {c.count} devices, the pod holds {len(ordered)}")
        grants.append(names.ContainerGrant(c.name, tuple(sorted(got)), c.init))
        if c.init:
            reusable = sorted(set(reusable) | set(got))
        else:
            reusable = [i for i in reusable if i not in got]
            taken.update(got)
    return ordered, tuple(grants)


# ------------------------------------------------------------------------------------------------ pods


@dataclass(slots=True)
class PodRecord:
    """What the view keeps of a Pod (the API server's object is dropped on arrival)."""

    key: str
    namespace: str
    name: str
    uid: str
    node: str
    phase: str
    scheduler: str
    cpu_milli: int
    host_memory_mib: int
    demand: PodDemand | None
    error: str
    """Why the pod's flexai request cannot be read ("" when it can)."""
    placement: names.Placement | None
    """The pod's placement, only when it is bound to the node the placement names."""
    work: PodWork | None = None
    """Class, queue and gang for the Hi Scheduler (None when they cannot be read: see ``error``)."""
    remote: names.RemotePlacement | None = None
    """A remote pod's slice, only when the pod is bound to the node the remote placement names as its client."""

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def slice_node(self) -> str:
        """The node its slices are on: its own node, or its remote slice's."""
        return self.remote.node if self.remote is not None else self.node


def slim_pod(pod: dict) -> PodRecord:
    """The ``PodRecord`` of a Pod object; never raises (a malformed pod holds what can be read of it)."""
    if isinstance(pod, PodRecord):
        return pod
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    node = str(spec.get("nodeName") or "")
    error = ""
    cpu = mem = 0
    try:
        demand = pod_demand(pod)
    except (PodRequestError, TypeError, AttributeError) as exc:
        demand, error = None, str(exc)
    if demand is None:
        try:
            cpu, mem = pod_host_usage(pod)
        except (QuantityError, TypeError, AttributeError) as exc:
            error = error or str(exc)
    if demand is not None:
        cpu, mem = demand.cpu_milli, demand.host_memory_mib
    work = None
    try:
        work = pod_work(pod)
    except (WorkloadError, TypeError, AttributeError) as exc:
        if demand is not None:
            error = error or str(exc)
    placement = None
    raw = (meta.get("annotations") or {}).get(names.ANNOTATION_PLACEMENT)
    if raw and node:
        try:
            placement = names.Placement.from_json(raw)
        except (ValueError, TypeError):
            placement = None
        # Only a bound pod's placement counts: a pending pod (or a user) cannot reserve by annotation.
        if placement is not None and placement.node != node:
            placement = None
    remote = None
    raw_remote = (meta.get("annotations") or {}).get(names.ANNOTATION_REMOTE)
    if raw_remote and node and demand is not None and demand.remote:
        try:
            remote = names.RemotePlacement.from_json(raw_remote)
        except (ValueError, TypeError):
            remote = None
        if remote is not None and remote.client != node:
            remote = None
    return PodRecord(
        key=pod_key(pod),
        namespace=str(meta.get("namespace", "default")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        node=node,
        phase=str((pod.get("status") or {}).get("phase") or ""),
        scheduler=str(spec.get("schedulerName") or ""),
        cpu_milli=cpu,
        host_memory_mib=mem,
        demand=demand,
        error=error,
        placement=placement,
        work=work,
        remote=remote,
    )


@dataclass(slots=True)
class Hold:
    """Resources one pod holds (or is about to hold) on one node; devices by UUID."""

    kind: str
    """``bound``, ``binding`` or ``assumed`` (see the module docstring)."""
    node: str
    uuids: tuple[str, ...]
    share_milli: int
    memory_mib: int
    cpu_milli: int
    host_memory_mib: int
    deadline: float = math.inf
    placement: names.Placement | None = None
    """For ``assumed`` and ``binding``: the placement the bind writes."""
    client: str = ""
    """For a remote slice: the pod's own node ("" = the slice is on the pod's node)."""

    def same_grant(self, other: Hold) -> bool:
        return (self.node, self.uuids, self.share_milli, self.memory_mib, self.cpu_milli, self.host_memory_mib) == (
            other.node,
            other.uuids,
            other.share_milli,
            other.memory_mib,
            other.cpu_milli,
            other.host_memory_mib,
        )


# ------------------------------------------------------------------------------------------------ nodes


@dataclass(frozen=True)
class FlexNode:
    name: str
    inventory: names.Inventory
    model: str
    devices: tuple[names.InventoryDevice, ...]
    engine: Node
    by_uuid: dict[str, int] = field(default_factory=dict)
    """Device UUID -> column in the node's row."""


@dataclass(slots=True)
class NodeEntry:
    name: str
    signature: str
    heartbeat: float
    flex: FlexNode | None
    problem: str
    row: int = -1
    labels: dict[str, str] = field(default_factory=dict)
    """The node's topology labels (``flexai.io/rack``, ``topology.kubernetes.io/zone``): remote slices go near."""


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


def _read_node(name: str, node: dict) -> tuple[FlexNode | None, str]:
    annotations = node.get("metadata", {}).get("annotations") or {}
    raw = annotations.get(names.ANNOTATION_INVENTORY)
    if not raw:
        return None, "no flexai inventory on the node (is the flexai agent running there?)"
    try:
        inventory = names.Inventory.from_json(raw)
    except ValueError as exc:
        return None, f"unreadable {names.ANNOTATION_INVENTORY}: {exc}"
    healthy = [d for d in inventory.devices if d.healthy]
    if not healthy:
        return None, "no healthy device"
    model = Counter(d.model for d in healthy).most_common(1)[0][0]
    devices = tuple(d for d in healthy if d.model == model)
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    try:
        cpu = cpu_milli(allocatable.get("cpu", 0))
        memory = memory_mib(allocatable.get("memory", 0))
        engine = Node(name, cpu, memory, len(devices), model, device_memory_mib=min(d.memory_mib for d in devices))
    except (QuantityError, ValueError) as exc:
        return None, str(exc)
    return FlexNode(name, inventory, model, devices, engine, {d.uuid: i for i, d in enumerate(devices)}), ""


class NeedsRebuild(Exception):
    """A node does not fit the state's shape (a new device model, more devices than columns)."""


VACANT_PREFIX = "(vacant row "


def _vacant(row: int) -> Node:
    return Node(f"{VACANT_PREFIX}{row})", 0, 0)


class ElasticState(ClusterState):
    """A ClusterState whose rows can be rewritten in place (one node changed) or left vacant.

    ``columns`` pads every row to that many device slots, so that a node with more devices than the others had
    fits without a rebuild."""

    def __init__(self, nodes: Sequence[Node], columns: int = 0) -> None:
        super().__init__(nodes)
        pad = columns - self.max_devices_per_node
        if pad > 0:
            self.max_devices_per_node = columns

            def padded(a: np.ndarray) -> np.ndarray:
                return np.pad(a, ((0, 0), (0, pad)))

            self.device_present = padded(self.device_present)
            self.capacity_device_memory_mib = padded(self.capacity_device_memory_mib)
            self.capacity_share_milli = padded(self.capacity_share_milli)
            self.free_share_milli = padded(self.free_share_milli)
            self.free_device_memory_mib = padded(self.free_device_memory_mib)

    def real_rows(self) -> np.ndarray:
        return np.array([not n.name.startswith(VACANT_PREFIX) for n in self.nodes], dtype=bool)

    def set_row(self, row: int, node: Node) -> None:
        """Make ``row`` hold ``node`` with all of it free. The row must hold no grant."""
        if node.device_count > self.max_devices_per_node:
            raise NeedsRebuild(f"node {node.name} has {node.device_count} devices, rows {self.max_devices_per_node}")
        if node.device_count and node.device_model not in self.model_index:
            raise NeedsRebuild(f"node {node.name} brings the new device model {node.device_model}")
        nodes = list(self.nodes)
        nodes[row] = node
        self.nodes = tuple(nodes)
        present = np.arange(self.max_devices_per_node) < node.device_count
        self.device_count[row] = node.device_count
        self.device_present[row] = present
        self.node_model_id[row] = self.model_index[node.device_model] if node.device_count else -1
        self.capacity_cpu_milli[row] = node.cpu_milli
        self.capacity_host_memory_mib[row] = node.host_memory_mib
        self.capacity_device_memory_mib[row] = np.where(present, node.device_memory_mib, 0)
        share = np.where(present, FULL_SHARE_MILLI, 0)
        self.total_share_milli += int(share.sum() - self.capacity_share_milli[row].sum())
        self.capacity_share_milli[row] = share
        self.free_share_milli[row] = share
        self.free_device_memory_mib[row] = self.capacity_device_memory_mib[row]
        self.free_cpu_milli[row] = node.cpu_milli
        self.free_host_memory_mib[row] = node.host_memory_mib
        self.device_memory_known[row] = node.device_memory_mib > 0
        self.node_version[row] += 1

    @classmethod
    def rebuilt(cls, previous: ElasticState, nodes: Sequence[Node], columns: int) -> ElasticState:
        """A new state with ``nodes`` (the previous rows first, unchanged, then new rows) and the previous
        ledger carried over by copying what its rows have in use."""
        state = cls(nodes, max(columns, previous.max_devices_per_node))
        n, g = previous.free_share_milli.shape
        state.free_share_milli[:n, :g] -= previous.capacity_share_milli - previous.free_share_milli
        used_memory = previous.capacity_device_memory_mib - previous.free_device_memory_mib
        state.free_device_memory_mib[:n, :g] -= np.where(previous.device_memory_known[:, None], used_memory, 0)
        state.free_cpu_milli[:n] -= previous.capacity_cpu_milli - previous.free_cpu_milli
        state.free_host_memory_mib[:n] -= previous.capacity_host_memory_mib - previous.free_host_memory_mib
        state.grants = dict(previous.grants)
        state.allocated_share_milli = previous.allocated_share_milli
        return state


# ------------------------------------------------------------------------------------------------ the view


class KubeCluster:
    def __init__(
        self, inventory_timeout_s: float = 120.0, clock: Callable[[], float] = time.time, profile_size: int = 2000
    ) -> None:
        self.inventory_timeout_s = inventory_timeout_s
        self.clock = clock
        self.entries: dict[str, NodeEntry] = {}
        self.pods: dict[str, PodRecord] = {}
        self.holds: dict[str, Hold] = {}
        self.version = 0
        """Bumped when the state object is replaced: a scheduler bound to an older state must be recreated."""
        self.layout_version = 0
        """Bumped when a row is rewritten: policies must re-read per-node tables (their caches stay valid)."""
        self.rebuilds = 0
        self._state: ElasticState | None = None
        self._built = False
        self.flex_nodes: list[FlexNode | None] = []
        """Per row: the node it holds (None: vacant)."""
        self.index_of: dict[str, int] = {}
        """Node name -> row, for every node with a row."""
        self._free_rows: list[int] = []
        self._heartbeat = np.zeros(0)
        self._has_node = np.zeros(0, dtype=bool)
        self._rows_used = 0
        self._applied: dict[str, int] = {}
        """Pod key -> row where its hold is in the ledger."""
        self._by_node: dict[str, set[str]] = {}
        """Node name -> keys of the pods holding something there."""
        self._assumed: dict[str, float] = {}
        self.recent: deque[Request] = deque(maxlen=profile_size)
        """Engine requests of the newest pods, for the policy's workload profile."""
        self.ignored: dict[str, str] = {}
        """Pods whose holds could not be put in the ledger, and why."""
        self.listeners: list[Callable[[str], None]] = []
        """Called with a pod's key whenever the pod changed or went away (the Hi Scheduler bridge)."""

    # ----------------------------------------------------------------- nodes
    def upsert_node(self, node: dict) -> None:
        name = node["metadata"]["name"]
        signature, heartbeat = _node_signature(node)
        entry = self.entries.get(name)
        labels = node["metadata"].get("labels") or {}
        topology = {k: str(labels[k]) for k in names.TOPOLOGY_LABELS if k in labels}
        if entry is not None:
            entry.labels = topology
        if entry is not None and entry.signature == signature:
            # A heartbeat alone changes nothing to schedule on: only the node's liveness.
            entry.heartbeat = heartbeat
            if entry.row >= 0:
                self._heartbeat[entry.row] = heartbeat
            return
        flex, problem = _read_node(name, node)
        if entry is None:
            entry = self.entries[name] = NodeEntry(name, signature, heartbeat, flex, problem, labels=topology)
        else:
            entry.signature, entry.heartbeat, entry.flex, entry.problem = signature, heartbeat, flex, problem
        if self._built:
            self._place(entry)

    def delete_node(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is not None and entry.row >= 0:
            self._vacate(entry)

    def _fresh(self, heartbeat: float) -> bool:
        return self.clock() - heartbeat <= self.inventory_timeout_s

    def node_problem(self, name: str) -> str:
        """Why a node takes no flexai pod now ("" when it does)."""
        entry = self.entries.get(name)
        if entry is None:
            return "not a flexai node (no Node object seen)"
        if entry.flex is None:
            return entry.problem
        if not self._fresh(entry.heartbeat):
            return f"flexai agent heartbeat is {self.clock() - entry.heartbeat:.0f} s old"
        return ""

    def labels_of(self, name: str) -> dict[str, str]:
        entry = self.entries.get(name)
        return entry.labels if entry is not None else {}

    @property
    def problems(self) -> dict[str, str]:
        """Why each known node takes no flexai pod (only the nodes that do not)."""
        out = {}
        for name in self.entries:
            problem = self.node_problem(name)
            if problem:
                out[name] = problem
        return out

    # ----------------------------------------------------------------- rows
    def _place(self, entry: NodeEntry) -> None:
        """Put a (changed) node in its row, or vacate its row when it can no longer take pods."""
        if entry.flex is None:
            if entry.row >= 0:
                self._vacate(entry)
            return
        assert self._state is not None
        row = entry.row
        if row < 0:
            if not self._free_rows:
                self._grow(extra=entry.flex)
                return
            row = self._free_rows.pop()
        self._unapply_node(entry.name)
        try:
            self._state.set_row(row, entry.flex.engine)
        except NeedsRebuild:
            if entry.row < 0:
                self._free_rows.append(row)
            self._grow(extra=entry.flex)
            return
        self._assign(entry, row)
        self.layout_version += 1
        self._apply_node(entry.name)
        self._state.compact_journal()

    def _assign(self, entry: NodeEntry, row: int) -> None:
        if not self._has_node[row]:
            self._rows_used += 1
        entry.row = row
        self.flex_nodes[row] = entry.flex
        self.index_of[entry.name] = row
        self._heartbeat[row] = entry.heartbeat
        self._has_node[row] = True

    def _vacate(self, entry: NodeEntry) -> None:
        assert self._state is not None
        row = entry.row
        self._unapply_node(entry.name)
        self._state.set_row(row, _vacant(row))
        self._state.compact_journal()
        self.flex_nodes[row] = None
        self.index_of.pop(entry.name, None)
        self._has_node[row] = False
        self._rows_used -= 1
        self._free_rows.append(row)
        entry.row = -1
        self.layout_version += 1

    def _build(self) -> None:
        """The first state: every node with an inventory gets a row, plus headroom; every hold is applied."""
        self._built = True
        flex = [e for _, e in sorted(self.entries.items()) if e.flex is not None]
        rows = len(flex) + max(16, int(len(flex) * HEADROOM))
        nodes = [e.flex.engine for e in flex if e.flex] + [_vacant(i) for i in range(len(flex), rows)]
        self._state = ElasticState(nodes)
        self.flex_nodes = [None] * rows
        self.index_of = {}
        self._heartbeat = np.zeros(rows)
        self._has_node = np.zeros(rows, dtype=bool)
        self._rows_used = 0
        self._free_rows = list(range(rows - 1, len(flex) - 1, -1))
        for row, entry in enumerate(flex):
            self._assign(entry, row)
        self.version += 1
        self._applied = {}
        for key in self.holds:
            self._apply(key)
        self._state.compact_journal()

    def _grow(self, extra: FlexNode) -> None:
        """A new state with more rows (and the columns and models ``extra`` needs), the ledger carried over."""
        assert self._state is not None
        entry = self.entries[extra.name]
        if entry.row >= 0:  # a node rewritten in place that no longer fits the shape: vacate it first
            self._vacate(entry)
        old = self._state
        live = self._rows_used + 1
        rows = max(old.node_count, live + max(16, int(live * HEADROOM)))
        nodes = list(old.nodes) + [_vacant(i) for i in range(old.node_count, rows)]
        # The new model is known to the new state through one vacant row that carries it until set_row.
        spare = rows - 1 if rows > old.node_count else None
        if spare is None:
            rows += 1
            nodes.append(_vacant(rows - 1))
            spare = rows - 1
        nodes[spare] = Node(f"(vacant row {spare})", 0, 0, extra.engine.device_count, extra.engine.device_model)
        state = ElasticState.rebuilt(old, nodes, max(old.max_devices_per_node, extra.engine.device_count))
        state.set_row(spare, _vacant(spare))
        self._state = state
        self.flex_nodes += [None] * (rows - len(self.flex_nodes))
        self._heartbeat = np.pad(self._heartbeat, (0, rows - len(self._heartbeat)))
        self._has_node = np.pad(self._has_node, (0, rows - len(self._has_node)))
        self._free_rows = sorted(set(self._free_rows) | set(range(old.node_count, rows)), reverse=True)
        self.version += 1
        self.rebuilds += 1
        self._place(entry)

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> ElasticState | None:
        """The engine's state (None while no node has an inventory). Expires assumptions on the way."""
        if not self._built:
            if not any(e.flex is not None for e in self.entries.values()):
                return None
            self._build()
        now = self.clock()
        if self._assumed:
            for key, deadline in list(self._assumed.items()):
                if deadline < now:
                    self.forget(key)
        if not self._rows_used:
            return None
        return self._state

    @property
    def has_node(self) -> np.ndarray:
        """Per row: a node holds it (live or not)."""
        return self._has_node.copy()

    @property
    def live(self) -> np.ndarray:
        """Per row: a node whose agent's heartbeat is fresh now (a silent agent's node is back with its next
        heartbeat)."""
        return self._has_node & (self.clock() - self._heartbeat <= self.inventory_timeout_s)

    # ----------------------------------------------------------------- pods
    def upsert_pod(self, pod: dict | PodRecord) -> None:
        record = slim_pod(pod)
        old = self.pods.get(record.key)
        if old == record:
            return
        self.pods[record.key] = record
        for listener in self.listeners:
            listener(record.key)
        if old is None and record.demand is not None:
            try:
                self.recent.append(record.demand.engine_request(record.key))
            except RequestError:
                pass
        self._reconcile(record.key)

    def delete_pod(self, pod: dict | str) -> None:
        key = pod if isinstance(pod, str) else pod_key(pod)
        self.pods.pop(key, None)
        self._set_hold(key, None)
        for listener in self.listeners:
            listener(key)

    def replace_pods(self, records: Iterable[dict | PodRecord]) -> None:
        """A fresh list: pods not in it are gone, the others are upserted."""
        fresh = [slim_pod(p) for p in records]
        keep = {r.key for r in fresh}
        for key in [k for k in self.pods if k not in keep]:
            self.delete_pod(key)
        for record in fresh:
            self.upsert_pod(record)

    def replace_nodes(self, nodes: Iterable[dict]) -> None:
        nodes = list(nodes)
        keep = {n["metadata"]["name"] for n in nodes}
        for name in [n for n in self.entries if n not in keep]:
            self.delete_node(name)
        for node in nodes:
            self.upsert_node(node)

    def _reconcile(self, key: str) -> None:
        record = self.pods.get(key)
        current = self.holds.get(key)
        if record is None or record.finished:
            self._set_hold(key, None)
            return
        if not record.node:
            if current is not None and current.kind == "bound":
                self._set_hold(key, None)
            return  # pending: an assumed or binding hold stays until the bind is seen or fails
        uuids: tuple[str, ...] = ()
        share = memory = 0
        if record.remote is not None:
            # A remote slice: held on the slice's node; the pod's own CPU and memory are kube-scheduler's to count.
            remote = record.remote
            uuids = tuple(s.uuid for s in remote.slices)
            share = max((s.share_milli for s in remote.slices), default=0)
            memory = max((s.memory_mib for s in remote.slices), default=0)
            desired = Hold("bound", remote.node, uuids, share, memory, 0, 0, client=record.node)
            if current is not None and current.same_grant(desired):
                current.kind, current.deadline, current.placement = "bound", math.inf, None
                self._assumed.pop(key, None)
                return
            self._set_hold(key, desired)
            return
        if record.placement is not None and record.placement.slices:
            uuids = tuple(s.uuid for s in record.placement.slices)
            share = max(s.share_milli for s in record.placement.slices)
            memory = max(s.memory_mib for s in record.placement.slices)
        desired = Hold("bound", record.node, uuids, share, memory, record.cpu_milli, record.host_memory_mib)
        if current is not None and current.same_grant(desired):
            current.kind, current.deadline, current.placement = "bound", math.inf, None
            self._assumed.pop(key, None)
            return
        self._set_hold(key, desired)

    def _set_hold(self, key: str, hold: Hold | None) -> None:
        old = self.holds.pop(key, None)
        self._assumed.pop(key, None)
        if old is not None:
            self._unapply(key)
            keys = self._by_node.get(old.node)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_node[old.node]
        self.ignored.pop(key, None)
        if hold is None:
            return
        self.holds[key] = hold
        self._by_node.setdefault(hold.node, set()).add(key)
        if hold.kind == "assumed":
            self._assumed[key] = hold.deadline
        self._apply(key)
        if self._state is not None:
            self._state.compact_journal()

    def placement_of(self, hold: Hold, row: int) -> Placement:
        flex = self.flex_nodes[row]
        assert flex is not None
        devices = tuple(flex.by_uuid[u] for u in hold.uuids if u in flex.by_uuid)
        share, memory = (hold.share_milli, hold.memory_mib) if devices else (0, 0)
        return Placement(row, devices, share, memory, hold.cpu_milli, hold.host_memory_mib)

    def _apply(self, key: str) -> None:
        hold = self.holds.get(key)
        if hold is None or self._state is None or key in self._applied:
            return
        row = self.index_of.get(hold.node)
        if row is None:
            return
        placement = self.placement_of(hold, row)
        try:
            self._state.reserve(key, placement)
        except LedgerError as exc:
            if hold.kind != "bound":
                return  # the extender's own holds are all or nothing
            # Over capacity as reported (e.g. a node shrank): keep the devices, drop host resources.
            try:
                self._state.reserve(key, dataclasses.replace(placement, cpu_milli=0, host_memory_mib=0))
            except LedgerError:
                self.ignored[key] = f"not held on {hold.node}: {exc}"
                return
        self._applied[key] = row

    def _unapply(self, key: str) -> None:
        if self._applied.pop(key, None) is not None and self._state is not None:
            self._state.unreserve(key)

    def _unapply_node(self, name: str) -> None:
        for key in self._by_node.get(name, ()):
            self._unapply(key)

    def _apply_node(self, name: str) -> None:
        for key in sorted(self._by_node.get(name, ())):
            self._apply(key)

    # ----------------------------------------------------------------- the extender's holds
    def hold(self, key: str, hold: Hold) -> bool:
        """Put an ``assumed`` or ``binding`` hold in the ledger; False (nothing held) if it does not fit."""
        self._set_hold(key, hold)
        if key in self._applied:
            return True
        self._set_hold(key, None)
        return False

    def forget(self, key: str, kinds: tuple[str, ...] = ("assumed", "binding")) -> None:
        """Drop the extender's hold of one of ``kinds`` (a ``bound`` hold stays: it is the pod's own)."""
        current = self.holds.get(key)
        if current is not None and current.kind in kinds and current.kind != "bound":
            self._set_hold(key, None)
            # A bound record may be waiting behind the extender's hold.
            if key in self.pods:
                self._reconcile(key)

    def promote(self, key: str) -> None:
        """An assumed hold becomes the pod's binding hold (its bind is under way): it no longer expires."""
        hold = self.holds[key]
        hold.kind, hold.deadline = "binding", math.inf
        self._assumed.pop(key, None)

    def applied(self, key: str) -> bool:
        return key in self._applied


def expand_models(patterns: Sequence[str], known: Iterable[str]) -> frozenset[str] | None:
    """The device models ``patterns`` allow among ``known`` (None: any model)."""
    if not patterns:
        return None
    known = list(known)
    return frozenset(m for m in known if any(fnmatch.fnmatchcase(m, p) for p in patterns))
