"""The extender's workload decisions through ``flexai.hi``: queue order, preemption, quotas and gangs.

The bridge keeps a ``HiScheduler`` over its own ledger with the cluster view's rows (rebuilt when a node
changes shape). Pods reach it as the view changes (``KubeCluster.listeners``):

* a pending flexai pod is submitted once (class, queue and gang from ``flexai.k8s.workload``);
* a bound pod is adopted with the slices it holds (pods without flexai resources hold their CPU and memory
  as fixed reservations, never preempted);
* a deleted or finished pod is released (withdrawn while pending).

``decide`` (called by filter) runs ``hi.cycle(now)``. A ``Start`` *nominates* the pod to a node: filter passes
that node only, and the slices are held for the pod in the cluster view as an ``assumed`` hold until bind
(kube-scheduler's assume, as before). A ``Start`` that preempted (``after``) waits until every victim pod
is gone; until then the victim still holds its slices in the cluster view, so nothing is granted twice.

A ``Preempt`` of a bound pod is an eviction (``POST pods/{name}/eviction``), so PodDisruptionBudgets hold; a
victim only nominated (not bound yet) just loses its nomination and goes back to its queue. When the API
server refuses an eviction (429: a PodDisruptionBudget), the preemption is rolled back: the preemptor's
nomination is released and it waits in its queue again; the victims not evicted yet are adopted back with
their slices and, as any preempted work, are not chosen again for ``HiConfig.preempt_backoff_s`` (default
30 min). Victims already evicted stay evicted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from flexai.hi import HiConfig, HiError, HiScheduler, Preempt, QueueSpec, Start, WorkItem
from flexai.k8s import names
from flexai.k8s.cluster import ElasticState, Hold, KubeCluster, PodRecord, expand_models, layout
from flexai.model import LedgerError, Placement, Request, RequestError
from flexai.model.units import FULL_SHARE_MILLI
from flexai.model.workload import WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, create_policy

NO_MODEL = "(no allowed model)"
MOVES_NOT_SUPPORTED = (
    "defragmentation moves (defrag_max_moves, consolidation_interval_s) are turned off on Kubernetes: carrying a "
    "move out (evict the pod, bind its owner's replacement pod to the reserved target) is not built yet"
)
log = logging.getLogger("flexai.k8s.hibridge")


@dataclass
class Eviction:
    victim: str
    namespace: str
    name: str
    by: str
    reason: str


@dataclass
class Decision:
    node: str = ""
    """The node filter passes ("" = none)."""
    reason: str = ""
    """Why the pod waits (FailedNodes), or why it can never be placed (``unresolvable``)."""
    unresolvable: bool = False
    evictions: list[Eviction] = field(default_factory=list)


class HiBridge:
    def __init__(
        self,
        cluster: KubeCluster,
        policy: str = "flex",
        config: HiConfig | None = None,
        queues: list[QueueSpec] | None = None,
        profile: Callable[[], WorkloadProfile] | None = None,
        assume_ttl_s: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.policy_name = policy
        config = config or HiConfig()
        self.moves_off = ""
        """Why migrations asked for in the config are off here ("" = none were asked for)."""
        if config.defrag_max_moves or config.consolidation_interval_s:
            # Moves are not carried out on Kubernetes yet (see MOVES_NOT_SUPPORTED): off, so that Hi's ledger never
            # holds a pod on a target while the pod still runs on its source.
            self.moves_off = MOVES_NOT_SUPPORTED
            log.warning("flexai scheduler: %s", MOVES_NOT_SUPPORTED)
            config = replace(config, defrag_max_moves=0, consolidation_interval_s=0.0)
        self.config = config
        self.queue_specs = list(queues or [])
        self.profile = profile
        self.assume_ttl_s = max(assume_ttl_s, 1.0)
        self.hi: HiScheduler | None = None
        self._stamp: tuple[int, int] | None = None
        self.dirty: set[str] = set()
        self.nominated: dict[str, Start] = {}
        self.published: dict[str, str] = {}
        """The node each pending pod was nominated to in the API server (``status.nominatedNodeName``)."""
        self.items: dict[str, WorkItem] = {}
        self.first_seen: dict[str, float] = {}
        self.external: set[str] = set()
        self.problems: dict[str, str] = {}
        """Pods the bridge could not account for, and why (e.g. a bound pod over a node's capacity)."""
        self.pending_evictions: list[Eviction] = []
        self.evicting: set[str] = set()
        """Victims whose pods hold slices until they are gone (their evictions are asked for)."""
        self.evictions_total = 0
        self.refusals_total = 0
        cluster.listeners.append(self.dirty.add)

    # ----------------------------------------------------------------- the Hi Scheduler and its ledger
    def _ensure(self) -> HiScheduler | None:
        cluster = self.cluster
        state = cluster.state
        if state is None:
            return None
        stamp = (cluster.version, cluster.layout_version)
        if self.hi is None or self._stamp != stamp:
            self._rebuild(state)
            self._stamp = stamp
        return self.hi

    def _rebuild(self, state: ElasticState) -> None:
        """A fresh Hi Scheduler over a ledger with the view's rows: bound pods adopted, pending ones submitted
        (nominations not bound yet are decided again)."""
        ledger = ElasticState(list(state.nodes), state.max_devices_per_node)
        context = PolicyContext(profile=self.profile()) if self.profile else PolicyContext()
        engine = Scheduler(ledger, create_policy(self.policy_name, context))
        self.hi = HiScheduler(engine, self.config, self.queue_specs)
        for key in list(self.nominated):
            hold = self.cluster.holds.get(key)
            if hold is not None and hold.kind == "assumed":
                self.cluster.forget(key)
        self.nominated.clear()
        self.evicting.clear()
        self.items.clear()
        self.external.clear()
        self.problems.clear()
        self.dirty.clear()
        records = list(self.cluster.pods.values())
        for record in records:
            if record.node:
                self._sync(record.key)
        for record in records:
            if not record.node:
                self._sync(record.key)

    def request_of(self, record: PodRecord) -> Request:
        """The Hi Scheduler's request for a pod (memory given in percent is left to the view's check); part of a
        device on several devices is a slice on each of that many distinct devices (``multi_slice``)."""
        demand = record.demand
        assert demand is not None and self.hi is not None
        allowed = expand_models(demand.models, self.hi.state.model_names)
        models = frozenset() if allowed is None else (allowed or frozenset({NO_MODEL}))
        return Request(
            device_count=demand.count,
            share_milli=demand.share_milli,
            multi_slice=demand.count > 1 and demand.share_milli < FULL_SHARE_MILLI,
            device_memory_mib=demand.memory_mib,
            allowed_models=models,
            cpu_milli=demand.cpu_milli,
            host_memory_mib=demand.host_memory_mib,
            name=record.key,
        )

    def _item(self, record: PodRecord, now: float) -> WorkItem:
        work = record.work
        assert work is not None
        return WorkItem(
            id=record.key,
            request=self.request_of(record),
            priority_class=work.priority_class,
            priority=work.priority,
            queue=work.queue,
            gang=work.gang,
            gang_size=work.gang_size,
            submit_time_s=self.first_seen.setdefault(record.key, now),
            name=f"{record.namespace}/{record.name}",
        )

    def _placement(self, key: str) -> Placement | None:
        hold = self.cluster.holds.get(key)
        if hold is None or not self.cluster.applied(key):
            return None
        row = self.cluster.index_of.get(hold.node)
        return None if row is None else self.cluster.placement_of(hold, row)

    # ----------------------------------------------------------------- pods as they change
    def sync(self) -> None:
        while self.dirty:
            self._sync(self.dirty.pop())

    def _sync(self, key: str) -> None:  # noqa: C901
        hi = self.hi
        assert hi is not None
        now = self.cluster.clock()
        record = self.cluster.pods.get(key)
        if record is None or record.finished:
            self._forget(key)
            return
        ours = record.demand is not None and record.work is not None and not record.error
        if record.node:
            self.nominated.pop(key, None)
            self.published.pop(key, None)
            if key in hi.stopping:
                return  # a victim whose eviction is under way: its slices already belong to its preemptor
            running = hi.running.get(key)
            if running is not None:
                if self.cluster.index_of.get(record.slice_node) == running.placement.node_index:
                    hi.started(key)
                    return
                hi.release(key)  # bound elsewhere than hi placed it: take what it really holds
            if key in hi.pending:
                hi.withdraw(key)
            if key in self.external:
                return
            placement = self._placement(key)
            if placement is None:
                return
            try:
                if ours:
                    item = self.items.get(key) or self._item(record, now)
                    work = record.work
                    assert work is not None
                    hi.adopt(item, placement, work.bound_at_s if work.bound_at_s is not None else now)
                    hi.started(key)
                    self.items[key] = item
                else:
                    hi.state.reserve("ext:" + key, placement)
                    self.external.add(key)
            except (LedgerError, HiError, RequestError) as exc:
                self.problems[key] = f"not accounted in the Hi Scheduler: {exc}"
            return
        # Pending.
        if not ours or record.scheduler != names.SCHEDULER_NAME:
            return
        if key in hi.pending or key in hi.running or key in hi.stopping:
            return
        try:
            item = self._item(record, now)
            hi.submit(item, now)
            self.items[key] = item
            self.problems.pop(key, None)
        except (HiError, RequestError) as exc:
            self.problems[key] = str(exc)

    def _forget(self, key: str) -> None:
        hi = self.hi
        assert hi is not None
        self.nominated.pop(key, None)
        self.published.pop(key, None)
        if key in hi.pending:
            hi.withdraw(key)
        elif key in hi.running or key in hi.stopping:
            hi.release(key)
        if key in self.external:
            hi.state.unreserve("ext:" + key)
            self.external.discard(key)
        self.items.pop(key, None)
        self.evicting.discard(key)
        self.first_seen.pop(key, None)
        self.problems.pop(key, None)

    # ----------------------------------------------------------------- decisions
    def cycle(self) -> list[Eviction]:
        """Run a cycle now over every pod the view holds; the evictions it decided, for the caller to carry out."""
        hi = self._ensure()
        if hi is None:
            return []
        self.sync()
        self._cycle(hi)
        evictions, self.pending_evictions = self.pending_evictions, []
        return evictions

    def _cycle(self, hi: HiScheduler) -> None:
        now = self.cluster.clock()
        result = hi.cycle(now)
        assert not result.moves, "moves are off on Kubernetes (MOVES_NOT_SUPPORTED)"
        for start in result.starts:
            self.nominated[start.item.id] = start
        for preempt in result.preemptions:
            self._preempted(preempt, now)

    def unpublished(self) -> list[tuple[str, str, str, str]]:
        """(key, namespace, name, node) of the pending pods Hi placed whose node kube-scheduler was not told yet
        (``status.nominatedNodeName``, which it tries alone first); remote slices are placed at bind instead."""
        todo = []
        for key, start in self.nominated.items():
            record = self.cluster.pods.get(key)
            if record is None or record.node or record.demand is None or record.demand.remote:
                continue
            flex = self.cluster.flex_nodes[start.placement.node_index]
            if flex is not None and self.published.get(key) != flex.name:
                todo.append((key, record.namespace, record.name, flex.name))
        return todo

    def decide(self, key: str) -> Decision:
        """Run a cycle and say where the pod ``key`` may go now (filter)."""
        hi = self._ensure()
        if hi is None:
            return Decision(reason="no flexai node in the cluster")
        self._sync(key)  # filter may come before the watch's event marked it dirty
        decision = Decision(evictions=self.cycle())
        if key in self.problems:
            decision.reason, decision.unresolvable = self.problems[key], True
            return decision
        start = self.nominated.get(key)
        if start is None:
            if key in hi.stopping:
                decision.reason = hi.reason(key)
            else:
                decision.reason = hi.reason(key) or "not known to the Hi Scheduler"
            return decision
        node = self.cluster.flex_nodes[start.placement.node_index]
        if node is None:
            decision.reason = "the node it was placed on is gone; placed again"
            self._unnominate(key, self.cluster.clock())
            return decision
        waiting = [v for v in start.after if v in self.evicting and self._present(v)]
        if waiting:
            labels = ", ".join(self.items[v].label if v in self.items else v for v in waiting[:3])
            decision.reason = f"preempted {len(start.after)} pod(s) for it on {node.name}; waits for {labels} to stop"
            return decision
        hold = self.cluster.holds.get(key)
        if not (hold is not None and hold.node == node.name and self.cluster.applied(key)):
            new = self.hold_for(key, start.placement, "assumed")
            if new is None or not self.cluster.hold(key, new):
                decision.reason = f"placed on {node.name}; its slices are not free in the cluster yet"
                return decision
        decision.node = node.name
        return decision

    def hold_for(self, key: str, placement: Placement, kind: str) -> Hold | None:
        """The cluster view's hold for a pod on the placement hi chose for it."""
        record = self.cluster.pods.get(key)
        flex = self.cluster.flex_nodes[placement.node_index]
        if record is None or record.demand is None or flex is None:
            return None
        demand = record.demand
        uuids = [flex.devices[d].uuid for d in placement.device_indices]
        memory = demand.memory_mib
        if demand.memory_pct and uuids:
            memory = flex.devices[placement.device_indices[0]].memory_mib * demand.memory_pct // 100
        ordered, containers = layout(demand, uuids)
        slices = tuple(
            names.SliceGrant(flex.devices[flex.by_uuid[u]].index, u, demand.share_milli, memory) for u in ordered
        )
        deadline = self.cluster.clock() + self.assume_ttl_s if kind == "assumed" else float("inf")
        return Hold(
            kind, flex.name, ordered, demand.share_milli, memory, demand.cpu_milli, demand.host_memory_mib,
            deadline=deadline, placement=names.Placement(flex.name, slices, containers),
        )  # fmt: skip

    def relocate(self, key: str, hold: Hold) -> bool:
        """Move a nominated remote pod's slice to ``hold`` (the remote rule's choice near the pod's node, made at
        bind) in Hi's ledger too; False (nothing changed) when Hi's ledger has no room there."""
        hi = self.hi
        start = self.nominated.get(key)
        item = self.items.get(key)
        row = self.cluster.index_of.get(hold.node)
        if hi is None or start is None or item is None or row is None or key not in hi.running:
            return False
        flex = self.cluster.flex_nodes[row]
        assert flex is not None
        devices = tuple(flex.by_uuid[u] for u in hold.uuids)
        placement = Placement(row, devices, hold.share_milli, hold.memory_mib, hold.cpu_milli, hold.host_memory_mib)
        if placement == start.placement:
            return True
        now = self.cluster.clock()
        hi.release(key)
        try:
            hi.adopt(item, placement, now)
        except (LedgerError, HiError):
            hi.adopt(item, start.placement, now)
            return False
        self.nominated[key] = replace(start, placement=placement)
        return True

    def nominated_node(self, key: str) -> str:
        start = self.nominated.get(key)
        if start is None:
            return ""
        node = self.cluster.flex_nodes[start.placement.node_index]
        return "" if node is None else node.name

    def _present(self, key: str) -> bool:
        record = self.cluster.pods.get(key)
        return record is not None and not record.finished

    def _preempted(self, preempt: Preempt, now: float) -> None:
        assert self.hi is not None
        victim = preempt.victim.id
        record = self.cluster.pods.get(victim)
        hold = self.cluster.holds.get(victim)
        bound = record is not None and (bool(record.node) or (hold is not None and hold.kind != "assumed"))
        if not bound:
            # Only nominated (or gone): no pod to stop; it waits in its queue again.
            self.nominated.pop(victim, None)
            self.cluster.forget(victim)
            self.hi.requeue(victim, now)
            if record is None:
                self._forget(victim)
            return
        assert record is not None
        self.evicting.add(victim)
        self.pending_evictions.append(Eviction(victim, record.namespace, record.name, preempt.by, preempt.reason))

    def _unnominate(self, key: str, now: float) -> None:
        """The pod's nomination is undone: its slices go back, it waits in its queue again."""
        hi = self.hi
        assert hi is not None
        self.nominated.pop(key, None)
        self.cluster.forget(key)
        if key in hi.running:
            hi.release(key)
        record = self.cluster.pods.get(key)
        item = self.items.get(key)
        if record is not None and not record.node and item is not None and key not in hi.pending:
            hi.submit(item, now)

    def refused(self, evictions: list[Eviction], now: float) -> None:
        """Evictions the API server refused (a PodDisruptionBudget): roll their preemptions back."""
        hi = self.hi
        if hi is None:
            return
        self.refusals_total += len(evictions)
        for by in {e.by for e in evictions}:
            if by:
                self._unnominate(by, now)
        for eviction in evictions:
            victim = eviction.victim
            self.evicting.discard(victim)
            # The preemption did not happen: out of "stopping", its slices are taken back below; hi forgets
            # the preemption except its back-off.
            item = hi.preemption_refused(victim)
            if item is None:
                continue
            placement = self._placement(victim)
            if placement is None:
                continue
            if not self._adopt_back(item, placement):
                self.problems[victim] = "its eviction was refused, and its slices were given to others meanwhile"

    def _adopt_back(self, item: WorkItem, placement: Placement) -> bool:
        hi = self.hi
        assert hi is not None
        now = self.cluster.clock()
        for attempt in range(2):
            try:
                hi.adopt(item, placement, now)
                hi.started(item.id)
                return True
            except LedgerError:
                if attempt:
                    return False
                # Nominations on that node not bound yet may hold the slices: decide them again.
                for key, start in list(self.nominated.items()):
                    if start.placement.node_index == placement.node_index:
                        self._unnominate(key, now)
        return False

    def evicted(self, evictions: list[Eviction]) -> None:
        self.evictions_total += len(evictions)


__all__ = ["Decision", "Eviction", "HiBridge"]
