"""The names flexai uses on Kubernetes objects: one place, shared by agent, extender and webhook.

A pod asks for slices with three extended resources in its container limits (or requests):

* ``flexai.io/vxpu``: number of devices (each device is advertised by the agent's device plugin as
  ``1000 / share_step_milli`` virtual slots, so the kubelet's own accounting matches the slices);
* ``flexai.io/vxpu-share``: compute share per device in milli (300 = 30 %; default 1000 = whole device);
* ``flexai.io/vxpu-memory``: device memory per device in MiB (default 0 = no quota).

Only ``flexai.io/vxpu`` is advertised by nodes; share and memory are managed by the extender (and marked
``ignoredByScheduler`` in the KubeSchedulerConfiguration). ``flexai.io/model`` (annotation) limits the
device models, ``|``-separated. The extender records its decision in ``flexai.io/placement`` (JSON, see
``Placement`` below) before binding; the device plugin's Allocate answers from it.
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
SCHEDULER_NAME = "flexai-scheduler"
DEVICE_PLUGIN_SOCKET = "flexai.sock"
"""File name of the agent's device-plugin socket under /var/lib/kubelet/device-plugins/."""
LEASE_NAME = "flexai-scheduler"


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
class Placement:
    """The extender's decision for one pod (annotation ``flexai.io/placement``)."""

    node: str
    slices: tuple[SliceGrant, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        """Parse and type-check; raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("slices", []), list):
            raise ValueError("placement must be an object with a node and a list of slices")
        try:
            return cls(
                node=str(data["node"]),
                slices=tuple(
                    SliceGrant(int(s["device"]), str(s["uuid"]), int(s["share_milli"]), int(s["memory_mib"]))
                    for s in data.get("slices", [])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"placement is malformed: {exc!r}") from None
