"""Node and Pod objects as the API server would serve them, for the Kubernetes tests."""

from __future__ import annotations

import time

from flexai.k8s import names


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
