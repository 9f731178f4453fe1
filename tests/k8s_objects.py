"""Node and Pod objects as the API server would serve them, for the Kubernetes tests."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from flexai.k8s import names
from flexai.k8s.extender import ApiError


def node(
    name: str,
    gpus: int,
    model: str = "A100",
    memory_mib: int = 81920,
    heartbeat: float | None = None,
    cpu: str = "96",
    memory: str = "768Gi",
    healthy: bool = True,
) -> dict:
    inventory = names.Inventory(
        devices=tuple(names.InventoryDevice(i, f"GPU-{name}-{i}", model, memory_mib, healthy) for i in range(gpus)),
        share_step_milli=100,
        heartbeat=time.time() if heartbeat is None else heartbeat,
        vendor="sim",
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {names.ANNOTATION_INVENTORY: inventory.to_json()}},
        "status": {"allocatable": {"cpu": cpu, "memory": memory, names.RESOURCE_VXPU: str(gpus * 10)}},
    }


def pod(
    name: str,
    count: int = 1,
    share: int = 1000,
    memory_mib: int = 0,
    cpu: str = "2",
    mem: str = "4Gi",
    namespace: str = "default",
    model: str = "",
    node_name: str | None = None,
) -> dict:
    limits = {names.RESOURCE_VXPU: str(count)}
    if share != 1000:
        limits[names.RESOURCE_SHARE] = str(share)
    if memory_mib:
        limits[names.RESOURCE_MEMORY] = str(memory_mib)
    spec: dict = {
        "schedulerName": names.SCHEDULER_NAME,
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "resources": {"requests": {"cpu": cpu, "memory": mem}, "limits": limits},
            }
        ],
    }
    if node_name:
        spec["nodeName"] = node_name
    annotations = {names.ANNOTATION_MODEL: model} if model else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": annotations},
        "spec": spec,
        "status": {"phase": "Pending"},
    }


def apply_json_patch(document: dict, patch: list[dict]) -> dict:
    """RFC 6902 add / replace / remove (all a pod mutation needs), on a copy."""
    import copy

    doc = copy.deepcopy(document)
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, op["value"])
            elif op["op"] == "replace":
                parent[index] = op["value"]
            else:
                parent.pop(index)
        elif op["op"] in ("add", "replace"):
            parent[last] = op["value"]
        else:
            parent.pop(last)
    return doc


def hami_pod(name: str, share_pct: int, memory_mib: int) -> dict:
    """A pod written in HAMi's resource names."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "annotations": {}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {
                        "requests": {"cpu": "2", "memory": "4Gi"},
                        "limits": {
                            "nvidia.com/gpu": "1",
                            "nvidia.com/gpucores": str(share_pct),
                            "nvidia.com/gpumem": str(memory_mib),
                        },
                    },
                }
            ]
        },
        "status": {"phase": "Pending"},
    }


class FakeApi:
    """An in-process API server for the extender: pods/binding applies nodeName and the Binding's annotations,
    and the bound pod is handed to ``watch`` (the informer's event) right away."""

    def __init__(self, pods: list[dict], watch: Callable[[dict], None] | None = None) -> None:
        self.pods = {p["metadata"]["name"]: copy.deepcopy(p) for p in pods}
        self.watch = watch
        self.events: list[tuple[str, str, str]] = []

    def get_pod(self, namespace: str, name: str) -> dict:
        return copy.deepcopy(self.pods[name])

    def bind_pod(self, namespace: str, name: str, uid: str, node_name: str, annotations: dict | None = None) -> None:
        stored = self.pods[name]
        if stored["spec"].get("nodeName"):
            raise ApiError(409, "pod is already assigned")
        stored["spec"]["nodeName"] = node_name
        stored["metadata"]["annotations"] = {**stored["metadata"].get("annotations", {}), **(annotations or {})}
        if self.watch is not None:
            self.watch(copy.deepcopy(stored))

    def create_event(self, pod: dict, reason: str, message: str, kind: str = "Warning") -> None:
        self.events.append((pod["metadata"]["name"], reason, message))
