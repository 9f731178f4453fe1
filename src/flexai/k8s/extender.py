"""kube-scheduler extender: filter, prioritize and bind over HTTP in kube-scheduler's wire format.

kube-scheduler (profile ``flexai-scheduler``, ``nodeCacheCapable: true``) calls ``/filter`` with ExtenderArgs
(``pod`` and ``nodenames``; full ``nodes`` are accepted too) and expects ExtenderFilterResult (``NodeNames``,
``FailedNodes``, ``FailedAndUnresolvableNodes``, ``Error``); ``/prioritize`` answers a HostPriorityList (``Host``,
``Score`` 0..10); ``/bind`` gets ExtenderBindingArgs (``podName``, ``podNamespace``, ``podUID``, ``node``) and
answers ExtenderBindingResult (``Error``). The node list kube-scheduler sends only says which nodes its own
filters passed: what the nodes hold is the extender's own view (``KubeCluster``, from list+watch).

**Assume, then bind.** kube-scheduler decides one pod at a time but binds in the background, so the next
decision can come before the previous bind. ``prioritize`` therefore ranks the nodes, chooses the devices on
the best one and holds them for the pod (an *assumed* hold, ``assume_ttl_s``, default 30 s), giving that node
the only top score; filter and prioritize for the pods that follow see the hold. ``bind`` turns the assumption
into the pod's placement when kube-scheduler binds to that node (and places afresh on another node, after
dropping the assumption, if it chose another one); a failed bind drops it, and an assumption that no bind
follows expires.

**Bind** writes the placement (``flexai.io/placement``: the slices and their split per container) and
``flexai.io/bound-at`` in the Binding's ``metadata.annotations``; the API server copies them onto the pod as
it binds it, so the extender needs no right to patch pods.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from starlette.requests import Request as HttpRequest

from flexai.hi import HiConfig, QueueSpec, remote_choice
from flexai.k8s import names
from flexai.k8s.cluster import (
    ElasticState,
    Hold,
    KubeCluster,
    PodDemand,
    PodRequestError,
    expand_models,
    layout,
    pod_demand,
    pod_key,
    slim_pod,
)
from flexai.k8s.hibridge import Eviction, HiBridge
from flexai.model import Request
from flexai.model.workload import WorkloadProfile
from flexai.scheduler import Policy, PolicyContext, Scheduler, create_policy

log = logging.getLogger(__name__)

MAX_EXTENDER_PRIORITY = 10
ASKED_WITHIN_S = 30.0
"""The extender nominates ahead of kube-scheduler only if kube-scheduler asked it (filter) this recently: with
several scheduler pods and the extender as a sidecar without a Lease of its own, only the leading
kube-scheduler's sidecar is asked, and only its nominations agree with the binds."""
DEFAULT_ASSUME_TTL_S = 30.0


class KubeApi(Protocol):
    def get_pod(self, namespace: str, name: str) -> dict: ...
    def bind_pod(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str] | None = None
    ) -> None: ...
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
        return node_names if isinstance(node_names, list) else list(node_names), None
    return [n["metadata"]["name"] for n in items or []], items or []


def rebind_keeping_cache(policy: Policy, state: ElasticState) -> None:
    """Let the policy re-read its per-node tables after rows were rewritten, keeping its score cache: the
    rewritten rows' versions moved, so only they are scored again."""
    cache = getattr(policy, "cache", None)
    policy.bind_state(state)
    if cache is not None and getattr(policy, "cache", None) is not None and getattr(cache, "state", None) is state:
        policy.cache = cache  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=256)
def _engine_request(demand: PodDemand) -> Request:
    """The engine's request for a demand (shared: pods of one shape score alike)."""
    return demand.engine_request()


class _NodeList:
    """A candidate list kube-scheduler sent and the rows of its nodes (-1: no row)."""

    def __init__(self, stamp: tuple[int, int], names: list[str], rows: np.ndarray) -> None:
        self.stamp = stamp
        self.names = names
        self.rows = rows
        self._array: np.ndarray | None = None

    def names_array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.empty(len(self.names), dtype=object)
            self._array[:] = self.names
        return self._array


class Extender:
    def __init__(
        self,
        cluster: KubeCluster,
        api: KubeApi | None = None,
        policy: str = "flex",
        is_leader: Callable[[], bool] = lambda: True,
        bind_retries: int = 3,
        ready: Callable[[], bool] = lambda: True,
        assume_ttl_s: float = DEFAULT_ASSUME_TTL_S,
        per_device_metrics_limit: int = 4096,
        hi: bool = False,
        hi_config: HiConfig | None = None,
        queues: list[QueueSpec] | None = None,
    ) -> None:
        self.ready = ready
        self.cluster = cluster
        self.api = api
        self.policy_name = policy
        self.is_leader = is_leader
        self.bind_retries = bind_retries
        self.assume_ttl_s = assume_ttl_s
        self.per_device_metrics_limit = per_device_metrics_limit
        self.lock = threading.RLock()
        self._nominating: set[str] = set()
        """Pods whose status.nominatedNodeName is being written now (each once at a time)."""
        self._nominators: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.last_asked_s = -math.inf
        """When kube-scheduler last called filter (time.monotonic)."""
        self._scheduler: Scheduler | None = None
        self._scheduler_version = -1
        self._layout_version = -1
        self._lists: list[_NodeList] = []
        self._pieces: tuple[tuple[int, int], np.ndarray] | None = None
        self._last_masks: tuple[tuple, dict[str, np.ndarray]] | None = None
        self._last_demand: tuple[tuple, PodDemand | None] | None = None
        self.args = ArgsReader()
        """Reads ExtenderArgs, remembering the node-name lists it has seen or written."""
        self.warned: set[str] = set()
        self._serves: tuple[tuple[int, int], np.ndarray] | None = None
        from flexai.k8s.metrics import SchedulerMetrics

        self.prometheus = SchedulerMetrics()
        self.bridge: HiBridge | None = None
        """With ``hi``: workload decisions (order, preemption, quotas, gangs) through ``flexai.hi``."""
        if hi:
            self.bridge = HiBridge(
                cluster, policy, hi_config, queues, profile=self._profile, assume_ttl_s=assume_ttl_s or 30.0
            )

    # ----------------------------------------------------------------- engine
    def _profile(self) -> WorkloadProfile:
        requests = list(self.cluster.recent)
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
            self._layout_version = self.cluster.layout_version
        elif self._layout_version != self.cluster.layout_version:
            rebind_keeping_cache(self._scheduler.policy, state)
            self._layout_version = self.cluster.layout_version
        return self._scheduler

    def _count(self, result: str, verb: str = "filter") -> None:
        self.prometheus.attempts.labels(verb, result).inc()

    # ----------------------------------------------------------------- masks
    @staticmethod
    def _memory_need(state: ElasticState, demand: PodDemand, rows: Any = slice(None)) -> np.ndarray | int:
        if demand.memory_pct:
            return state.capacity_device_memory_mib[rows] * demand.memory_pct // 100
        return demand.memory_mib

    def _device_fit(self, state: ElasticState, demand: PodDemand, rows: Any = slice(None), empty: bool = False):  # noqa: ANN202
        """(rows, devices) mask: devices with the demand's share and memory free (of their capacity if empty)."""
        share = state.capacity_share_milli if empty else state.free_share_milli
        memory = state.capacity_device_memory_mib if empty else state.free_device_memory_mib
        fits = share[rows] >= demand.share_milli
        need = self._memory_need(state, demand, rows)
        if demand.memory_pct or demand.memory_mib:
            fits &= (memory[rows] >= need) | ~state.device_memory_known[rows, None]
        return fits & state.device_present[rows]

    def _masks(self, state: ElasticState, demand: PodDemand, empty: bool = False) -> dict[str, np.ndarray]:
        cpu = state.capacity_cpu_milli if empty else state.free_cpu_milli
        memory = state.capacity_host_memory_mib if empty else state.free_host_memory_mib
        allowed = expand_models(demand.models, state.model_names)
        if allowed is None:
            model = state.device_count > 0
        elif allowed:
            model = state.model_mask(allowed)
        else:
            model = np.zeros(state.node_count, dtype=bool)
        return {
            "resources-fit": (cpu >= demand.cpu_milli) & (memory >= demand.host_memory_mib),
            "device-model": model,
            "device-fit": self._device_fit(state, demand, empty=empty).sum(axis=1) >= demand.count,
        }

    def _cached_masks(self, state: ElasticState, demand: PodDemand, key: str) -> dict[str, np.ndarray]:
        """``_masks``, kept from filter for the prioritize of the same pod while nothing changed in between."""
        stamp = (key, demand, self.cluster.version, self.cluster.layout_version, int(state.node_version.sum()))
        if self._last_masks is not None and self._last_masks[0] == stamp:
            return self._last_masks[1]
        masks = self._masks(state, demand)
        self._last_masks = (stamp, masks)
        return masks

    def _demand(self, pod: dict) -> PodDemand | None:
        """The pod's demand; filter, prioritize and bind read the same pod version: parsed once."""
        meta = pod.get("metadata") or {}
        version = (meta.get("uid"), meta.get("resourceVersion"), meta.get("name"), meta.get("namespace"))
        if version[0] and version[1] and self._last_demand is not None and self._last_demand[0] == version:
            return self._last_demand[1]
        demand = pod_demand(pod)
        self._last_demand = (version, demand)
        return demand

    # ----------------------------------------------------------------- filter
    def filter(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._filter(args)[0]

    def _filter(self, args: dict[str, Any]) -> tuple[dict[str, Any], tuple[_NodeList, np.ndarray] | None]:
        """The ExtenderFilterResult, and the candidate list with its pass mask when the extender decided."""
        pod = _field(args, "pod", "Pod") or {}
        candidates, _ = _candidates(args)
        self.last_asked_s = time.monotonic()
        if not self.ready():
            error = "flexai scheduler is still loading the cluster; retry"
            return self._filter_result(args, [], {}, {}, error=error), None
        try:
            demand = self._demand(pod)
        except PodRequestError as exc:
            self._count("error")
            return self._filter_result(args, [], {}, {n: str(exc) for n in candidates}, error=""), None
        if demand is None:
            return self._filter_result(args, candidates, {}, {}), None
        if demand.remote:
            return self._filter_remote(args, pod, demand, candidates), None
        if self.bridge is not None:
            return self._filter_hi(args, pod, candidates), None
        cluster = self.cluster
        with self.lock:
            cluster.forget(pod_key(pod), kinds=("assumed",))  # a new cycle: its own assumption must not block it
            state = cluster.state
            if state is None or self.scheduler() is None:
                self._count("unschedulable")
                reasons = {n: cluster.node_problem(n) or "no flexai node in the cluster" for n in candidates}
                return self._filter_result(args, [], reasons, {}), None
            live = cluster.live
            masks = self._cached_masks(state, demand, pod_key(pod))
            feasible = np.logical_and.reduce(list(masks.values())) & live
            never = not feasible.any() and not self._ever_fits(state, demand, cluster.has_node)
            listed = self._node_list(candidates)
            rows = listed.rows
            known = rows >= 0
            ok = np.zeros(len(candidates), dtype=bool)
            ok[known] = feasible[rows[known]]
            passed = listed.names_array()[ok].tolist()
            unresolvable: dict[str, str] = {}
            placeable = known.copy()
            placeable[known] = live[rows[known]]
            for i in np.flatnonzero(~placeable).tolist():
                unresolvable[candidates[i]] = cluster.node_problem(candidates[i]) or "not a flexai node"
            # The other refusals, named by which filters refused (a code per node, one string per code).
            refused = placeable & ~ok
            codes = sum((~masks[key]).astype(np.int64) << k for k, key in enumerate(_REASONS))
            failed = dict(
                zip(
                    listed.names_array()[refused].tolist(),
                    _REASON_TEXT[codes[rows[refused]]].tolist(),
                    strict=True,
                )
            )
        if never:
            size = f"{demand.memory_pct} % of the device memory" if demand.memory_pct else f"{demand.memory_mib} MiB"
            message = (
                f"pod asks for {demand.count} x {demand.share_milli}m share, {size} device memory"
                + (f" on {'|'.join(demand.models)}" if demand.models else "")
                + ": no flexai node could ever hold it"
            )
            unresolvable.update({n: message for n in failed})
            failed = {}
            self._warn_once(pod, "FlexaiUnschedulable", message)
        self._count("scheduled" if passed else "unschedulable")
        with self.lock:  # kube-scheduler sends the nodes that passed to prioritize next: keep their rows
            self._lists = [_NodeList(listed.stamp, passed, rows[ok]), *self._lists[:3]]
        return self._filter_result(args, passed, failed, unresolvable), (listed, ok)

    def _filter_hi(self, args: dict[str, Any], pod: dict, candidates: list[str]) -> dict[str, Any]:
        """Filter through the Hi Scheduler: only the node it placed the pod on passes; a waiting pod gets its
        reason on every node. Evictions it decided are carried out (outside the lock)."""
        assert self.bridge is not None
        key = pod_key(pod)
        with self.lock:
            if key not in self.cluster.pods:
                self.cluster.upsert_pod(pod)  # filter may come before the watch shows the pod
            decision = self.bridge.decide(key)
        if decision.evictions and self._evict(decision.evictions) and not decision.node:
            with self.lock:
                if key not in self.bridge.nominated:
                    reason = self.bridge.hi.reason(key) if self.bridge.hi is not None else ""
                    decision.reason = "an eviction for it was refused (PodDisruptionBudget); " + (reason or "it waits")
        if decision.node and decision.node in candidates:
            self._count("scheduled")
            failed = {n: f"flexai: placed on {decision.node}" for n in candidates if n != decision.node}
            return self._filter_result(args, [decision.node], failed, {})
        reason = decision.reason
        if decision.node:
            # kube-scheduler samples nodes (percentageOfNodesToScore) and Hi placed the pod on its whole view:
            # nominating the node makes kube-scheduler's next attempt try that node alone, first.
            self._count("nominated")
            reason = self._nominate(pod, decision.node)
        else:
            self._count("unschedulable")
        text = "flexai: " + reason
        if decision.unresolvable:
            self._warn_once(pod, "FlexaiUnschedulable", reason)
            return self._filter_result(args, [], {}, {n: text for n in candidates})
        return self._filter_result(args, [], {n: text for n in candidates}, {})

    def _nominate(self, pod: dict, node: str) -> str:
        """Have ``node`` written into the pod's ``status.nominatedNodeName`` (unless it is there already), in the
        background: filter runs on the event loop and must not wait on the API server. The reason kube-scheduler
        records for this attempt."""
        where = f"placed on {node}, which is not among the nodes kube-scheduler sampled"
        if (pod.get("status") or {}).get("nominatedNodeName") == node:
            return where + f"; nominated there already (kube-scheduler's filters may refuse {node})"
        meta = pod.get("metadata") or {}
        if not meta.get("name") or getattr(self.api, "nominate_pod", None) is None:
            return where
        self._submit_publish(pod_key(pod), meta.get("namespace") or "default", meta["name"], node)
        return where + "; nominating it there, so kube-scheduler tries it first next time"

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self.lock:
            if self._closed:
                raise RuntimeError("the extender is closed")
            if self._nominators is None:
                # Several at once: one PATCH at a time falls behind a burst of arrivals on a loaded API server.
                self._nominators = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="flexai-nominate")
            return self._nominators

    def _submit_publish(self, key: str, namespace: str, name: str, node: str) -> concurrent.futures.Future | None:
        with self.lock:
            if key in self._nominating or (self.bridge is not None and self.bridge.published.get(key) == node):
                return None
            self._nominating.add(key)
        try:
            return self._executor().submit(self._publish, key, namespace, name, node)
        except RuntimeError:  # shut down
            with self.lock:
                self._nominating.discard(key)
            return None

    def _publish(self, key: str, namespace: str, name: str, node: str) -> str:
        """PATCH the pod's ``status.nominatedNodeName`` to ``node`` (outside the lock); '' or what went wrong."""
        try:
            self.api.nominate_pod(namespace, name, node)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001  (the next pass or attempt nominates again)
            if not (isinstance(exc, ApiError) and exc.status == 404):  # 404: the pod is gone
                log.warning("nominating %s for %s/%s: %s", node, namespace, name, exc)
            return str(exc)
        else:
            self._count("nominated", "nominate")
            with self.lock:
                if self.bridge is not None and key in self.bridge.nominated:
                    self.bridge.published[key] = node
            return ""
        finally:
            with self.lock:
                self._nominating.discard(key)

    def nominate_pending(self) -> int:
        """Run a Hi cycle now and tell kube-scheduler where Hi placed the pending pods before it gets to them:
        each pod's ``status.nominatedNodeName``, which kube-scheduler evaluates alone before sampling nodes. So a
        pod's first attempt already looks at Hi's node (no refused attempt, no backoff). Only the leader does it,
        and only while kube-scheduler calls this replica (``ASKED_WITHIN_S``);
        evictions the cycle decided are carried out as filter would. Returns how many pods were nominated."""
        if self.bridge is None or getattr(self.api, "nominate_pod", None) is None:
            return 0
        if not self.ready() or not self.is_leader() or time.monotonic() - self.last_asked_s > ASKED_WITHIN_S:
            return 0
        with self.lock:
            evictions = self.bridge.cycle()
            todo = self.bridge.unpublished()
        if evictions:
            self._evict(evictions)
        futures = [f for f in (self._submit_publish(*item) for item in todo) if f is not None]
        return sum(1 for f in futures if not f.result())

    def close(self) -> None:
        """Stop the background writers (what is queued is dropped; the next leader nominates again)."""
        with self.lock:
            executor, self._nominators, self._closed = self._nominators, None, True
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _evict(self, evictions: list[Eviction]) -> bool:
        """Evict the victims through the Eviction API (PodDisruptionBudgets hold); a refusal rolls back the
        preemption of its preemptor (see ``flexai.k8s.hibridge``)."""
        assert self.bridge is not None
        done: list[Eviction] = []
        refused: list[Eviction] = []
        refused_by: set[str] = set()
        evict = getattr(self.api, "evict_pod", None)
        for eviction in evictions:
            if eviction.by in refused_by or evict is None:
                refused.append(eviction)  # its preemption is rolled back: keep the other victims too
                continue
            try:
                evict(eviction.namespace, eviction.name)
            except ApiError as exc:
                if exc.status != 404:  # 404: gone already
                    refused.append(eviction)
                    refused_by.add(eviction.by)
                    continue
            done.append(eviction)
            if self.api is not None:
                try:
                    target = {"metadata": {"name": eviction.name, "namespace": eviction.namespace}}
                    self.api.create_event(target, "FlexaiPreempted", eviction.reason, "Normal")
                except Exception:  # noqa: BLE001  (an event is best effort)
                    pass
        with self.lock:
            self.bridge.evicted(done)
            if refused:
                self.bridge.refused(refused, self.cluster.clock())
        return bool(refused)

    def _ever_fits(self, state: ElasticState, demand: PodDemand, nodes: np.ndarray) -> bool:
        """Would the pod fit on one of ``nodes`` if it were empty? (False: waiting will never help; a node whose
        agent is silent counts, as it may come back.)"""
        return bool((np.logical_and.reduce(list(self._masks(state, demand, empty=True).values())) & nodes).any())

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
        listed, scores = self._prioritize(args)
        return [{"Host": name, "Score": score} for name, score in zip(listed.names, scores.tolist(), strict=True)]

    def prioritize_json(self, args: dict[str, Any]) -> str:
        """``prioritize``'s HostPriorityList as JSON text, picked from each node's 11 possible entries (5,000 dicts
        through ``json.dumps`` took longer than the decision itself)."""
        listed, scores = self._prioritize(args)
        with self.lock:
            table = self._json_pieces()
        rows = listed.rows
        known = rows >= 0
        pieces = table[1 + scores, np.where(known, rows, 0)]
        for i in np.flatnonzero(~known).tolist():
            pieces[i] = '{"Host":' + json.dumps(listed.names[i]) + ',"Score":0}'
        return "[" + ",".join(pieces.tolist()) + "]"

    def filter_json(self, args: dict[str, Any]) -> str:
        """``filter``'s ExtenderFilterResult as JSON text (the node names from the list's cached JSON)."""
        result, decided = self._filter(args)
        if result.get("NodeNames") is None or decided is None:
            return json.dumps(result, separators=(",", ":"))
        listed, ok = decided
        with self.lock:
            table = self._json_pieces()
        rest = json.dumps({k: v for k, v in result.items() if k != "NodeNames"}, separators=(",", ":"))
        passed = "[" + ",".join(table[0, listed.rows[ok]].tolist()) + "]"
        # kube-scheduler sends these names back to prioritize, encoded the same way: parse them from memory.
        self.args.remember(passed.encode(), result["NodeNames"])
        return '{"NodeNames":' + passed + "," + rest[1:]

    def _json_pieces(self) -> np.ndarray:
        """(12, rows) JSON pieces per row of the view: the node's name as a JSON string, then its HostPriority
        for each score 0..10; made again when rows change."""
        stamp = (self.cluster.version, self.cluster.layout_version)
        if self._pieces is None or self._pieces[0] != stamp:
            names_ = [json.dumps(f.name) if f is not None else '""' for f in self.cluster.flex_nodes]
            heads = ['{"Host":' + q + ',"Score":' for q in names_]
            table = np.empty((1 + len(_SCORE_TAIL), len(names_)), dtype=object)
            table[0] = names_
            for k, tail in enumerate(_SCORE_TAIL):
                table[1 + k] = [h + tail for h in heads]
            self._pieces = (stamp, table)
        return self._pieces[1]

    def _prioritize(self, args: dict[str, Any]) -> tuple[_NodeList, np.ndarray]:
        pod = _field(args, "pod", "Pod") or {}
        candidates, _ = _candidates(args)
        zeros = np.zeros(len(candidates), dtype=np.int64)
        try:
            demand = self._demand(pod)
        except PodRequestError:
            return self._node_list(candidates), zeros
        if demand is None or not self.ready():
            return self._node_list(candidates), zeros
        cluster = self.cluster
        key = pod_key(pod)
        if demand.remote:
            return self._prioritize_remote(key, demand, candidates)
        if self.bridge is not None:
            with self.lock:
                node = self.bridge.nominated_node(key)
            listed = self._node_list(candidates)
            return listed, np.array([MAX_EXTENDER_PRIORITY if n == node else 0 for n in candidates], dtype=np.int64)
        with self.lock:
            cluster.forget(key, kinds=("assumed",))
            state = cluster.state
            scheduler = self.scheduler()
            if state is None or scheduler is None:
                return self._node_list(candidates), zeros
            masks = self._cached_masks(state, demand, key)
            feasible = np.logical_and.reduce(list(masks.values())) & cluster.live
            listed = self._node_list(candidates)
            rows = listed.rows
            known = rows >= 0
            consider = np.zeros(state.node_count, dtype=bool)
            consider[rows[known]] = True
            consider &= feasible
            if not consider.any():
                return self._node_list(candidates), zeros
            raw = np.asarray(scheduler.policy.score(state, _engine_request(demand), consider), dtype=float)
            index = np.flatnonzero(consider)
            n = state.node_count
            rank = raw[index] * n + (n - 1 - index)  # ties to the lowest row, as the engine does
            best = int(index[int(np.argmax(rank))])
            if self.assume_ttl_s > 0:
                hold = self._plan(scheduler, state, demand, best, key, "assumed")
                if hold is not None:
                    hold.deadline = cluster.clock() + self.assume_ttl_s
                    cluster.hold(key, hold)
        # The node held for the pod is the only top score (10); the other feasible nodes share 0..9.
        values = raw[index]
        low, high = float(values.min()), float(values.max())
        top = MAX_EXTENDER_PRIORITY - 1
        scaled = np.full(state.node_count, top, dtype=np.int64)
        if high > low:
            scaled = np.rint(top * (raw - low) / (high - low)).astype(np.int64)
        scaled[~consider] = 0
        scaled[best] = MAX_EXTENDER_PRIORITY
        return listed, np.where(known, scaled[np.where(known, rows, 0)], 0)

    def _node_list(self, candidates: list[str]) -> _NodeList:
        """The rows of the candidate nodes (-1: none). kube-scheduler sends the same list call after call: the
        last lists are kept (with their JSON pieces) while the rows stay as they were."""
        stamp = (self.cluster.version, self.cluster.layout_version)
        for i, listed in enumerate(self._lists):
            same = listed.names is candidates or (len(listed.names) == len(candidates) and listed.names == candidates)
            if listed.stamp == stamp and same:
                self._lists.insert(0, self._lists.pop(i))
                return listed
        index_of = self.cluster.index_of
        listed = _NodeList(stamp, candidates, np.array([index_of.get(n, -1) for n in candidates], dtype=np.int64))
        self._lists = [listed, *self._lists[:3]]  # filter's and prioritize's lists
        return listed

    def _plan(
        self, scheduler: Scheduler, state: ElasticState, demand: PodDemand, row: int, key: str, kind: str
    ) -> Hold | None:
        """The devices the pod gets on ``row`` and its placement, as a hold (None when it does not fit)."""
        fits = self._device_fit(state, demand, row)
        devices: list[int] | None = None
        if demand.engine_exact:
            chosen = [int(d) for d in scheduler.policy.select_devices(state, _engine_request(demand), row)]
            if len(set(chosen)) == demand.count and all(fits[d] for d in chosen):
                devices = chosen
        if devices is None:  # tightest fit: the fitting devices with the least free share first
            columns = np.flatnonzero(fits)
            order = np.lexsort((columns, state.free_share_milli[row, columns]))
            devices = [int(c) for c in columns[order][: demand.count]]
        if len(devices) < demand.count:
            return None
        flex = self.cluster.flex_nodes[row]
        assert flex is not None
        memory = demand.memory_mib
        if demand.memory_pct:
            memory = int(state.capacity_device_memory_mib[row, devices[0]]) * demand.memory_pct // 100
        ordered, containers = layout(demand, [flex.devices[d].uuid for d in devices])
        slices = tuple(
            names.SliceGrant(flex.devices[flex.by_uuid[u]].index, u, demand.share_milli, memory) for u in ordered
        )
        placement = names.Placement(flex.name, slices, containers)
        return Hold(
            kind, flex.name, ordered, demand.share_milli, memory, demand.cpu_milli, demand.host_memory_mib,
            placement=placement,
        )  # fmt: skip

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
        cluster = self.cluster
        key = uid or f"{namespace}/{name}"
        with self.lock:
            record = cluster.pods.get(key)
        if record is None or record.name != name or record.namespace != namespace:
            try:
                pod = self.api.get_pod(namespace, name)
            except ApiError as exc:
                self._count("error", "bind")
                return {"Error": f"cannot read pod {namespace}/{name}: {exc}"}
            if uid and pod.get("metadata", {}).get("uid") not in (None, uid):
                return {"Error": f"pod {namespace}/{name} has uid {pod['metadata'].get('uid')}, not {uid}"}
            record = slim_pod(pod)
            key = record.key
        if record.error:
            return {"Error": record.error}
        demand = record.demand
        annotations: dict[str, str] = {}
        with self.lock:
            if demand is not None and demand.remote:
                error = self._bind_remote(record, key, node, annotations)
                if error:
                    self._count("unschedulable", "bind")
                    return {"Error": error}
            elif demand is not None:
                state = cluster.state
                scheduler = self.scheduler()
                row = cluster.index_of.get(node)
                if state is None or scheduler is None or row is None:
                    return {"Error": f"node {node} is not a flexai node: {cluster.node_problem(node) or 'unknown'}"}
                hold = cluster.holds.get(key)
                if hold is not None and hold.kind == "assumed" and hold.node == node and cluster.applied(key):
                    cluster.promote(key)
                elif self.bridge is not None:
                    placed = self.bridge.nominated_node(key)
                    if placed != node:
                        where = f"on {placed}" if placed else "nowhere yet"
                        error = f"pod {namespace}/{name}: the flexai scheduler placed it {where}, not on {node}"
                        return {"Error": error}
                    cluster.forget(key)
                    hold = self.bridge.hold_for(key, self.bridge.nominated[key].placement, "binding")
                    if hold is None or not cluster.hold(key, hold):
                        self._count("unschedulable", "bind")
                        return {"Error": f"pod {namespace}/{name}: its slices on {node} are not free yet"}
                else:
                    cluster.forget(key)  # assumed elsewhere, or a retried bind: never two holds
                    problem = cluster.node_problem(node)
                    masks = self._masks(state, demand)
                    hold = None
                    if not problem and all(m[row] for m in masks.values()):
                        hold = self._plan(scheduler, state, demand, row, key, "binding")
                    if hold is None or not cluster.hold(key, hold):
                        self._count("unschedulable", "bind")
                        why = f": {problem}" if problem else ""
                        return {"Error": f"pod {namespace}/{name} no longer fits on {node}{why}"}
                assert hold.placement is not None
                annotations[names.ANNOTATION_PLACEMENT] = hold.placement.to_json()
                annotations[names.ANNOTATION_BOUND_AT] = f"{time.time():.6f}"
        error = self._bind(namespace, name, uid, node, annotations)
        if error:
            with self.lock:
                cluster.forget(key, kinds=("binding",))
            self._count("error", "bind")
            return {"Error": error}
        self._count("scheduled", "bind")
        return {"Error": ""}

    # ----------------------------------------------------------------- remote slices
    def _serving(self) -> np.ndarray:
        """Per row: the node's agent serves remote leases (its inventory advertises an endpoint)."""
        stamp = (self.cluster.version, self.cluster.layout_version)
        if self._serves is None or self._serves[0] != stamp:
            flags = [f is not None and bool(f.inventory.remote_endpoint) for f in self.cluster.flex_nodes]
            self._serves = (stamp, np.array(flags, dtype=bool))
        return self._serves[1]

    def _remote_rows(self, state: ElasticState, demand: PodDemand, empty: bool = False) -> np.ndarray:
        """Per row: a node serving remote leases with a device the remote slice fits on (live, unless ``empty``:
        would it fit there if the node were empty?)."""
        ok = np.logical_and.reduce(list(self._masks(state, demand, empty=empty).values())) & self._serving()
        return ok & (self.cluster.has_node if empty else self.cluster.live)

    def _remote_scores(self, state: ElasticState, demand: PodDemand, candidates: list[str]) -> np.ndarray:
        """Scores of the nodes the pod itself may run on: 10 where a local slice fits, then by the distance to the
        nearest node with a free slice (same rack 7, same zone 4, elsewhere 1); 0 for all when none is free."""
        cluster = self.cluster
        fit = self._remote_rows(state, demand)
        scores = np.zeros(len(candidates), dtype=np.int64)
        rows = np.flatnonzero(fit)
        if not len(rows):
            return scores
        near: dict[str, set[str]] = {label: set() for label in names.TOPOLOGY_LABELS}
        for r in rows.tolist():
            flex = cluster.flex_nodes[r]
            labels = cluster.labels_of(flex.name) if flex is not None else {}
            for label in names.TOPOLOGY_LABELS:
                if labels.get(label):
                    near[label].add(labels[label])
        for i, name in enumerate(candidates):
            row = cluster.index_of.get(name)
            labels = cluster.labels_of(name)
            if row is not None and fit[row]:
                scores[i] = MAX_EXTENDER_PRIORITY
            elif labels.get(names.LABEL_RACK) in near[names.LABEL_RACK]:
                scores[i] = 7
            elif labels.get(names.LABEL_ZONE) in near[names.LABEL_ZONE]:
                scores[i] = 4
            else:
                scores[i] = 1
        return scores

    def _remote_plan(
        self, scheduler: Scheduler, state: ElasticState, demand: PodDemand, client: str, key: str, kind: str
    ) -> Hold | None:
        """The remote slice for a pod running on ``client``: ``flexai.hi.remote_choice``'s rule (a local slice when
        one fits; else the least expected time, i.e. the nearest by topology), as a hold on the slice's node."""
        cluster = self.cluster
        rows = np.flatnonzero(self._remote_rows(state, demand)).tolist()
        candidates = []
        for r in rows:
            flex = cluster.flex_nodes[r]
            if flex is not None:
                speed = demand.share_milli / 1000
                candidates.append(remote_choice.Candidate(flex.name, True, speed, labels=cluster.labels_of(flex.name)))
        choice = remote_choice.choose(client, cluster.labels_of(client), candidates, remote_choice.CallProfile())
        if choice.node is None:
            return None
        hold = self._plan(scheduler, state, demand, cluster.index_of[choice.node], key, kind)
        if hold is not None:
            hold.client = client
        return hold

    def _filter_remote(
        self, args: dict[str, Any], pod: dict, demand: PodDemand, candidates: list[str]
    ) -> dict[str, Any]:
        """A remote pod may run on any node kube-scheduler's filters passed, once a slice is free for it somewhere
        (with the Hi Scheduler: once it placed the pod; the slice itself is chosen at bind, near the pod's node)."""
        key = pod_key(pod)
        cluster = self.cluster
        reason, unresolvable = "", False
        if self.bridge is not None:
            with self.lock:
                if key not in cluster.pods:
                    cluster.upsert_pod(pod)
                decision = self.bridge.decide(key)
            if decision.evictions:
                self._evict(decision.evictions)
            if decision.node:
                self._count("scheduled")
                return self._filter_result(args, list(candidates), {}, {})
            reason, unresolvable = decision.reason, decision.unresolvable
        else:
            with self.lock:
                cluster.forget(key, kinds=("assumed",))
                state = cluster.state
                if state is not None and self.scheduler() is not None and self._remote_rows(state, demand).any():
                    self._count("scheduled")
                    return self._filter_result(args, list(candidates), {}, {})
                unresolvable = state is None or not self._remote_rows(state, demand, empty=True).any()
            size = f"{demand.share_milli}m share and {demand.memory_mib} MiB"
            reason = f"no node serving remote leases has a free slice of {size}" + (
                " (and none could ever hold it)" if unresolvable else ""
            )
        self._count("unschedulable")
        text = "flexai: " + reason
        if unresolvable:
            self._warn_once(pod, "FlexaiUnschedulable", reason)
            return self._filter_result(args, [], {}, {n: text for n in candidates})
        return self._filter_result(args, [], {n: text for n in candidates}, {})

    def _prioritize_remote(self, key: str, demand: PodDemand, candidates: list[str]) -> tuple[_NodeList, np.ndarray]:
        listed = self._node_list(candidates)
        cluster = self.cluster
        with self.lock:
            state = cluster.state
            scheduler = self.scheduler()
            if state is None or scheduler is None:
                return listed, np.zeros(len(candidates), dtype=np.int64)
            if self.bridge is not None:
                start = self.bridge.nominated.get(key)
                if start is None:
                    return listed, np.zeros(len(candidates), dtype=np.int64)
                # Hi's slice counts as free here: the pod's own node may hold a local slice instead (at bind).
                cluster.forget(key, kinds=("assumed",))
                scores = self._remote_scores(state, demand, candidates)
                hold = self.bridge.hold_for(key, start.placement, "assumed")
                if hold is not None:
                    cluster.hold(key, hold)
                return listed, scores
            cluster.forget(key, kinds=("assumed",))
            scores = self._remote_scores(state, demand, candidates)
            if len(scores) and self.assume_ttl_s > 0 and scores.max() > 0:
                hold = self._remote_plan(scheduler, state, demand, candidates[int(np.argmax(scores))], key, "assumed")
                if hold is not None:
                    hold.deadline = cluster.clock() + self.assume_ttl_s
                    cluster.hold(key, hold)
        return listed, scores

    def _bind_remote(self, record: Any, key: str, node: str, annotations: dict[str, str]) -> str:
        """Hold the remote slice for a pod bound to ``node`` and write where it is (called under the lock)."""
        cluster = self.cluster
        demand = record.demand
        state = cluster.state
        scheduler = self.scheduler()
        where = f"pod {record.namespace}/{record.name}"
        if state is None or scheduler is None:
            return f"{where}: no flexai node serves remote leases"
        hold = cluster.holds.get(key)
        if hold is not None and hold.kind == "assumed" and hold.client == node and cluster.applied(key):
            cluster.promote(key)
        elif self.bridge is not None:
            start = self.bridge.nominated.get(key)
            if start is None:
                return f"{where}: the flexai scheduler has not placed it yet"
            cluster.forget(key)
            hold = None
            if not start.after:  # a slice freed by preemption stays the pod's; otherwise the remote rule chooses
                hold = self._remote_plan(scheduler, state, demand, node, key, "binding")
                if hold is not None and not self.bridge.relocate(key, hold):
                    hold = None
            if hold is None:
                hold = self.bridge.hold_for(key, self.bridge.nominated[key].placement, "binding")
                if hold is not None:
                    hold.client = node
            if hold is None or not cluster.hold(key, hold):
                return f"{where}: its slice is not free yet"
        else:
            cluster.forget(key)
            hold = self._remote_plan(scheduler, state, demand, node, key, "binding")
            if hold is None or not cluster.hold(key, hold):
                return f"{where}: no node serving remote leases has a free slice for it now"
        flex = cluster.flex_nodes[cluster.index_of[hold.node]]
        assert flex is not None and hold.placement is not None
        endpoint = flex.inventory.remote_endpoint
        remote = names.RemotePlacement(
            hold.node, node, names.lease_id_of(record.uid or key), endpoint, hold.placement.slices
        )
        annotations[names.ANNOTATION_REMOTE] = remote.to_json()
        annotations[names.ANNOTATION_REMOTE_ENDPOINT] = endpoint
        annotations[names.ANNOTATION_BOUND_AT] = f"{time.time():.6f}"
        return ""

    def _bind(self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]) -> str:
        assert self.api is not None
        last = ""
        for _ in range(self.bind_retries):
            try:
                self.api.bind_pod(namespace, name, uid, node, annotations or None)
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

    # ----------------------------------------------------------------- metrics
    def refresh_gauges(self) -> None:
        """Pending pods, and slices and share per device (per device only up to ``per_device_metrics_limit``
        devices: beyond that the cluster-wide ratio alone, to keep the series few)."""
        cluster = self.cluster
        with self.lock:
            records = list(cluster.pods.values())
            state = cluster.state
            if state is not None:
                free = state.free_share_milli.copy()
                capacity = state.capacity_share_milli.copy()
                grants = list(state.grants.values())
                flex_nodes = list(cluster.flex_nodes)
        pending = sum(1 for r in records if not r.node and r.scheduler == names.SCHEDULER_NAME and not r.finished)
        self.prometheus.pending_pods.set(pending)
        if state is None:
            return
        total = int(capacity.sum())
        self.prometheus.cluster_share.set((total - int(free.sum())) / total if total else 0.0)
        devices = sum(len(f.devices) for f in flex_nodes if f is not None)
        if devices > self.per_device_metrics_limit:
            return
        slices = np.zeros_like(free)
        for placement in grants:
            for d in placement.device_indices:
                slices[placement.node_index, d] += 1
        for i, flex_node in enumerate(flex_nodes):
            if flex_node is None:
                continue
            for j, device in enumerate(flex_node.devices):
                used = 1000 - int(free[i, j])
                self.prometheus.slices.labels(flex_node.name, str(device.index)).set(int(slices[i, j]))
                self.prometheus.share.labels(flex_node.name, str(device.index)).set(used / 1000)


_SCORE_TAIL = [f"{score}}}" for score in range(MAX_EXTENDER_PRIORITY + 1)]
"""The end of one HostPriority in JSON, by score."""

_REASONS = {
    "resources-fit": "not enough free CPU or memory",
    "device-model": "no allowed device model",
    "device-fit": "not enough free device share or memory",
}
_REASON_TEXT = np.array(
    ["flexai: " + ", ".join(r for k, r in enumerate(_REASONS.values()) if code >> k & 1) for code in range(8)],
    dtype=object,
)
"""The FailedNodes text for each combination of refusing filters (bit k: the k-th of ``_REASONS``)."""


def _json(data: Any) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(data, separators=(",", ":")).encode(), media_type="application/json")


class ArgsReader:
    """ExtenderArgs from the request body, with the node-name list parsed once per distinct list.

    kube-scheduler sends the same thousands of node names call after call (filter: all the nodes its own
    filters passed; prioritize: the ones the extender's filter passed); the list is the last member of its
    JSON (Go writes struct members in order: pod, nodes, nodenames) and node names hold no ``]``. The bytes of
    the list are looked up among the last lists seen; only the pod is parsed each time. Anything unexpected is
    parsed whole."""

    KEY = b'"nodenames":'

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._lists: dict[bytes, list[str]] = {}
        self._lock = threading.Lock()

    def remember(self, segment: bytes, node_names: list[str]) -> None:
        """A list this process wrote (filter's answer) and will be sent again (prioritize's request)."""
        with self._lock:
            if len(self._lists) >= self.keep:
                self._lists.pop(next(iter(self._lists)))
            self._lists[segment] = node_names

    def read(self, raw: bytes) -> dict[str, Any] | None:
        try:
            start = raw.rfind(self.KEY)
            end = raw.find(b"]", start) if start >= 0 else -1
            segment = raw[start + len(self.KEY) : end + 1].strip() if end > 0 else b""
            if not segment.startswith(b"[") or raw[end + 1 :].strip() != b"}":
                body = json.loads(raw)
                return body if isinstance(body, dict) else None
            names_ = self._lists.get(segment)
            if names_ is None:
                names_ = json.loads(segment)
                if not isinstance(names_, list):
                    return None
                self.remember(segment, names_)
            body = json.loads(raw[:start] + self.KEY + b"[]" + raw[end + 1 :])
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict):
            return None
        body["nodenames"] = names_
        return body


def create_extender_app(extender: Extender):  # noqa: ANN201
    """The extender's ASGI app (plain Starlette: its routes are few and called thousands of times a second)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from flexai.k8s.metrics import CONTENT_TYPE_LATEST, generate_latest

    timed = {verb: extender.prometheus.latency.labels(verb) for verb in ("filter", "prioritize", "bind")}
    reader = extender.args

    def bad() -> Response:
        return JSONResponse({"detail": "body: not a JSON object (allowed: kube-scheduler's ExtenderArgs)"}, 400)

    # filter and prioritize are short and CPU-bound under one lock: they run on the event loop (no thread
    # hand-off per call); bind waits on the API server, so it runs in the thread pool.
    async def filter_(request: HttpRequest) -> Response:
        body = reader.read(await request.body())
        if body is None:
            return bad()
        with timed["filter"].time():
            return Response(extender.filter_json(body).encode(), media_type="application/json")

    async def prioritize(request: HttpRequest) -> Response:
        body = reader.read(await request.body())
        if body is None:
            return bad()
        with timed["prioritize"].time():
            return Response(extender.prioritize_json(body).encode(), media_type="application/json")

    async def bind(request: HttpRequest) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return bad()
        start = time.perf_counter()
        result = await run_in_threadpool(extender.bind, body)
        timed["bind"].observe(time.perf_counter() - start)
        return _json(result)

    async def metrics(request: HttpRequest) -> Response:
        await run_in_threadpool(extender.refresh_gauges)
        return Response(generate_latest(extender.prometheus.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/filter", filter_, methods=["POST"]),
            Route("/prioritize", prioritize, methods=["POST"]),
            Route("/bind", bind, methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
