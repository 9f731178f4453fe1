"""flexai against plain Kubernetes on a real control plane at scale: pods/s, bind latency, extender CPU, memory.

    python benchmarks/k8s_scale.py --nodes 5000 --pods 10000 --json /tmp/k8s_scale_5000.json [--keep]

One run, one control plane (``tests/k8s_real/controlplane.py``: etcd, kube-apiserver, kube-controller-manager
without its node lifecycle controller (see DROPPED_CONTROLLERS) and kwok, built from their Go modules by
``bash tests/k8s_real/build.sh``), two phases side by side:

1. **Setup** (once): NODES kwok nodes, each advertising 8 devices as ``flexai.io/vxpu`` (80 slots) and as
   ``nvidia.com/gpu`` (8). Their flexai inventories (``flexai.io/inventory``: 8 sim A100 of 81,920 MiB, share
   step 100 milli, what ``flexai k8s agent --devices sim:8xA100-80GB`` publishes) are PATCHed by this process,
   in parallel threads, as ``NodeAgent.publish`` writes them: NODES agent processes do not fit on the machines
   this runs on. No heartbeat follows, so the extender runs with ``--inventory-timeout 86400``. The same PATCH
   removes the ``node.kubernetes.io/not-ready`` taint the API server puts on new nodes, as the node lifecycle
   controller (not run here) does once kwok has made them Ready.
2. **Baseline**: the real kube-scheduler alone (the chart's KubeSchedulerConfiguration without the extender and
   with kube-scheduler's default plugins, profile ``default-scheduler``; its adaptive ``percentageOfNodesToScore``)
   schedules PODS pods asking for whole GPUs (``nvidia.com/gpu``; a fractional pod takes one whole GPU), all
   created at once by a thread pool.
3. **flexai**: the baseline's pods deleted (and gone: one DELETE per pod, gracePeriodSeconds 0, in parallel) and
   its kube-scheduler stopped, then the flexai extender (``flexai k8s scheduler``, as the chart runs it: Hi
   Scheduler on, no leader election of its own) and kube-scheduler with the chart's configuration (profile
   ``flexai-scheduler``, the extender filtering, ranking and binding; the extender writes each Hi placement
   into the pod's ``status.nominatedNodeName`` as pods arrive, which kube-scheduler tries alone first) schedule
   the same pods asking for slices (``flexai.io/vxpu``, ``flexai.io/vxpu-share``). The pods are written as the
   webhook leaves them (``schedulerName: flexai-scheduler``); the webhook itself does not run.

The pods are drawn (fixed seed) from the GPU pods of the bundled default trace (Alibaba openb): device count
and share per device; shares are rounded up to the 100-milli step, as the webhook does for translated requests
(it refuses off-step flexai requests). The trace has no device memory, so no ``flexai.io/vxpu-memory`` is asked.

Measured per phase, from a watch on the phase's namespace: pods/s = bound / (last bind seen - first pod
created); bind latency = time a pod is first seen bound - time it was created (the earlier of its POST's
answer and its ADDED event). The extender's CPU seconds per bound pod (its process, over the flexai phase),
every component's CPU seconds per phase and peak resident memory (VmHWM). Placements are checked afterwards:
for flexai, per node and device the granted shares (and memory) from ``flexai.io/placement``; for the
baseline, per node the whole GPUs. Pods left unbound (nothing bound for ``--stall-s``) are listed with their
shapes and the scheduler's last reason from Events; how many fit at all is estimated by a best-fit-decreasing
packing of the same pods on empty nodes (a packing that exists, so a lower bound) and the capacity (an upper
bound).

Progress goes to stderr every few seconds; every process is ended on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import os
import platform
import resource
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.k8s_real.controlplane import (  # noqa: E402
    SYSTEM_NAMESPACE,
    ControlPlane,
    ControlPlaneError,
    Process,
    binaries_dir,
    cpu_seconds,
    kubernetes_version,
    missing_binaries,
    peak_rss_mib,
    sim_inventory_json,
)

from flexai.k8s import names  # noqa: E402
from flexai.sim.openb import load_pods  # noqa: E402

DEVICES_PER_NODE = 8
SLOTS_PER_DEVICE = 10
SHARE_STEP_MILLI = 1000 // SLOTS_PER_DEVICE
SIM_DEVICES = f"sim:{DEVICES_PER_NODE}xA100-80GB"
INVENTORY_TIMEOUT_S = 86400
APISERVER_ARGS = ("--max-requests-inflight=3000", "--max-mutating-requests-inflight=1000")
"""What Kubernetes' 5,000-node scalability tests give the API server."""
EXTENDER_ARGS = ("--no-leader-election", "--inventory-timeout", str(INVENTORY_TIMEOUT_S))
"""As the chart runs the extender (leaderElection: false, Hi Scheduler on), with the long inventory timeout."""
NAMESPACES = {"baseline": "k8s-scale-baseline", "flexai": "k8s-scale-flexai"}
SCHEDULER_NAMES = {"baseline": "default-scheduler", "flexai": names.SCHEDULER_NAME}
PROCESS_NAMES = {"baseline": "kube-scheduler-baseline", "flexai": "kube-scheduler"}
EXTENDER = "flexai-extender"
IMAGE = "registry.k8s.io/pause:3.10"

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


class BenchmarkError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ pods
@dataclass(frozen=True)
class Shape:
    count: int
    share_milli: int
    """Per device, on the share step."""

    @property
    def whole_gpus(self) -> int:
        """What the plain-Kubernetes pod asks for: a fractional pod takes a whole GPU."""
        return math.ceil(self.count * self.share_milli / 1000)

    def label(self) -> str:
        return f"{self.count}x{self.share_milli}m"


def draw_shapes(trace: str, count: int, seed: int) -> tuple[list[Shape], dict[str, Any]]:
    pods = load_pods(trace)
    gpu = [r for r in pods.requests if r.device_count > 0]
    if not gpu:
        raise BenchmarkError(f"trace {trace!r} has no pod asking for a GPU")
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(gpu), size=count)
    shapes = []
    rounded = 0
    for i in chosen.tolist():
        r = gpu[i]
        share = min(1000, -(-r.share_milli // SHARE_STEP_MILLI) * SHARE_STEP_MILLI)
        rounded += share != r.share_milli
        shapes.append(Shape(r.device_count, share))
    info = {
        "trace": pods.name,
        "gpu_pods_in_trace": len(gpu),
        "seed": seed,
        "drawn_with_replacement": True,
        "shares_rounded_up_to_step": rounded,
        "share_step_milli": SHARE_STEP_MILLI,
        "device_memory_asked": False,
        "models_asked": False,
        "shapes": dict(Counter(s.label() for s in shapes).most_common()),
        "whole_gpus_asked_baseline": sum(s.whole_gpus for s in shapes),
        "gpu_share_asked_flexai": round(sum(s.count * s.share_milli for s in shapes) / 1000, 1),
    }
    return shapes, info


def pod_name(i: int) -> str:
    return f"p-{i:06d}"


def pod_body(phase: str, i: int, shape: Shape) -> bytes:
    if phase == "flexai":
        limits = {names.RESOURCE_VXPU: str(shape.count)}
        if shape.share_milli < 1000:
            limits[names.RESOURCE_SHARE] = str(shape.share_milli)
    else:
        limits = {"nvidia.com/gpu": str(shape.whole_gpus)}
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(i),
            "namespace": NAMESPACES[phase],
            "labels": {"app": "k8s-scale", "shape": shape.label()},
        },
        "spec": {
            "schedulerName": SCHEDULER_NAMES[phase],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": IMAGE, "resources": {"limits": limits}}],
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------ how many fit
def best_fit(sizes: list[int], free: list[int]) -> int:
    """Place ``sizes`` (largest first, as given) by best fit into bins counted by free room (``free[f]``: bins with
    ``f`` free, updated in place); how many were placed."""
    placed = 0
    for size in sizes:
        f = next((f for f in range(size, len(free)) if free[f]), None)
        if f is None:
            continue
        free[f] -= 1
        free[f - size] += 1
        placed += 1
    return placed


def capacity_bound(sizes: list[int], total: int) -> int:
    """How many of ``sizes``, smallest first, fit in ``total`` units of room: an upper bound on what fits."""
    count = 0
    for size in sorted(sizes):
        if size > total:
            break
        total -= size
        count += 1
    return count


def fit_estimate(shapes: list[Shape], nodes: int, phase: str) -> dict[str, int]:
    """How many pods fit on ``nodes`` empty nodes: best fit decreasing (a packing that exists: a lower bound on
    what fits) and the capacity (an upper bound: the pods, smallest first, until the GPUs or share run out)."""
    node_bins = [0] * (DEVICES_PER_NODE + 1)  # node_bins[f]: nodes with f GPUs free
    node_bins[DEVICES_PER_NODE] = nodes
    if phase == "baseline":
        placed = best_fit(sorted((s.whole_gpus for s in shapes), reverse=True), node_bins)
        capacity = capacity_bound([s.whole_gpus for s in shapes], nodes * DEVICES_PER_NODE)
        return {"fit_best_fit_decreasing": placed, "fit_capacity_bound": capacity}
    # flexai: several whole devices on one node first (best fit over nodes by free whole devices), then the
    # single-device pods, largest share first, best fit over devices (by free share in steps).
    steps = SLOTS_PER_DEVICE
    placed = best_fit(sorted((s.count for s in shapes if s.count > 1), reverse=True), node_bins)
    device_bins = [0] * (steps + 1)  # device_bins[u]: devices with u steps free
    device_bins[steps] = sum(f * n for f, n in enumerate(node_bins))
    single = sorted((s.share_milli // SHARE_STEP_MILLI for s in shapes if s.count == 1), reverse=True)
    placed += best_fit(single, device_bins)
    units = [s.count * s.share_milli // SHARE_STEP_MILLI for s in shapes]
    capacity = capacity_bound(units, nodes * DEVICES_PER_NODE * steps)
    return {"fit_best_fit_decreasing": placed, "fit_capacity_bound": capacity}


# ------------------------------------------------------------------------------------------ control plane
DROPPED_CONTROLLERS = ("nodelifecycle", "node-lifecycle-controller")
"""Not run in kube-controller-manager: kwok renews the node Leases 4 at a time (its default nodeLeaseParallelism),
so at 5,000 nodes on a loaded machine a Lease is renewed every ~2 minutes, and the node lifecycle controller
would mark the nodes Unknown (and taint them unreachable) in the middle of a phase."""


def _without_controllers(arg: str, dropped: tuple[str, ...]) -> str:
    if not arg.startswith("--controllers="):
        return arg
    kept = [c for c in arg.split("=", 1)[1].split(",") if c not in dropped]
    return "--controllers=" + ",".join(kept)


class ScalePlane(ControlPlane):
    """The test control plane, its kube-controller-manager without the controllers in DROPPED_CONTROLLERS."""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        if name == "kube-controller-manager":
            argv = [_without_controllers(a, DROPPED_CONTROLLERS) for a in argv]
        return super()._spawn(name, argv, env)


# -------------------------------------------------------------------------------------------- API client
def tls_context(plane: ControlPlane) -> ssl.SSLContext:
    """The admin client certificate, the API server checked against the test CA."""
    assert plane.certs is not None
    context = ssl.create_default_context(cafile=str(plane.certs.path("ca.crt")))
    context.load_cert_chain(str(plane.certs.path("admin.crt")), str(plane.certs.path("admin.key")))
    return context


class ApiClient:
    """Per-thread kept-alive TLS connections to the API server (the standard library's http.client: a
    quarter of httpx's CPU per request, which matters with this process on the same cores as the schedulers)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.port = plane.apiserver_port
        self.context = tls_context(plane)
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=120)
            self._local.conn = conn
        return conn

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
             retries: int = 8) -> tuple[int, bytes]:  # fmt: skip
        """One request; connection errors, 429 and 5xx are tried again (with backoff), other answers returned."""
        delay = 0.2
        for attempt in range(retries):
            conn = self._connection()
            try:
                headers = {"Content-Type": content_type, "Accept": "application/json"}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == retries - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5)
                continue
            if response.status == 429 or response.status >= 500:
                if attempt < retries - 1:
                    time.sleep(delay)
                    delay = min(delay * 2, 5)
                    continue
            return response.status, data
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202),
             content_type: str = "application/json") -> dict:  # fmt: skip
        raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        status, data = self.call(method, path, raw, content_type)
        if status not in ok:
            raise BenchmarkError(f"{method} {path}: {status} {data[:500].decode(errors='replace')}")
        return json.loads(data) if data else {}

    def list_all(self, path: str, page: int = 500) -> tuple[list[dict], str]:
        """Every item of a collection (paginated) and the list's resourceVersion."""
        items: list[dict] = []
        token = ""
        sep = "&" if "?" in path else "?"
        while True:
            url = f"{path}{sep}limit={page}" + (f"&continue={quote(token)}" if token else "")
            data = self.json("GET", url)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    def count(self, path: str) -> int:
        sep = "&" if "?" in path else "?"
        data = self.json("GET", f"{path}{sep}limit=1")
        return len(data.get("items") or []) + int((data.get("metadata") or {}).get("remainingItemCount") or 0)


def parallel(what: str, items: list, work: Any, threads: int, every_s: float = 5.0) -> list:
    """``work(item)`` for every item on ``threads`` threads, in order, with a progress line every ``every_s``."""
    results: list = [None] * len(items)
    done = 0
    last = time.monotonic()
    started = last
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = {pool.submit(work, item): i for i, item in enumerate(items)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            done += 1
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                log(f"{what}: {done:,}/{len(items):,} ({done / (now - started):,.0f}/s)")
    log(f"{what}: {len(items):,} in {time.monotonic() - started:.1f} s")
    return results


# ------------------------------------------------------------------------------------------------ setup
def node_names(count: int) -> list[str]:
    return [f"kwok-{i:05d}" for i in range(count)]


def setup_nodes(plane: ControlPlane, api: ApiClient, nodes: list[str], threads: int) -> dict[str, float]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    chunk = 500
    for start in range(0, len(nodes), chunk):
        plane.add_nodes(nodes[start : start + chunk], devices=DEVICES_PER_NODE, slots_per_device=SLOTS_PER_DEVICE,
                        workers=min(threads, 32))  # fmt: skip
        log(f"nodes created: {min(start + chunk, len(nodes)):,}/{len(nodes):,}")
    timings["create_nodes_s"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    text = sim_inventory_json(SIM_DEVICES, SHARE_STEP_MILLI)
    # With the inventory, the taint the API server's admission (TaintNodesByCondition) puts on every new node goes
    # (node.kubernetes.io/not-ready:NoSchedule): the node lifecycle controller, which removes it once the node is
    # Ready, does not run here (kwok makes the nodes Ready; a lifecycle controller would taint them again whenever
    # kwok's lease renewals fall behind on a loaded machine).
    taints = (api.json("GET", f"/api/v1/nodes/{nodes[0]}").get("spec") or {}).get("taints") or []
    foreign = [t for t in taints if t.get("key") != "node.kubernetes.io/not-ready"]
    if foreign:
        raise BenchmarkError(f"node {nodes[0]} has taints this benchmark does not expect: {foreign}")
    patch = json.dumps(
        {"metadata": {"annotations": {names.ANNOTATION_INVENTORY: text}}, "spec": {"taints": None}}
    ).encode()

    def publish(node: str) -> None:
        status, data = api.call("PATCH", f"/api/v1/nodes/{node}", patch, "application/merge-patch+json")
        if status != 200:
            raise BenchmarkError(f"inventory of {node}: {status} {data[:300].decode(errors='replace')}")

    parallel("inventories published", nodes, publish, threads)
    timings["publish_inventories_s"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    deadline = started + max(120, len(nodes) / 20)
    while True:
        items, _ = api.list_all("/api/v1/nodes?labelSelector=type%3Dkwok")
        ready = sum(
            1 for n in items
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (n.get("status") or {}).get("conditions") or [])
        )  # fmt: skip
        log(f"nodes Ready (kwok): {ready:,}/{len(nodes):,}")
        if ready >= len(nodes):
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(f"only {ready} of {len(nodes)} nodes Ready after {deadline - started:.0f} s:\n"
                                 f"{plane.processes['kwok'].tail()}")  # fmt: skip
        time.sleep(5)
    timings["nodes_ready_s"] = round(time.monotonic() - started, 1)
    sample = next(n for n in items if n["metadata"]["name"] == nodes[0])
    allocatable = sample["status"].get("allocatable") or {}
    want = {names.RESOURCE_VXPU: str(DEVICES_PER_NODE * SLOTS_PER_DEVICE), "nvidia.com/gpu": str(DEVICES_PER_NODE)}
    if any(allocatable.get(k) != v for k, v in want.items()):
        raise BenchmarkError(f"node {nodes[0]} allocatable {allocatable} lacks {want} (kwok rewrote it?)")
    if names.ANNOTATION_INVENTORY not in (sample["metadata"].get("annotations") or {}):
        raise BenchmarkError(f"node {nodes[0]} has no {names.ANNOTATION_INVENTORY} annotation")
    return timings


def ensure_phase_namespace(plane: ControlPlane, api: ApiClient, namespace: str) -> None:
    plane.ensure_namespace(namespace)
    deadline = time.monotonic() + 120
    while api.call("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] != 200:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"no default ServiceAccount in {namespace} after 120 s (kube-controller-manager?)")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------ schedulers
def start_kube_scheduler(plane: ControlPlane, phase: str, extender_port: int | None,
                         node_score_percent: int | None) -> tuple[Process, dict]:  # fmt: skip
    """``ControlPlane.start_scheduler`` (the chart's configuration rendered by helm), with percentageOfNodesToScore
    overridden when asked (``node_score_percent`` 0: kube-scheduler's adaptive default)."""
    name = PROCESS_NAMES[phase]
    if node_score_percent is None:
        process = plane.start_scheduler(extender_port, name=name, scheduler_name=SCHEDULER_NAMES[phase])
        config = yaml.safe_load((plane.workdir / f"{name}.yaml").read_text())
        return process, config
    config = plane.scheduler_config(extender_port, SCHEDULER_NAMES[phase])
    if node_score_percent:
        config["percentageOfNodesToScore"] = node_score_percent
    else:
        config.pop("percentageOfNodesToScore", None)
    path = plane.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    plane.ensure_namespace(SYSTEM_NAMESPACE)
    process = plane._spawn(name, [plane.binary("kube-scheduler"), f"--config={path}", "--secure-port=0", "--v=1"])
    return process, config


def wait_leader(api: ApiClient, config: dict, process: Process, previous: str, timeout_s: float = 120) -> str:
    """Wait until ``process`` (kube-scheduler) leads: its caches are synced then and it schedules."""
    election = config.get("leaderElection") or {}
    if not election.get("leaderElect", True):
        time.sleep(3)
        return ""
    path = (f"/apis/coordination.k8s.io/v1/namespaces/{election.get('resourceNamespace', 'kube-system')}"
            f"/leases/{election.get('resourceName', 'kube-scheduler')}")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    announced = False
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchmarkError(f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}")
        status, data = api.call("GET", path)
        if status == 200:
            holder = (json.loads(data).get("spec") or {}).get("holderIdentity") or ""
            if holder and holder != previous:
                time.sleep(1)
                return holder
            if holder and not announced:
                log(f"{process.name}: waiting for the previous scheduler's lease ({holder}) to expire")
                announced = True
        time.sleep(0.5)
    raise BenchmarkError(f"{process.name} did not take its Lease {path} in {timeout_s:.0f} s:\n{process.tail()}")


def wait_extender_synced(plane: ControlPlane, port: int, timeout_s: float = 600) -> None:
    """Until the extender has listed nodes and pods. The probe asks with a share it refuses (no side effect: a
    pod it cannot read is refused before anything is held); while loading it answers "still loading"."""
    probe = {
        "pod": {"metadata": {"name": "k8s-scale-probe", "namespace": "k8s-scale-probe", "uid": "probe"},
                "spec": {"containers": [{"name": "c", "resources": {"limits": {
                    names.RESOURCE_VXPU: "1", names.RESOURCE_SHARE: "5000"}}}]}},
        "nodenames": ["k8s-scale-probe"],
    }  # fmt: skip
    process = plane.processes[EXTENDER]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchmarkError(f"{EXTENDER} exited ({process.popen.returncode}):\n{process.tail()}")
        try:
            answer = httpx.post(f"http://127.0.0.1:{port}/filter", json=probe, timeout=30).json()
        except (httpx.HTTPError, ValueError):
            answer = {"Error": "no answer"}
        if not answer.get("Error"):
            return
        time.sleep(1)
    raise BenchmarkError(f"{EXTENDER} still loading the cluster after {timeout_s:.0f} s:\n{process.tail()}")


# ------------------------------------------------------------------------------------------------ watch
@dataclass
class PhaseRecord:
    created: dict[str, float] = field(default_factory=dict)
    """Pod name -> when its POST was answered (monotonic)."""
    added: dict[str, float] = field(default_factory=dict)
    """Pod name -> when its ADDED event arrived."""
    bound: dict[str, float] = field(default_factory=dict)
    """Pod name -> when it was first seen with spec.nodeName."""
    node_of: dict[str, str] = field(default_factory=dict)
    create_errors: list[str] = field(default_factory=list)
    watch_restarts: int = 0
    watch_relists: int = 0


class PodWatch(threading.Thread):
    """A watch on one namespace's pods, from a resourceVersion, recording ADDED and first-bound times; resumes
    from the last resourceVersion when the stream ends, re-lists on 410 Gone."""

    def __init__(self, plane: ControlPlane, api: ApiClient, namespace: str, resource_version: str,
                 record: PhaseRecord) -> None:  # fmt: skip
        super().__init__(name=f"watch-{namespace}", daemon=True)
        self.plane, self.api, self.namespace, self.rv, self.record = plane, api, namespace, resource_version, record
        self.stop = threading.Event()
        self.error: str = ""
        self.client = httpx.Client(base_url=plane.url, verify=tls_context(plane), timeout=httpx.Timeout(30, read=5))

    def _seen(self, pod: dict, kind: str, now: float) -> None:
        meta = pod.get("metadata") or {}
        name = meta.get("name", "")
        if kind == "ADDED" and name not in self.record.added:
            self.record.added[name] = now
        node = (pod.get("spec") or {}).get("nodeName")
        if node and name not in self.record.bound:
            self.record.bound[name] = now
            self.record.node_of[name] = node

    def _relist(self) -> None:
        items, rv = self.api.list_all(f"/api/v1/namespaces/{self.namespace}/pods")
        now = time.monotonic()
        for pod in items:
            self._seen(pod, "ADDED", now)
        self.rv = rv
        self.record.watch_relists += 1

    def run(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        while not self.stop.is_set():
            try:
                params = {"watch": "1", "resourceVersion": self.rv, "allowWatchBookmarks": "true",
                          "timeoutSeconds": "600"}  # fmt: skip
                with self.client.stream("GET", path, params=params) as response:
                    if response.status_code == 410:
                        self._relist()
                        continue
                    if response.status_code != 200:
                        raise BenchmarkError(f"watch {path}: {response.status_code} {response.read()[:300]!r}")
                    for line in response.iter_lines():
                        if not line:
                            continue
                        now = time.monotonic()
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                self._relist()
                                break
                            raise BenchmarkError(f"watch {path}: {obj.get('message', obj)}")
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            self.rv = rv
                        if kind in ("ADDED", "MODIFIED"):
                            self._seen(obj, kind, now)
                        if self.stop.is_set():
                            break
            except httpx.ReadTimeout:
                pass  # quiet for 5 s: look at the stop flag, resume from the last resourceVersion
            except (httpx.HTTPError, OSError, ValueError) as exc:
                self.record.watch_restarts += 1
                if self.record.watch_restarts > 100:
                    self.error = f"watch {path} keeps failing: {exc!r}"
                    return
                time.sleep(0.5)
            except BenchmarkError as exc:
                self.error = str(exc)
                return
        self.client.close()


# ------------------------------------------------------------------------------------------------ phases
def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)), 3) if values else 0.0


def component_pids(plane: ControlPlane) -> dict[str, int]:
    return {name: p.pid for name, p in plane.processes.items() if p.alive()}


def run_phase(plane: ControlPlane, api: ApiClient, phase: str, shapes: list[Shape], threads: int,
              stall_s: float, timeout_s: float, nodes: int) -> dict[str, Any]:  # fmt: skip
    namespace = NAMESPACES[phase]
    bodies = [pod_body(phase, i, s) for i, s in enumerate(shapes)]
    record = PhaseRecord()
    _, rv = api.list_all(f"/api/v1/namespaces/{namespace}/pods")
    watch = PodWatch(plane, api, namespace, rv, record)
    watch.start()
    cpu_before = {name: cpu_seconds(pid) for name, pid in component_pids(plane).items()}
    self_before = time.process_time()
    busy_before = machine_busy_s()
    load_before = os.getloadavg()
    path = f"/api/v1/namespaces/{namespace}/pods"
    first_send = [0.0]

    def create(i: int) -> None:
        body = bodies[i]
        if not first_send[0]:
            first_send[0] = time.monotonic()
        for attempt in range(20):
            status, data = api.call("POST", path, body)
            if status in (201, 409):  # 409: an earlier try went through
                record.created[pod_name(i)] = time.monotonic()
                return
            text = data[:300].decode(errors="replace")
            if status == 403 and "serviceaccount" in text.lower() and attempt < 19:
                time.sleep(0.5)
                continue
            record.create_errors.append(f"{pod_name(i)}: {status} {text}")
            return

    log(f"{phase}: creating {len(shapes):,} pods on {threads} threads")
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    futures = [pool.submit(create, i) for i in range(len(bodies))]
    last_line = 0.0
    last_count, last_change = 0, time.monotonic()
    deadline = started + timeout_s
    created_done_at = None
    outcome = "all bound"
    while True:
        time.sleep(0.5)
        now = time.monotonic()
        bound = len(record.bound)
        if bound != last_count:
            last_count, last_change = bound, now
        all_created = all(f.done() for f in futures)
        if all_created and created_done_at is None:
            created_done_at = now
            for f in futures:
                f.result()
        if now - last_line >= 5:
            last_line = now
            rate = bound / (now - started) if now > started else 0.0
            log(f"{phase}: created {len(record.created):,}/{len(shapes):,}, bound {bound:,} ({rate:,.0f} pods/s)")
        if watch.error:
            raise BenchmarkError(f"{phase}: {watch.error}")
        wanted = len(shapes) - len(record.create_errors)
        if all_created and bound >= wanted:
            break
        if all_created and now - last_change > stall_s:
            outcome = f"stalled: nothing bound for {stall_s:.0f} s"
            break
        if now > deadline:
            outcome = f"timed out after {timeout_s:.0f} s"
            break
    pool.shutdown(wait=True, cancel_futures=True)
    ended = time.monotonic()
    cpu_after = {name: cpu_seconds(pid) for name, pid in component_pids(plane).items()}
    self_cpu = time.process_time() - self_before
    busy = machine_busy_s() - busy_before
    load_after = os.getloadavg()
    time.sleep(1)  # the last events
    watch.stop.set()
    watch.join(15)
    log(f"{phase}: {outcome}: {len(record.bound):,}/{len(shapes):,} bound in {ended - started:.1f} s")
    if record.create_errors:
        log(f"{phase}: {len(record.create_errors)} pods not created, e.g. {record.create_errors[0]}")

    creation = {n: min(t, record.added.get(n, t)) for n, t in record.created.items()}
    for n, t in record.added.items():
        creation.setdefault(n, t)
    bound_names = [n for n in record.bound if n in creation]
    latencies = [max(0.0, record.bound[n] - creation[n]) for n in bound_names]
    first_created = min(creation.values()) if creation else started
    last_bound = max(record.bound.values()) if record.bound else first_created
    span = last_bound - first_created
    result: dict[str, Any] = {
        "bound": len(record.bound),
        "pods_per_s": round(len(record.bound) / span, 2) if span > 0 else 0.0,
        "bind_latency_s": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "p90": percentile(latencies, 90),
            "max": round(max(latencies), 3) if latencies else 0.0,
            "mean": round(float(np.mean(latencies)), 3) if latencies else 0.0,
        },
        "outcome": outcome,
        "created": len(record.created),
        "create_errors": len(record.create_errors),
        "create_errors_sample": record.create_errors[:5],
        "first_created_to_last_bound_s": round(span, 2),
        "create_all_s": round((created_done_at or ended) - (first_send[0] or started), 2),
        "create_pods_per_s": round(len(record.created) / max(1e-9, (created_done_at or ended) - started), 1),
        "watch_restarts": record.watch_restarts,
        "watch_relists": record.watch_relists,
        "cpu_s": {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after},
        "benchmark_process_cpu_s": round(self_cpu, 2),
        "machine": {
            "cpu_busy_s": round(busy, 1),
            "cpu_busy_s_not_this_benchmark": round(
                busy - self_cpu - sum(cpu_after.values()) + sum(cpu_before.get(n, 0.0) for n in cpu_after), 1
            ),
            "cpus_busy_mean": round(busy / max(1e-9, ended - started), 2),
            "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
    }
    result["cpu_s_per_bound_pod"] = {
        name: round(v / max(1, len(record.bound)), 5) for name, v in result["cpu_s"].items()
    }
    result.update(check_placements(api, phase, namespace, shapes, record))
    result.update(fit_estimate(shapes, nodes, phase))
    return result


def check_placements(api: ApiClient, phase: str, namespace: str, shapes: list[Shape],
                     record: PhaseRecord) -> dict[str, Any]:  # fmt: skip
    """The over-grant check from what the API server holds, and the unbound pods with their shapes and reasons."""
    items, _ = api.list_all(f"/api/v1/namespaces/{namespace}/pods")
    shape_of = {pod_name(i): s for i, s in enumerate(shapes)}
    out: dict[str, Any] = {}
    unbound = [p for p in items if not (p.get("spec") or {}).get("nodeName")]
    bound = [p for p in items if (p.get("spec") or {}).get("nodeName")]
    out["bound_in_api"] = len(bound)
    if phase == "flexai":
        share: dict[tuple[str, str], int] = defaultdict(int)
        memory: dict[tuple[str, str], int] = defaultdict(int)
        problems: list[str] = []
        devices_used: set[tuple[str, str]] = set()
        for p in bound:
            meta, node = p["metadata"], p["spec"]["nodeName"]
            raw = (meta.get("annotations") or {}).get(names.ANNOTATION_PLACEMENT)
            shape = shape_of.get(meta["name"])
            if not raw:
                problems.append(f"{meta['name']}: bound to {node} without {names.ANNOTATION_PLACEMENT}")
                continue
            try:
                placement = names.Placement.from_json(raw)
            except ValueError as exc:
                problems.append(f"{meta['name']}: {exc}")
                continue
            if placement.node != node:
                problems.append(f"{meta['name']}: placement on {placement.node}, bound to {node}")
            if shape is not None and (
                len(placement.slices) != shape.count
                or any(s.share_milli != shape.share_milli for s in placement.slices)
            ):
                problems.append(f"{meta['name']}: asked {shape.label()}, placed "
                                f"{[(s.uuid, s.share_milli) for s in placement.slices]}")  # fmt: skip
            if len({s.uuid for s in placement.slices}) != len(placement.slices):
                problems.append(f"{meta['name']}: one device twice in {placement.slices}")
            for s in placement.slices:
                share[(node, s.uuid)] += s.share_milli
                memory[(node, s.uuid)] += s.memory_mib
                devices_used.add((node, s.uuid))
        device_memory = 81920
        over_share = {k: v for k, v in share.items() if v > 1000}
        over_memory = {k: v for k, v in memory.items() if v > device_memory}
        out.update({
            "overgranted_devices": len(over_share | over_memory),
            "overgranted_share_devices": len(over_share),
            "overgranted_memory_devices": len(over_memory),
            "overgranted_sample": [f"{n}/{u}: {v}m" for (n, u), v in list(over_share.items())[:5]],
            "placement_problems": len(problems),
            "placement_problems_sample": problems[:5],
            "devices_used": len(devices_used),
            "nodes_used": len({n for n, _ in devices_used}),
            "share_granted_gpus": round(sum(share.values()) / 1000, 1),
        })  # fmt: skip
    else:
        gpus: dict[str, int] = defaultdict(int)
        for p in bound:
            limits = p["spec"]["containers"][0]["resources"].get("limits") or {}
            gpus[p["spec"]["nodeName"]] += int(limits.get("nvidia.com/gpu", 0))
        over = {n: v for n, v in gpus.items() if v > DEVICES_PER_NODE}
        out.update({
            "overgranted_nodes": len(over),
            "overgranted_devices": sum(v - DEVICES_PER_NODE for v in over.values()),
            "overgranted_sample": [f"{n}: {v} GPUs" for n, v in list(over.items())[:5]],
            "nodes_used": len(gpus),
            "gpus_granted": sum(gpus.values()),
        })  # fmt: skip
    out["unbound"] = len(unbound)
    if unbound:
        out["unbound_shapes"] = dict(Counter(shape_of[p["metadata"]["name"]].label() for p in unbound
                                             if p["metadata"]["name"] in shape_of).most_common())  # fmt: skip
        out["unbound_reasons"] = unbound_reasons(api, namespace, {p["metadata"]["name"] for p in unbound})
    return out


def unbound_reasons(api: ApiClient, namespace: str, pods: set[str]) -> dict[str, int]:
    """The last scheduling message of each unbound pod (kube-scheduler's FailedScheduling, which carries the
    extender's FailedNodes reasons, or the extender's own FlexaiUnschedulable), counted."""
    events, _ = api.list_all(f"/api/v1/namespaces/{namespace}/events")
    last: dict[str, tuple[str, str]] = {}
    for e in events:
        name = (e.get("involvedObject") or e.get("regarding") or {}).get("name", "")
        if name not in pods:
            continue
        when = e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or ""
        message = f"{e.get('reason', '')}: {e.get('message') or e.get('note') or ''}"[:400]
        if name not in last or when >= last[name][0]:
            last[name] = (when, message)
    reasons = Counter(m for _, m in last.values())
    reasons["(no event)"] = len(pods) - len(last)
    return {m: c for m, c in reasons.most_common(10) if c}


def delete_phase_pods(api: ApiClient, namespace: str, threads: int, timeout_s: float = 1800) -> float:
    """Every pod of the namespace deleted at once (gracePeriodSeconds 0), in parallel: a deletecollection is
    carried out one pod after the other by the API server (--delete-collection-workers=1)."""
    started = time.monotonic()
    path = f"/api/v1/namespaces/{namespace}/pods"
    items, _ = api.list_all(path)
    log(f"deleting {len(items):,} pods in {namespace}")
    options = json.dumps({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}).encode()

    def delete(name: str) -> None:
        status, data = api.call("DELETE", f"{path}/{name}?gracePeriodSeconds=0", options)
        if status not in (200, 202, 404):
            raise BenchmarkError(f"DELETE {path}/{name}: {status} {data[:300].decode(errors='replace')}")

    parallel("pods deleted", [p["metadata"]["name"] for p in items], delete, threads)
    last = 0.0
    while True:
        left = api.count(path)
        if left == 0:
            break
        now = time.monotonic()
        if now - started > timeout_s:
            raise BenchmarkError(f"{left} pods still in {namespace} after {timeout_s:.0f} s")
        if now - last >= 5:
            last = now
            log(f"deleting: {left:,} pods left in {namespace}")
        time.sleep(1)
    took = time.monotonic() - started
    log(f"{namespace}: all pods gone in {took:.1f} s")
    return took


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every CPU), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def extender_metrics(port: int) -> dict[str, Any]:
    """Mean time inside the extender's handlers per verb and its decisions by result (its /metrics)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    attempts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        labels = dict(part.split("=", 1) for part in key[key.find("{") + 1 : key.rfind("}")].split(",") if "=" in part)
        labels = {k: v.strip('"') for k, v in labels.items()}
        if key.startswith("flexai_decision_latency_seconds_sum"):
            sums[labels.get("verb", "")] = float(value)
        elif key.startswith("flexai_decision_latency_seconds_count"):
            counts[labels.get("verb", "")] = float(value)
        elif key.startswith("flexai_scheduling_attempts_total"):
            attempts[f"{labels.get('verb', '')} {labels.get('result', '')}"] = float(value)
    return {
        "handler_mean_ms": {v: round(1000 * sums[v] / counts[v], 2) for v in sums if counts.get(v)},
        "calls": {v: int(c) for v, c in counts.items()},
        "attempts": {k: int(v) for k, v in attempts.items()},
    }


# ------------------------------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, ValueError):
        pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="flexai (kube-scheduler + extender) against plain kube-scheduler on a real control plane "
        "with kwok nodes: pods/s, bind latency, extender CPU per pod, peak memory, over-grant check."
    )
    parser.add_argument("--nodes", type=int, default=1000, help="kwok nodes of 8 devices (default 1000)")
    parser.add_argument("--pods", type=int, default=2000, help="pods per phase, created at once (default 2000)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--trace", default="default", help="bundled trace (or openb CSV) the shapes come from")
    parser.add_argument("--seed", type=int, default=42, help="seed of the draw of pod shapes (default 42)")
    parser.add_argument("--threads", type=int, default=48, help="threads creating pods (default 48)")
    parser.add_argument("--stall-s", type=float, default=60, help="end a phase when nothing bound for this long")
    parser.add_argument("--phase-timeout-s", type=float, default=3600, help="end a phase after this long")
    parser.add_argument("--phases", default="baseline,flexai", help="phases to run, in order (default both)")
    parser.add_argument("--baseline-node-score-percent", type=int, default=None,
                        help="percentageOfNodesToScore of the baseline kube-scheduler (default: the chart's, the "
                             "same as flexai's; 0: kube-scheduler's adaptive default)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="control plane's folder (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, certificates) afterwards")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.pods < 1 or args.threads < 1:
        parser.error("--nodes, --pods and --threads must be 1 or more")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in NAMESPACES for p in phases) or len(set(phases)) != len(phases):
        parser.error(f"--phases {args.phases!r}: allowed baseline and flexai, comma-separated, each once")
    args.phase_list = phases
    return args


def write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"figures written to {path}")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_binaries()
    if missing:
        print(f"k8s_scale: missing {', '.join(missing)} in {binaries_dir()}: build them with "
              "`bash tests/k8s_real/build.sh` (needs Go)", file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    shapes, trace_info = draw_shapes(args.trace, args.pods, args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="k8s-scale-", dir="/tmp"))
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "pods": args.pods,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kubernetes_version": kubernetes_version(),
        "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "devices_per_node": DEVICES_PER_NODE,
        "pod_shapes": trace_info,
        "inventories": {
            "published_by": "this benchmark (PATCH of each Node's flexai.io/inventory, as NodeAgent.publish), "
                            "not by agent processes",
            "devices": SIM_DEVICES,
            "heartbeats_during_run": False,
            "extender_inventory_timeout_s": INVENTORY_TIMEOUT_S,
        },
        "webhook": "not run: pods are written as it leaves them (schedulerName flexai-scheduler)",
        "apiserver_args": list(APISERVER_ARGS),
        "extender_args": list(EXTENDER_ARGS),
    }  # fmt: skip
    log(f"k8s_scale: {args.nodes:,} nodes, {args.pods:,} pods per phase, phases {', '.join(args.phase_list)}; "
        f"workdir {workdir}")  # fmt: skip
    plane = ScalePlane(workdir, apiserver_args=APISERVER_ARGS)
    peak: dict[str, float] = {}
    wall_started = time.monotonic()
    code = 0
    try:
        started = time.monotonic()
        plane.start(controller_manager=True)
        plane.start_kwok()
        log(f"control plane up in {time.monotonic() - started:.1f} s (Kubernetes {kubernetes_version()})")
        for arg in plane.processes["kube-controller-manager"].argv:
            if arg.startswith("--controllers="):
                result["kube_controller_manager_controllers"] = arg.split("=", 1)[1].split(",")
        api = ApiClient(plane)
        result["setup"] = {"control_plane_s": round(time.monotonic() - started, 1)}
        result["setup"].update(setup_nodes(plane, api, node_names(args.nodes), args.threads))
        previous_holder = ""
        for phase in args.phase_list:
            namespace = NAMESPACES[phase]
            ensure_phase_namespace(plane, api, namespace)
            revision = plane.etcd_compact()
            log(f"{phase}: etcd compacted at revision {revision:,}")
            extender_port = None
            extender_cpu_before = 0.0
            if phase == "flexai":
                started = time.monotonic()
                extender_port = plane.start_extender(EXTENDER, *EXTENDER_ARGS)
                wait_extender_synced(plane, extender_port)
                log(f"flexai: extender synced in {time.monotonic() - started:.1f} s")
                result.setdefault("setup", {})["extender_sync_s"] = round(time.monotonic() - started, 1)
            score = args.baseline_node_score_percent if phase == "baseline" else None
            process, config = start_kube_scheduler(plane, phase, extender_port, score)
            started = time.monotonic()
            previous_holder = wait_leader(api, config, process, previous_holder)
            log(f"{phase}: {process.name} leads (ready) after {time.monotonic() - started:.1f} s")
            if phase == "flexai":
                extender_cpu_before = cpu_seconds(plane.processes[EXTENDER].pid)
            figures = run_phase(plane, api, phase, shapes, args.threads, args.stall_s, args.phase_timeout_s,
                                args.nodes)  # fmt: skip
            figures["kube_scheduler"] = {
                "scheduler_name": SCHEDULER_NAMES[phase],
                "percentage_of_nodes_to_score": config.get("percentageOfNodesToScore", "adaptive (default)"),
                "qps": (config.get("clientConnection") or {}).get("qps"),
                "burst": (config.get("clientConnection") or {}).get("burst"),
                "extender": bool(config.get("extenders")),
            }
            if phase == "flexai":
                used = cpu_seconds(plane.processes[EXTENDER].pid) - extender_cpu_before
                figures["extender_cpu_s"] = round(used, 2)
                figures["extender_cpu_s_per_pod"] = round(used / max(1, figures["bound"]), 5)
                figures["extender_metrics"] = extender_metrics(extender_port)
            result[phase] = figures
            for name, pid in component_pids(plane).items():
                peak[name] = round(max(peak.get(name, 0.0), peak_rss_mib(pid)), 1)
            if phase != args.phase_list[-1]:
                process.stop()
                figures["delete_pods_s"] = round(delete_phase_pods(api, namespace, args.threads), 1)
        for name, pid in component_pids(plane).items():
            peak[name] = round(max(peak.get(name, 0.0), peak_rss_mib(pid)), 1)
        peak["k8s_scale (this client)"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["peak_rss_mib"] = peak
        result["wall_s"] = round(time.monotonic() - wall_started, 1)
        summarize(result)
    except (BenchmarkError, ControlPlaneError, KeyboardInterrupt) as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        message = f"interrupted ({exc})" if isinstance(exc, KeyboardInterrupt) else str(exc)
        log(f"k8s_scale FAILED: {message}")
        result["error"] = message
        result["peak_rss_mib"] = peak
        for name, process in plane.processes.items():
            if not process.alive() and name not in message:
                log(f"{name} is not running; the end of its log:\n{process.tail(15)}")
    finally:
        log("stopping the control plane")
        plane.stop()
        if args.keep or args.workdir:
            log(f"kept {workdir} (logs in {workdir / 'logs'})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.json, result)
    if code == 0:
        print(json.dumps({k: result[k] for k in ("nodes", "pods", "flexai", "baseline") if k in result}, indent=2))
    return code


def summarize(result: dict) -> None:
    base, flex = result.get("baseline"), result.get("flexai")
    acceptance: dict[str, Any] = {}
    for phase, figures in (("baseline", base), ("flexai", flex)):
        if not figures:
            continue
        fit = min(result["pods"], figures["fit_best_fit_decreasing"])
        acceptance[f"{phase}_all_fitting_bound"] = figures["bound"] >= fit
        acceptance[f"{phase}_no_overgrant"] = figures["overgranted_devices"] == 0 and not figures.get(
            "placement_problems", 0
        )
        log(f"{phase}: {figures['bound']:,} bound ({fit:,} fit), {figures['pods_per_s']:.1f} pods/s, "
            f"p50 {figures['bind_latency_s']['p50']:.2f} s, p99 {figures['bind_latency_s']['p99']:.2f} s, "
            f"over-granted devices {figures['overgranted_devices']}")  # fmt: skip
    if base and flex and base["pods_per_s"]:
        ratio = flex["pods_per_s"] / base["pods_per_s"]
        result["flexai_over_baseline_pods_per_s"] = round(ratio, 3)
        acceptance["flexai_pods_per_s_at_least_half_baseline"] = ratio >= 0.5
        log(f"flexai / baseline pods/s: {ratio:.2f}")
    if flex and "extender_cpu_s_per_pod" in flex:
        log(f"extender CPU per pod: {flex['extender_cpu_s_per_pod'] * 1000:.1f} ms")
    result["acceptance"] = acceptance


if __name__ == "__main__":
    sys.exit(main())
