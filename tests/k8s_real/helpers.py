"""Small helpers for the tests against a real control plane: pods in flexai's and HAMi's names, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tests.k8s_real.controlplane import ControlPlane

T = TypeVar("T")

NODES = ("kwok-a", "kwok-b", "kwok-c")
"""The session's three kwok nodes, of 8 sim A100-80GB each, with an agent each."""
DEVICES = 8 * len(NODES)


def wait_until(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0, every_s: float = 0.25) -> T:
    """Calls ``probe`` until it returns something truthy; fails with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def container(name: str, limits: dict[str, str]) -> dict:
    return {"name": name, "image": "registry.k8s.io/pause:3.10", "resources": {"limits": dict(limits)}}


def pod_body(name: str, containers: list[dict], namespace: str = "default", **spec: object) -> dict:
    """A pod as a user writes it: no schedulerName (the webhook routes it), containers with limits only."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 0, **spec},
    }


def vxpu(share_milli: int = 1000, memory_mib: int = 0, devices: int = 1) -> dict[str, str]:
    limits = {"flexai.io/vxpu": str(devices)}
    if share_milli != 1000:
        limits["flexai.io/vxpu-share"] = str(share_milli)
    if memory_mib:
        limits["flexai.io/vxpu-memory"] = str(memory_mib)
    return limits


def create_pod(cluster: ControlPlane, body: dict) -> dict:
    namespace = body["metadata"].get("namespace", "default")
    return cluster.create(f"/api/v1/namespaces/{namespace}/pods", body)


def get_pod(cluster: ControlPlane, name: str, namespace: str = "default") -> dict:
    return cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")


def delete_pod(cluster: ControlPlane, name: str, namespace: str = "default") -> None:
    cluster.request(
        "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0", ok=(200, 202, 404)
    )


def wait_bound(cluster: ControlPlane, name: str, namespace: str = "default", timeout_s: float = 90) -> dict:
    def bound() -> dict | None:
        pod = get_pod(cluster, name, namespace)
        return pod if pod["spec"].get("nodeName") else None

    return wait_until(f"pod {namespace}/{name} to be bound", bound, timeout_s)


def wait_running(cluster: ControlPlane, name: str, namespace: str = "default", timeout_s: float = 90) -> dict:
    def running() -> dict | None:
        pod = get_pod(cluster, name, namespace)
        return pod if (pod.get("status") or {}).get("phase") == "Running" else None

    return wait_until(f"pod {namespace}/{name} to run", running, timeout_s)


def events_of(cluster: ControlPlane, name: str, namespace: str = "default") -> list[dict]:
    selector = f"involvedObject.name={name},involvedObject.kind=Pod"
    return cluster.request("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector={selector}")["items"]


TEST_NAMESPACES = ("default", "flexai-system")


def clear_pods(cluster: ControlPlane, namespaces: tuple[str, ...] = TEST_NAMESPACES, timeout_s: float = 90) -> None:
    """Deletes every pod of the tests' namespaces at once (grace period 0) and waits until they are gone, so a
    test that needs empty devices starts from them whatever ran before it."""
    for namespace in namespaces:
        cluster.request("DELETE", f"/api/v1/namespaces/{namespace}/pods?gracePeriodSeconds=0", ok=(200, 202))

    def gone() -> bool:
        return all(not cluster.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"] for ns in namespaces)

    wait_until("the tests' pods to be gone", gone, timeout_s)
