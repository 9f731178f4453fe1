"""kube-scheduler extender: filter, prioritize and bind over HTTP in kube-scheduler's wire format.

kube-scheduler (profile ``flexai-scheduler``) calls ``/filter`` with ExtenderArgs (``Pod`` plus ``Nodes``
or ``NodeNames``) and expects ExtenderFilterResult (``Nodes``/``NodeNames``, ``FailedNodes``,
``FailedAndUnresolvableNodes``, ``Error``); ``/prioritize`` answers a HostPriorityList (``Host``, ``Score``
0..10); ``/bind`` gets ExtenderBindingArgs (``PodName``, ``PodNamespace``, ``PodUID``, ``Node``), chooses
the devices with the engine, records them in the pod's ``flexai.io/placement`` annotation and binds through
the pods/binding subresource, answering ExtenderBindingResult (``Error``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from flexai.k8s import names
from flexai.k8s.cluster import KubeCluster, PodRequestError, pod_key, pod_request
from flexai.model import Request
from flexai.model.workload import WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, create_policy

MAX_EXTENDER_PRIORITY = 10


class KubeApi(Protocol):
    def get_pod(self, namespace: str, name: str) -> dict: ...
    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> dict: ...
    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None: ...
    def create_event(self, pod: dict, reason: str, message: str, kind: str = "Warning") -> None: ...


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _field(args: dict[str, Any], *names_: str) -> Any:
    """kube-scheduler sends its JSON tags (``pod``, ``nodes``, ``nodenames``, ``podName``...); Go field names
    (``Pod``, ``Nodes``, ``NodeNames``, ``PodName``...) are accepted too."""
    for name in names_:
        if name in args and args[name] is not None:
            return args[name]
    return None


def _candidates(args: dict[str, Any]) -> tuple[list[str], list[dict] | None]:
    node_names = _field(args, "nodenames", "NodeNames", "nodeNames")
    nodes = _field(args, "nodes", "Nodes")
    items = (nodes or {}).get("items") if nodes else None
    if node_names is not None:
        return list(node_names), None
    return [n["metadata"]["name"] for n in items or []], items or []


class Extender:
    def __init__(
        self,
        cluster: KubeCluster,
        api: KubeApi | None = None,
        policy: str = "flex",
        is_leader: Callable[[], bool] = lambda: True,
        bind_retries: int = 3,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.ready = ready
        self.cluster = cluster
        self.api = api
        self.policy_name = policy
        self.is_leader = is_leader
        self.bind_retries = bind_retries
        self.lock = threading.RLock()
        self._scheduler: Scheduler | None = None
        self._scheduler_version = -1
        self.warned: set[str] = set()
        from flexai.k8s.metrics import SchedulerMetrics

        self.prometheus = SchedulerMetrics()

    # ----------------------------------------------------------------- engine
    def _profile(self) -> WorkloadProfile:
        requests = []
        for pod in list(self.cluster.pods.values())[-2000:]:
            try:
                request = pod_request(pod)
            except PodRequestError:
                continue
            if request is not None:
                requests.append(request)
        if len(requests) < 10:
            requests += [Request(device_count=1, share_milli=s) for s in range(100, 1001, 100)]
        return WorkloadProfile.from_requests(requests, coverage=1.0)

    def scheduler(self) -> Scheduler | None:
        state = self.cluster.state
        if state is None:
            return None
        if self._scheduler is None or self._scheduler_version != self.cluster.version:
            policy = create_policy(self.policy_name, PolicyContext(profile=self._profile()))
            self._scheduler = Scheduler(state, policy)
            self._scheduler_version = self.cluster.version
        return self._scheduler

    def _count(self, result: str, verb: str = "filter") -> None:
        self.prometheus.attempts.labels(verb, result).inc()

    def refresh_gauges(self) -> None:
        """Per-device slices and share, and pending pods, for /metrics."""
        with self.lock:
            state = self.cluster.state
            pending = sum(
                1
                for p in self.cluster.pods.values()
                if not (p.get("spec") or {}).get("nodeName")
                and (p.get("spec") or {}).get("schedulerName") == names.SCHEDULER_NAME
            )
            self.prometheus.pending_pods.set(pending)
            if state is None:
                return
            slices = np.zeros_like(state.free_share_milli)
            for placement in state.grants.values():
                for d in placement.device_indices:
                    slices[placement.node_index, d] += 1
            for i, flex_node in enumerate(self.cluster.flex_nodes):
                for j, device in enumerate(flex_node.devices):
                    used = 1000 - int(state.free_share_milli[i, j])
                    self.prometheus.slices.labels(flex_node.name, str(device.index)).set(int(slices[i, j]))
                    self.prometheus.share.labels(flex_node.name, str(device.index)).set(used / 1000)

    # ----------------------------------------------------------------- filter
    def filter(self, args: dict[str, Any]) -> dict[str, Any]:
        pod = _field(args, "pod", "Pod") or {}
        candidates, _ = _candidates(args)
        if not self.ready():
            return self._filter_result(args, [], {}, {}, error="flexai scheduler is still loading the cluster; retry")
        try:
            request = pod_request(pod)
        except PodRequestError as exc:
            self._count("error")
            return self._filter_result(args, [], {}, {n: str(exc) for n in candidates}, error="")
        if request is None:
            return self._filter_result(args, candidates, {}, {})
        with self.lock:
            scheduler = self.scheduler()
            if scheduler is None:
                self._count("unschedulable")
                reasons = {n: self.cluster.problems.get(n, "no flexai node in the cluster") for n in candidates}
                return self._filter_result(args, [], reasons, {})
            masks = scheduler.filter_masks(request)
            feasible = np.logical_and.reduce(list(masks.values()))
            never = not feasible.any() and not scheduler.ever_fits(request)
        passed, failed, unresolvable = [], {}, {}
        for name in candidates:
            i = self.cluster.index_of.get(name)
            if i is None:
                unresolvable[name] = self.cluster.problems.get(name, "not a flexai node")
            elif feasible[i]:
                passed.append(name)
            else:
                why = [reason for key, reason in _REASONS.items() if not masks[key][i]]
                failed[name] = "flexai: " + ", ".join(why)
        if never:
            message = (
                f"pod asks for {request.device_count} x {request.share_milli}m share, "
                f"{request.device_memory_mib} MiB device memory"
                + (f" on {'|'.join(sorted(request.allowed_models))}" if request.allowed_models else "")
                + ": no flexai node could ever hold it"
            )
            unresolvable.update({n: message for n in failed})
            failed = {}
            self._warn_once(pod, "FlexaiUnschedulable", message)
        self._count("scheduled" if passed else "unschedulable")
        return self._filter_result(args, passed, failed, unresolvable)

    @staticmethod
    def _filter_result(
        args: dict[str, Any], passed: list[str], failed: dict[str, str], unresolvable: dict[str, str], error: str = ""
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"FailedNodes": failed, "FailedAndUnresolvableNodes": unresolvable, "Error": error}
        _, items = _candidates(args)
        if items is None:
            result["NodeNames"] = passed
            result["Nodes"] = None
        else:
            keep = set(passed)
            result["Nodes"] = {"items": [n for n in items if n["metadata"]["name"] in keep]}
            result["NodeNames"] = None
        return result

    def _warn_once(self, pod: dict, reason: str, message: str) -> None:
        key = pod_key(pod)
        if self.api is None or key in self.warned:
            return
        self.warned.add(key)
        try:
            self.api.create_event(pod, reason, message)
        except Exception:  # noqa: BLE001  (an event is best effort)
            self.warned.discard(key)

    # ----------------------------------------------------------------- prioritize
    def prioritize(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        pod = _field(args, "pod", "Pod") or {}
        candidates, _ = _candidates(args)
        try:
            request = pod_request(pod)
        except PodRequestError:
            request = None
        with self.lock:
            scheduler = self.scheduler() if request is not None else None
            if scheduler is None or request is None:
                return [{"Host": n, "Score": 0} for n in candidates]
            feasible = scheduler.feasible(request)
            raw = np.asarray(scheduler.policy.score(scheduler.state, request, feasible), dtype=float)
        indices = [self.cluster.index_of.get(n) for n in candidates]
        values = [raw[i] for i in indices if i is not None and feasible[i]]
        low, high = (min(values), max(values)) if values else (0.0, 0.0)
        out = []
        for name, i in zip(candidates, indices, strict=True):
            if i is None or not feasible[i]:
                score = 0
            elif high == low:
                score = MAX_EXTENDER_PRIORITY
            else:
                score = int(round(MAX_EXTENDER_PRIORITY * (raw[i] - low) / (high - low)))
            out.append({"Host": name, "Score": score})
        return out

    # ----------------------------------------------------------------- bind
    def bind(self, args: dict[str, Any]) -> dict[str, str]:
        namespace = _field(args, "podNamespace", "PodNamespace") or "default"
        name = _field(args, "podName", "PodName") or ""
        uid = _field(args, "podUID", "PodUID") or ""
        node = _field(args, "node", "Node") or ""
        if not self.ready():
            return {"Error": "flexai scheduler is still loading the cluster; retry"}
        if not self.is_leader():
            return {"Error": "this flexai scheduler replica is not the leader; retry"}
        if self.api is None:
            return {"Error": "no API server connection"}
        try:
            pod = self.api.get_pod(namespace, name)
        except ApiError as exc:
            self._count("error")
            return {"Error": f"cannot read pod {namespace}/{name}: {exc}"}
        if uid and pod.get("metadata", {}).get("uid") not in (None, uid):
            return {"Error": f"pod {namespace}/{name} has uid {pod['metadata'].get('uid')}, not {uid}"}
        try:
            request = pod_request(pod)
        except PodRequestError as exc:
            return {"Error": str(exc)}
        annotations: dict[str, str] = {}
        key = pod_key(pod)
        with self.lock:
            scheduler = self.scheduler()
            if request is not None:
                if scheduler is None or node not in self.cluster.index_of:
                    return {"Error": f"node {node} is not a flexai node: {self.cluster.problems.get(node, 'unknown')}"}
                index = self.cluster.index_of[node]
                state = scheduler.state
                state.unreserve(key)  # a retried bind must not hold two placements
                if not scheduler.feasible(request)[index]:
                    self._count("unschedulable")
                    return {"Error": f"pod {namespace}/{name} no longer fits on {node}"}
                devices = scheduler.policy.select_devices(state, request, index)
                from flexai.model import Placement

                placement = Placement.for_request(request, index, devices)
                state.reserve(key, placement)
                self.cluster.in_flight[key] = (node, placement)
                flex_node = self.cluster.flex_nodes[index]
                grant = names.Placement(
                    node=node,
                    slices=tuple(
                        names.SliceGrant(
                            flex_node.devices[d].index,
                            flex_node.devices[d].uuid,
                            request.share_milli,
                            request.device_memory_mib,
                        )
                        for d in devices
                    ),
                )
                annotations[names.ANNOTATION_PLACEMENT] = grant.to_json()
                annotations[names.ANNOTATION_BOUND_AT] = f"{time.time():.6f}"
        error = self._annotate_and_bind(namespace, name, uid, node, annotations)
        with self.lock:
            if error:
                if self.cluster.state is not None:
                    self.cluster.state.unreserve(key)
                self._count("error", "bind")
                return {"Error": error}
            bound = dict(pod)
            bound.setdefault("metadata", {}).setdefault("annotations", {})
            bound["metadata"] = {
                **bound["metadata"],
                "annotations": {**bound["metadata"]["annotations"], **annotations},
            }
            bound["spec"] = {**(bound.get("spec") or {}), "nodeName": node}
            self.cluster.pods[key] = bound
        self._count("scheduled", "bind")
        return {"Error": ""}

    def _annotate_and_bind(self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]) -> str:
        assert self.api is not None
        last = ""
        for _ in range(self.bind_retries):
            try:
                if annotations:
                    self.api.annotate_pod(namespace, name, annotations)
                self.api.bind_pod(namespace, name, uid, node)
                return ""
            except ApiError as exc:
                last = str(exc)
                if exc.status == 409:
                    # Already bound? Then it is done if it went where we placed it.
                    try:
                        current = self.api.get_pod(namespace, name)
                    except ApiError:
                        continue
                    bound_to = (current.get("spec") or {}).get("nodeName")
                    if bound_to == node:
                        return ""
                    if bound_to:
                        return f"pod {namespace}/{name} is bound elsewhere ({bound_to}): {last}"
                    continue  # a conflict that left the pod unbound (e.g. a concurrent update): try again
                if exc.status < 500:
                    return f"cannot bind pod {namespace}/{name}: {last}"
        return f"cannot bind pod {namespace}/{name} after {self.bind_retries} tries: {last}"


_REASONS = {
    "resources-fit": "not enough free CPU or memory",
    "device-model": "no allowed device model",
    "device-fit": "not enough free device share or memory",
}


def create_extender_app(extender: Extender):  # noqa: ANN201
    from fastapi import Body, FastAPI

    app = FastAPI(title="flexai scheduler extender")

    from fastapi.responses import Response

    from flexai.k8s.metrics import CONTENT_TYPE_LATEST, generate_latest

    latency = extender.prometheus.latency

    # Plain (not async) handlers: FastAPI runs them in its thread pool, so a slow API server during bind
    # does not stall the other verbs.
    @app.post("/filter")
    def filter_(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        with latency.labels("filter").time():
            return extender.filter(body)

    @app.post("/prioritize")
    def prioritize(body: dict[str, Any] = Body(...)) -> list[dict[str, Any]]:  # noqa: B008
        with latency.labels("prioritize").time():
            return extender.prioritize(body)

    @app.post("/bind")
    def bind(body: dict[str, Any] = Body(...)) -> dict[str, str]:  # noqa: B008
        with latency.labels("bind").time():
            return extender.bind(body)

    @app.get("/metrics")
    def metrics() -> Response:
        extender.refresh_gauges()
        return Response(generate_latest(extender.prometheus.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
