"""The names flexai uses on Kubernetes objects: one place, shared by agent, extender and webhook.

A pod asks for slices with three extended resources in its container limits (or requests):

* ``flexai.io/vxpu``: number of devices (each device is advertised by the agent's device plugin as
  ``1000 / share_step_milli`` virtual slots, so the kubelet's own accounting matches the slices);
* ``flexai.io/vxpu-share``: compute share per device in milli (300 = 30 %; default 1000 = whole device);
* ``flexai.io/vxpu-memory``: device memory per device in MiB (default 0 = no quota).

Only ``flexai.io/vxpu`` is advertised by nodes; share and memory are managed by the extender (and marked
``ignoredByScheduler`` in the KubeSchedulerConfiguration). ``flexai.io/model`` (annotation) limits the
device models, ``|``-separated. The extender records its decision in ``flexai.io/placement`` (JSON, see
``Placement`` below) in the pod's Binding (the API server copies the Binding's annotations onto the pod as it
binds it); the device plugin's Allocate answers from it, container by container.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

PREFIX = "flexai.io"
RESOURCE_VXPU = f"{PREFIX}/vxpu"
RESOURCE_SHARE = f"{PREFIX}/vxpu-share"
RESOURCE_MEMORY = f"{PREFIX}/vxpu-memory"
ANNOTATION_MODEL = f"{PREFIX}/model"
ANNOTATION_PLACEMENT = f"{PREFIX}/placement"
ANNOTATION_BOUND_AT = f"{PREFIX}/bound-at"
"""On a Pod: when the extender bound it (unix time); the device plugin serves placements in this order."""
ANNOTATION_INVENTORY = f"{PREFIX}/inventory"
"""On a Node: the agent's device inventory and heartbeat (JSON, see ``Inventory``)."""
ANNOTATION_TRANSLATED = f"{PREFIX}/translated-from"
"""On a Pod: which user convention the webhook translated (hami, volcano, huawei)."""
ANNOTATION_MEMORY_PERCENTAGE = f"{PREFIX}/vxpu-memory-percentage"
"""On a Pod: memory per device as a percent of the device's memory, per container (JSON ``{"<container>": 25}``);
the webhook writes it when it cannot resolve a percentage to MiB, the extender resolves it per node."""
SCHEDULER_NAME = "flexai-scheduler"
LABEL_QUEUE = f"{PREFIX}/queue"
"""On a Pod (label, or annotation): the Hi Scheduler queue it waits in (default: its namespace)."""
ANNOTATION_PRIORITY_CLASS = f"{PREFIX}/priority-class"
"""On a Pod: ``high``, ``normal`` or ``low``, overriding the class read from the pod's priority value."""
LABEL_GANG = f"{PREFIX}/gang"
"""On a Pod (label, or annotation): the gang it belongs to (pods of one gang start together or not at all)."""
LABEL_GANG_SIZE = f"{PREFIX}/gang-size"
"""On a Pod (label, or annotation): how many pods the gang has."""
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
"""Volcano's PodGroup name on a Pod: read as the gang id (its size still comes from ``flexai.io/gang-size``)."""
DEVICE_PLUGIN_SOCKET = "flexai.sock"
"""File name of the agent's device-plugin socket under /var/lib/kubelet/device-plugins/."""
LEASE_NAME = "flexai-scheduler"

# ------------------------------------------------------------------ remote XPU (docs/kubernetes.md, "Remote XPU")
RESOURCE_REMOTE = f"{PREFIX}/vxpu-remote"
"""In a container's limits: ``1`` = one slice (``flexai.io/vxpu-share``, ``flexai.io/vxpu-memory``) served to the pod
over the network by a lease worker, wherever the slice is; the pod may run on a node without accelerators."""
LABEL_REMOTE = f"{PREFIX}/vxpu-remote"
"""On a Pod (label ``"true"``, written by the webhook): the agents list remote pods by it."""
ANNOTATION_REMOTE = f"{PREFIX}/remote-placement"
"""On a Pod (in the Binding): where its remote slice is (JSON, see ``RemotePlacement``). Kept apart from
``flexai.io/placement``, which the device plugins of the pod's own node read."""
ANNOTATION_REMOTE_ENDPOINT = f"{PREFIX}/remote-endpoint"
"""On a Pod (in the Binding): the lease worker's address, ``tls://HOST:PORT``; the webhook gives the containers
``FLEXAI_REMOTE_ENDPOINT`` from it (downward API)."""
ANNOTATION_LEASE_SECRET = f"{PREFIX}/lease-secret"
"""On a Pod (written by the webhook): the name of the Secret that will hold its lease token (default
``flexai-lease-<pod name>``). The agent serving the slice creates it, owned by the pod."""
LABEL_RACK = f"{PREFIX}/rack"
"""On a Node: its rack (remote slices go to the same node, then the same rack, then the same zone)."""
LABEL_ZONE = "topology.kubernetes.io/zone"
TOPOLOGY_LABELS = (LABEL_RACK, LABEL_ZONE)


@dataclass(frozen=True)
class InventoryDevice:
    index: int
    uuid: str
    model: str
    memory_mib: int
    healthy: bool = True


@dataclass(frozen=True)
class Inventory:
    """What the agent publishes on its Node (annotation ``flexai.io/inventory``)."""

    devices: tuple[InventoryDevice, ...]
    share_step_milli: int = 100
    heartbeat: float = 0.0
    """Unix time of the agent's last update; the extender ignores inventories older than its timeout."""
    vendor: str = ""
    remote_endpoint: str = ""
    """``tls://HOST:PORT`` where the agent's gateway serves remote leases ("" = it serves none)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Inventory:
        """Parse and type-check; raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("devices", []), list):
            raise ValueError("inventory must be an object with a list of devices")
        try:
            devices = tuple(
                InventoryDevice(
                    int(d["index"]), str(d["uuid"]), str(d["model"]), int(d["memory_mib"]), bool(d.get("healthy", True))
                )
                for d in data.get("devices", [])
            )
            return cls(
                devices=devices,
                share_step_milli=int(data.get("share_step_milli", 100)),
                heartbeat=float(data.get("heartbeat", 0.0)),
                vendor=str(data.get("vendor", "")),
                remote_endpoint=str(data.get("remote_endpoint", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"inventory device entry is malformed: {exc!r}") from None


@dataclass(frozen=True)
class SliceGrant:
    device: int
    uuid: str
    share_milli: int
    memory_mib: int


@dataclass(frozen=True)
class ContainerGrant:
    """Which of the pod's slices one container gets (indices into ``Placement.slices``).

    The kubelet calls Allocate once per container, init containers first, each in spec order; the list of
    ``Placement.containers`` is in that order. Init containers reuse the slices of the app containers (the
    kubelet hands their devices on to the app containers), so their indices overlap the app containers'."""

    name: str
    slices: tuple[int, ...]
    init: bool = False


@dataclass(frozen=True)
class Placement:
    """The extender's decision for one pod (annotation ``flexai.io/placement``).

    ``slices`` is what the pod holds on the node (one per device); ``containers`` splits them per container.
    A placement without ``containers`` (written by an older extender) gives every slice to one container."""

    node: str
    slices: tuple[SliceGrant, ...] = field(default_factory=tuple)
    containers: tuple[ContainerGrant, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        data = asdict(self)
        if not self.containers:
            del data["containers"]
        return json.dumps(data, sort_keys=True)

    def per_container(self) -> list[tuple[ContainerGrant, tuple[SliceGrant, ...]]]:
        """Each container's grant with its slices, in the order the kubelet allocates them."""
        containers = self.containers or (ContainerGrant("", tuple(range(len(self.slices)))),)
        return [(c, tuple(self.slices[i] for i in c.slices)) for c in containers]

    @classmethod
    def from_json(cls, text: str) -> Placement:
        """Parse and type-check; raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("slices", []), list):
            raise ValueError("placement must be an object with a node and a list of slices")
        if not isinstance(data.get("containers", []), list):
            raise ValueError("placement.containers must be a list")
        if "node" not in data:
            raise ValueError("placement is malformed: no 'node'")
        try:
            slices = tuple(
                SliceGrant(int(s["device"]), str(s["uuid"]), int(s["share_milli"]), int(s["memory_mib"]))
                for s in data.get("slices", [])
            )
            containers = tuple(
                ContainerGrant(str(c["name"]), tuple(int(i) for i in c["slices"]), bool(c.get("init", False)))
                for c in data.get("containers", [])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"placement is malformed: {exc!r}") from None
        for c in containers:
            if any(not 0 <= i < len(slices) for i in c.slices):
                raise ValueError(f"placement is malformed: container {c.name!r} names a slice that does not exist")
        return cls(node=str(data["node"]), slices=slices, containers=containers)


@dataclass(frozen=True)
class RemotePlacement:
    """Where a remote pod's slice is (annotation ``flexai.io/remote-placement``): ``node`` holds the slice,
    ``client`` is the pod's own node, ``lease`` the lease id its worker serves, ``endpoint`` the worker's gateway."""

    node: str
    client: str
    lease: str
    endpoint: str
    slices: tuple[SliceGrant, ...] = field(default_factory=tuple)

    @property
    def local(self) -> bool:
        return self.node == self.client

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemotePlacement:
        """Parse and type-check; raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("slices", []), list):
            raise ValueError("remote placement must be an object with a node and a list of slices")
        try:
            slices = tuple(
                SliceGrant(int(s["device"]), str(s["uuid"]), int(s["share_milli"]), int(s["memory_mib"]))
                for s in data.get("slices", [])
            )
            return cls(str(data["node"]), str(data["client"]), str(data["lease"]), str(data["endpoint"]), slices)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"remote placement is malformed: {exc!r}") from None


def lease_id_of(pod_uid: str) -> str:
    """The lease id of a remote pod's worker (12 hex characters, from the pod's uid: a retried bind names the same)."""
    import hashlib

    return hashlib.sha256(f"flexai-lease:{pod_uid}".encode()).hexdigest()[:12]


def lease_secret_name(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return str((meta.get("annotations") or {}).get(ANNOTATION_LEASE_SECRET) or f"flexai-lease-{meta.get('name', '')}")
