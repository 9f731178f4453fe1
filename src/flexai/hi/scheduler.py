"""The Hi Scheduler's workload level: which pending work starts, which running work yields, in what order.

Pure: no clock, no I/O. An adapter (the replay, the pool, the Kubernetes extender) tells it what arrived
(``submit``), what ended (``release``), what a preempted victim has stopped (``requeue``), and asks it to
``cycle(now_s)``; it answers with ``Start`` and ``Preempt`` decisions whose slices are already moved in the
engine's ledger, so nothing else can take a hole opened for a preemptor.

Order of work: class (high, normal, low), then the integer priority, then work within its queue's
guarantee before borrowing work, then weighted dominant-resource fair share between queues, then submit
time. Pending items of one (class, priority, queue, shape) form a bucket: once its first item cannot be
placed, none of the others can, so a cycle costs one engine call per bucket, not per item; a bucket
found blocked stays blocked until resources are freed on a node where it could fit.

One cycle admits everything that fits, in every queue. The first blocked item in order (the head) gets a
reservation: the node closest to fitting it takes no later work, so smaller work fills in elsewhere
("backfill") without delaying it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from flexai.hi.defrag import Move as DefragMove
from flexai.hi.defrag import blocked_by_fragmentation, commit_moves, commit_plan, find_consolidation, find_moves
from flexai.hi.preemption import PREEMPTION_PLUGINS, PreemptionPlugin, VictimSet
from flexai.hi.queues import QueueBook, QueueSpec
from flexai.hi.timeshare import Guest, TimeSharing
from flexai.hi.work import CycleResult, HiError, Move, Preempt, PriorityClass, Running, Start, WorkItem
from flexai.model.cluster import Placement, Request
from flexai.model.state import LedgerError
from flexai.model.units import FULL_SHARE_MILLI
from flexai.scheduler.framework import Scheduler, Status

INFINITY = math.inf


@dataclass(frozen=True)
class HiConfig:
    preemption: str = "fraction-aware"
    """Victim choice plugin: ``fraction-aware``, ``k8s-default``, or ``none``."""
    reservation: bool = True
    """Hold the node closest to fitting the first blocked item for it (backfill with reservation)."""
    normal_min_runtime_s: float = 600.0
    """A ``normal`` item runs at least this long before it may be preempted."""
    preempt_backoff_s: float = 1800.0
    """After a preemption, the item is not preempted again for this long once it restarts."""
    normal_checkpoint_s: float | None = 1800.0
    """``normal`` work is checkpointed this often (lost work = time since the last one); None = never."""
    gang_timeout_s: float = 300.0
    """A gang whose members did not all start within this long after its placement is released."""
    reclaim: bool = True
    """Work within its queue's guarantee may preempt other queues' borrowed capacity."""
    honour_protection: bool = True
    """Minimum runtime and back-off (off for kube-scheduler's default, which knows neither)."""
    max_victims: int = 8
    preemption_delay_s: float = 0.0
    """A blocked item waits this long for resources to free by themselves before it preempts (work that
    departs on its own costs nobody anything; evictions cost lost work)."""
    timeshare: bool = False
    """``low`` work that cannot be placed may run as a guest on idle share granted to others (see
    ``flexai.hi.timeshare``); needs the adapter to ``observe_devices``."""
    timeshare_busy_pct: float = 50.0
    """A device whose owners use this much of it or more is busy: its guests pause and no guest starts there."""
    timeshare_max_guests: int = 1
    """Guests per device (each one slows the owners a little)."""
    timeshare_memory_headroom_pct: float = 5.0
    """Device memory kept free beside owners and guests."""
    defrag_max_moves: int = 0
    """When the head of the line is blocked by fragmentation, move at most this many preemptible items (never
    ``high``, never gang members, none in protection) to open a hole for it; 0 = never move."""
    consolidation_interval_s: float = 0.0
    """Every this often, while work waits, consolidate with the same bound (empty the least-used nodes);
    0 = never."""
    defrag_retry_s: float = 60.0
    """A head for which no moves were found is searched for again after this long (sooner if it changes)."""

    def __post_init__(self) -> None:
        if self.preemption != "none" and self.preemption not in PREEMPTION_PLUGINS:
            allowed = ", ".join([*PREEMPTION_PLUGINS, "none"])
            raise HiError(f"preemption={self.preemption!r} is not allowed: {allowed}")
        for name in (
            "normal_min_runtime_s",
            "preempt_backoff_s",
            "gang_timeout_s",
            "preemption_delay_s",
            "defrag_retry_s",
        ):
            value = getattr(self, name)
            if not 0 <= value < 1e12:
                raise HiError(f"{name}={value!r} is not allowed: seconds >= 0")
        for name in ("timeshare_busy_pct", "timeshare_memory_headroom_pct"):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise HiError(f"{name}={value!r} is not allowed: a percentage 0..100")
        if not 0 <= self.defrag_max_moves <= 1000:
            raise HiError(f"defrag_max_moves={self.defrag_max_moves!r} is not allowed: 0..1000")
        if not 0 <= self.consolidation_interval_s < 1e12:
            raise HiError(f"consolidation_interval_s={self.consolidation_interval_s!r} is not allowed: seconds >= 0")
        if not 1 <= self.timeshare_max_guests <= 64:
            raise HiError(f"timeshare_max_guests={self.timeshare_max_guests!r} is not allowed: 1..64")


def shape_key(request: Request) -> tuple[object, ...]:
    return (
        request.device_count,
        request.share_milli,
        request.device_memory_mib,
        request.allowed_models,
        request.cpu_milli,
        request.host_memory_mib,
    )


class _Bucket:
    """Pending items that are interchangeable for placement, in submit order."""

    __slots__ = (
        "key",
        "items",
        "blocked",
        "preempt_blocked",
        "reason",
        "request",
        "is_gang",
        "quota_blocked",
        "quota_preempt_blocked",
        "recheck_nodes",
    )

    def __init__(self, key: tuple[object, ...], request: Request, is_gang: bool) -> None:
        self.key = key
        self.request = request
        self.is_gang = is_gang
        self.items: list[tuple[float, int, WorkItem]] = []
        self.blocked = False
        """The head was found not to fit; it is tried again once resources free where it could fit."""
        self.preempt_blocked: tuple[int, float] | None = None
        """(victim version, valid until) at which preemption found no victims."""
        self.reason: str | tuple[object, ...] = ""
        """The reason it waits, or the arguments to write it from when somebody asks (writing costs)."""
        self.quota_blocked = False
        self.quota_preempt_blocked: tuple[int, float] | None = None
        """(victim version, valid until) at which its queue's own lower-class work could not make room."""
        self.recheck_nodes: set[int] | None = None
        """Unblocked because resources were freed on these nodes only: a cheap look there comes first."""

    @property
    def head(self) -> WorkItem:
        return self.items[0][2]


class HiScheduler:
    """Queues, priority classes, preemption, gangs and backfill over one engine ``Scheduler``."""

    def __init__(self, engine: Scheduler, config: HiConfig | None = None, queues: Iterable[QueueSpec] = ()) -> None:
        self.engine = engine
        self.state = engine.state
        self.config = config or HiConfig()
        self.preemption: PreemptionPlugin | None = (
            None
            if self.config.preemption == "none"
            else (
                PREEMPTION_PLUGINS[self.config.preemption](max_victims=self.config.max_victims)  # type: ignore[call-arg]
                if self.config.preemption == "fraction-aware"
                else PREEMPTION_PLUGINS[self.config.preemption]()
            )
        )
        cpu_total = int(self.state.capacity_cpu_milli.sum())
        self.queues = QueueBook(queues, self.state.total_share_milli, cpu_total)
        self.running: dict[str, Running] = {}
        self.stopping: dict[str, WorkItem] = {}
        self.pending: dict[str, WorkItem] = {}
        self.preempt_count: dict[str, int] = {}
        self._lineage: dict[str, frozenset[str]] = {}
        self._last_preempted_s: dict[str, float] = {}
        self._buckets: dict[tuple[object, ...], _Bucket] = {}
        self._bucket_of: dict[str, tuple[object, ...]] = {}
        self._seq = itertools.count()
        self._now_s = 0.0
        self._victim_version = 0
        """Bumped whenever an item starts (a new possible victim) or resources are freed."""
        self._dirty_nodes: set[int] = set()
        self._dirty_queues: set[str] = set()
        self._head: str | None = None
        self._head_since_s: float = 0.0
        self._reserved_node: int | None = None
        self._unconfirmed_gangs: dict[str, tuple[float, set[str]]] = {}
        self._model_of_node = [n.device_model for n in self.state.nodes]
        self._pending_since: dict[str, float] = {}
        self._running_by_node: dict[int, dict[str, Running]] = {}
        self._touched_at = np.zeros((len(PriorityClass), self.state.node_count), dtype=np.int64)
        """Victim version of each node's last start, end or move: where a failed preemption may now succeed."""
        self._static_nodes: dict[tuple[object, ...], list[int]] = {}
        self._static_arrays: dict[tuple[object, ...], np.ndarray] = {}
        self._protection_heap: list[tuple[float, str]] = []
        self._eligible_cache: dict[tuple[int, int], tuple[int, float, list[Running]]] = {}
        """Per (node, preemptor class): the candidates, valid while the node is unchanged for that class."""
        self._mask_cache: tuple[int, np.ndarray] | None = None
        self._guest_items: dict[str, WorkItem] = {}
        self._defrag_tried: tuple[str, int, float] | None = None
        self._fragmentation: tuple[tuple[str, int], bool] | None = None
        self._next_consolidation_s: float | None = None
        self.timesharing = TimeSharing(
            self.state,
            self.config.timeshare_busy_pct / 100.0,
            self.config.timeshare_max_guests,
            self.config.timeshare_memory_headroom_pct,
        )

    # ------------------------------------------------------------------ input
    def submit(self, item: WorkItem, now_s: float | None = None) -> None:
        """Add a pending item (its submit time orders it; ``now_s``, default its submit time, starts its wait)."""
        if item.id in self.pending or item.id in self.running or item.id in self.stopping or item.id in self.guests:
            raise HiError(f"id={item.id!r} is already known: work item ids must be unique")
        self._now_s = item.submit_time_s if now_s is None else now_s
        self.queues.ensure(item.queue)
        self._enqueue(item)

    def withdraw(self, item_id: str) -> WorkItem | None:
        """Drop a pending item (cancelled, or its user gave up); unknown ids change nothing."""
        item = self.pending.pop(item_id, None)
        if item is None:
            return None
        self._pending_since.pop(item_id, None)
        key = self._bucket_of.pop(item_id)
        bucket = self._buckets[key]
        bucket.items = [e for e in bucket.items if e[2].id != item_id]
        if not bucket.items:
            del self._buckets[key]
        if self._head == item_id:
            self._clear_head()
        return item

    def release(self, item_id: str) -> Placement | None:
        """A running (or stopping) item ended for good: return its slices. Idempotent."""
        self.stopping.pop(item_id, None)
        guest = self.timesharing.remove(item_id)
        if guest is not None:
            self._guest_items.pop(item_id, None)
            return guest.placement
        running = self._forget_running(item_id)
        if running is None:
            return None
        self.engine.release(item_id, running.item.request)
        self.queues.add(running.item.queue, running.model, running.item.request, -1)
        self._freed(running.placement.node_index)
        self._dirty_queues.add(running.item.queue)
        return running.placement

    def requeue(self, item_id: str, now_s: float | None = None) -> None:
        """A preempted victim has stopped: back to its queue, in its old place (same submit time)."""
        item = self.stopping.pop(item_id, None)
        if item is not None:
            if now_s is not None:
                self._now_s = now_s
            self._enqueue(item)

    def adopt(self, item: WorkItem, placement: Placement, started_s: float) -> None:
        """Register work that already runs (after a restart of the adapter); reserves its slices if needed."""
        if self.state.grants.get(item.id) != placement:
            self.state.reserve(item.id, placement)
        self.queues.ensure(item.queue)
        self._record_start(item, placement, started_s)

    def preemption_refused(self, victim_id: str) -> WorkItem | None:
        """The adapter could not stop a victim (Kubernetes: a PodDisruptionBudget refused its eviction).

        The victim leaves ``stopping`` without going back to its queue (the adapter adopts it again with its
        slices), and what the preemption recorded against it is forgotten, except the back-off, which keeps
        it from being picked again at once."""
        item = self.stopping.pop(victim_id, None)
        if item is not None:
            self._lineage.pop(victim_id, None)
            count = self.preempt_count.get(victim_id, 0)
            if count <= 1:
                self.preempt_count.pop(victim_id, None)
            else:
                self.preempt_count[victim_id] = count - 1
        return item

    def observe_devices(self, busy: np.ndarray, owner_memory_mib: np.ndarray) -> None:
        """What the devices did lately (time-sharing): the owners' utilisation of each device (0..1, shape
        nodes x devices as in the ledger) and the device memory they hold (MiB, guests not included)."""
        try:
            self.timesharing.observe(busy, owner_memory_mib)
        except ValueError as exc:
            raise HiError(str(exc)) from None

    @property
    def guests(self) -> dict[str, Guest]:
        """Guests running on others' idle share (time-sharing), by item id."""
        return self.timesharing.guests

    def started(self, item_id: str) -> None:
        """The adapter really started ``item_id`` (gangs are released if this does not come in time)."""
        for gang, (_, members) in list(self._unconfirmed_gangs.items()):
            members.discard(item_id)
            if not members:
                del self._unconfirmed_gangs[gang]

    def adopt_guest(self, item: WorkItem, placement: Placement, started_s: float) -> None:
        """Register a guest that already runs (time-sharing, after a restart of the adapter). Nothing is reserved in
        the ledger; it counts as running (the adapter resumes it) until the next cycle pauses it or makes it yield."""
        if item.id in self.pending or item.id in self.running or item.id in self.stopping or item.id in self.guests:
            raise HiError(f"id={item.id!r} is already known: work item ids must be unique")
        self.queues.ensure(item.queue)
        self.timesharing.add(item.id, item.request, placement, started_s)
        self._guest_items[item.id] = item

    # ------------------------------------------------------------------ views
    def reason(self, item_id: str) -> str:
        key = self._bucket_of.get(item_id)
        if key is None:
            if item_id in self.stopping:
                return "stopping after preemption; it goes back to its queue when it has stopped"
            return ""
        bucket = self._buckets[key]
        reason = bucket.reason
        if isinstance(reason, tuple) and reason[0] == "held":
            reason = self._held_reason(self._now_s)  # how long the head has waited: as of the last cycle
        elif isinstance(reason, tuple):
            kind, request = reason
            text = self._resource_reason(request)  # type: ignore[arg-type]
            if kind == "resources-preempt":
                text += "; no lower-class work that may be preempted opens a hole for it"
            reason = bucket.reason = text
        if bucket.head.id != item_id and reason:
            return f"behind {bucket.head.label} (same shape): {reason}"
        return reason or "not tried yet"

    def reasons(self) -> dict[str, str]:
        return {item_id: self.reason(item_id) for item_id in self.pending}

    def queue_view(self) -> list[dict[str, object]]:
        pending: dict[str, int] = {}
        for item in self.pending.values():
            pending[item.queue] = pending.get(item.queue, 0) + 1
        return self.queues.view(pending)

    # ------------------------------------------------------------------ cycle
    def cycle(self, now_s: float) -> CycleResult:
        self._now_s = now_s
        result = CycleResult()
        self._expire_gangs(now_s, result)
        if self._dirty_nodes:
            self._unblock_for(self._dirty_nodes)
            self._dirty_nodes = set()
        if self._dirty_queues:
            for bucket in self._buckets.values():
                if bucket.quota_blocked and bucket.head.queue in self._dirty_queues:
                    bucket.blocked = False
            self._dirty_queues = set()
        if self._head is not None and self._head not in self.pending:
            self._clear_head()
        heap = [
            (self._order(b), next(self._seq), b.key) for b in self._buckets.values() if self._worth_trying(b, now_s)
        ]
        heapq.heapify(heap)
        while heap:
            order, _, key = heapq.heappop(heap)
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            fresh = self._order(bucket)
            if fresh != order and heap and fresh > heap[0][0]:
                heapq.heappush(heap, (fresh, next(self._seq), key))  # fair share moved on: take its turn later
                continue
            placed = self._try_gang(bucket, now_s, result) if bucket.is_gang else self._try_one(bucket, now_s, result)
            if placed and key in self._buckets:
                heapq.heappush(heap, (self._order(bucket), next(self._seq), key))
        if self.config.defrag_max_moves:
            self._defragment(now_s, result)
            if self.config.consolidation_interval_s:
                self._consolidate(now_s, result)
        if self.config.timeshare:
            self._timeshare(now_s, result)
        result.next_wakeup_s = self._next_wakeup(now_s)
        return result

    def head_blocked_by_fragmentation(self) -> bool:
        """Is the first blocked item in line (the head) blocked by fragmentation: enough free share in total
        on devices it may use, but no node where it fits? (False without a head.)"""
        head = self.pending.get(self._head or "")
        if head is None:
            return False
        key = (head.id, self._victim_version)
        if self._fragmentation is not None and self._fragmentation[0] == key:
            return self._fragmentation[1]
        request = self._restrict(head.request, self._quota_models(head))
        blocked = request is not None and blocked_by_fragmentation(self.engine, request)
        self._fragmentation = (key, blocked)
        return blocked

    def next_waiting_guest(self) -> Request | None:
        """The request of the first ``low`` item in line that time-sharing could seat (None: none waits)."""
        buckets = [b for b in self._buckets.values() if b.head.priority_class is PriorityClass.LOW and not b.is_gang]
        return min(buckets, key=self._order).request if buckets else None

    # ------------------------------------------------------------------ internals: migration
    def _movable(self, now_s: float) -> tuple[dict[str, tuple[Request, Placement]], dict[str, float]]:
        """What may move: running ``normal`` and ``low`` items out of protection, outside gangs, not marked
        unmovable."""
        movable: dict[str, tuple[Request, Placement]] = {}
        lost: dict[str, float] = {}
        for item_id, r in self.running.items():
            item = r.item
            if (
                item.priority_class is PriorityClass.HIGH
                or item.gang
                or not item.movable
                or item.request.multi_slice  # the move finder re-places one slice or whole devices only
                or now_s < r.protected_until_s
            ):
                continue
            movable[item_id] = (self.engine.effective(item.request), r.placement)
            lost[item_id] = self.lost_work_s(r, now_s) * r.placement.share_milli * len(r.placement.device_indices)
        return movable, lost

    def _defragment(self, now_s: float, result: CycleResult) -> None:
        head = self.pending.get(self._head or "")
        if head is None or head.gang or head.request.multi_slice:
            return  # the move finder places one slice or whole devices only
        tried = self._defrag_tried
        if tried is not None and tried[0] == head.id:
            if tried[1] == self._victim_version or now_s < tried[2] + self.config.defrag_retry_s:
                return  # nothing changed since the last search, or it was searched for a moment ago
        self._defrag_tried = (head.id, self._victim_version, now_s)
        request = self._restrict(head.request, self._quota_models(head))
        if request is None or not self.head_blocked_by_fragmentation():
            return
        movable, lost = self._movable(now_s)
        if not movable:
            return
        plan = find_moves(self.engine, request, movable, self.config.defrag_max_moves, lost)
        if plan is None:
            return
        try:
            commit_plan(self.engine, plan, head.id, request)
        except LedgerError:
            return
        self._moved(plan.moves, now_s, result, f"to open a hole for {head.label}")
        node = self.state.nodes[plan.hole.node_index].name
        self._start(
            head,
            plan.hole,
            now_s,
            result,
            f"moved {len(plan.moves)} to open a hole on {node} (fragmentation)",
            tuple(m.id for m in plan.moves),
        )

    def _consolidate(self, now_s: float, result: CycleResult) -> None:
        if self._next_consolidation_s is None:
            self._next_consolidation_s = now_s + self.config.consolidation_interval_s
        if now_s < self._next_consolidation_s or not self.pending:
            return
        self._next_consolidation_s = now_s + self.config.consolidation_interval_s
        movable, lost = self._movable(now_s)
        moves = find_consolidation(self.engine, movable, self.config.defrag_max_moves, lost)
        if not moves:
            return
        try:
            commit_moves(self.engine, moves)
        except LedgerError:
            return
        self._moved(moves, now_s, result, "consolidation")

    def _moved(self, moves: Iterable[DefragMove], now_s: float, result: CycleResult, why: str) -> None:
        """Hi's books follow moves already made in the ledger: the item runs on its target from now on."""
        for move in moves:
            running = self.running[move.id]
            lost = self.lost_work_s(running, now_s)
            self._running_by_node.get(move.source.node_index, {}).pop(move.id, None)
            self._running_by_node.setdefault(move.target.node_index, {})[move.id] = running
            old_model, new_model = running.model, self._model_of_node[move.target.node_index]
            if old_model != new_model:
                self.queues.add(running.item.queue, old_model, running.item.request, -1)
                self.queues.add(running.item.queue, new_model, running.item.request, +1)
            running.placement = move.target
            running.model = new_model
            running.started_s = now_s
            # Not moved (nor preempted) again for a while: no ping-pong.
            running.protected_until_s = max(running.protected_until_s, now_s + self.config.preempt_backoff_s)
            self._touch(move.source.node_index)
            self._touch(move.target.node_index)
            self._dirty_nodes.add(move.source.node_index)
            src = self.state.nodes[move.source.node_index].name
            dst = self.state.nodes[move.target.node_index].name
            result.moves.append(
                Move(running.item, move.source, move.target, f"moved from {src} to {dst} ({why})", lost, why)
            )

    # ------------------------------------------------------------------ internals: time-sharing
    def _timeshare(self, now_s: float, result: CycleResult) -> None:
        """Guests are decided when the adapter has shown what the devices do (every tick of the pool, every
        few minutes of the replay): between two looks nothing new is known about idle time or memory."""
        sharing = self.timesharing
        if not sharing.fresh:
            return
        sharing.fresh = False
        for guest in sharing.memory_evictions():
            sharing.remove(guest.item_id)
            item = self._guest_items.pop(guest.item_id)
            self.stopping[item.id] = item
            node = self.state.nodes[guest.placement.node_index].name
            devices = ", ".join(f"GPU {d}" for d in guest.placement.device_indices)
            result.preemptions.append(
                Preempt(
                    item,
                    "",
                    f"its owners need the device memory on {devices} of {node}",
                    now_s - guest.started_s,
                    kind="yield",
                )
            )
        pauses, resumes = sharing.pause_changes()
        result.pauses.extend(pauses)
        result.resumes.extend(resumes)
        if not sharing.observed or not sharing.usable().any():
            return
        buckets = sorted(
            (b for b in self._buckets.values() if b.head.priority_class is PriorityClass.LOW and not b.is_gang),
            key=self._order,
        )
        for bucket in buckets:
            for _, _, item in list(bucket.items):
                placement = sharing.place(self.engine.effective(item.request))
                if placement is None:
                    break  # the rest of the bucket has the same shape
                self._dequeue(item)
                if self._head == item.id:
                    self._clear_head()
                sharing.add(item.id, item.request, placement, now_s)
                self._guest_items[item.id] = item
                node = self.state.nodes[placement.node_index].name
                devices = ", ".join(f"GPU {d}" for d in placement.device_indices)
                result.starts.append(
                    Start(
                        item, placement, f"opportunistic on the idle share of {devices} on {node}", opportunistic=True
                    )
                )

    # ------------------------------------------------------------------ internals: bookkeeping
    def _enqueue(self, item: WorkItem) -> None:
        if item.gang:
            key: tuple[object, ...] = ("gang", item.gang)
        else:
            key = (int(item.priority_class), item.priority, item.queue, shape_key(item.request))
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key, item.request, bool(item.gang))
        bisect.insort(bucket.items, (item.submit_time_s, next(self._seq), item))
        self._pending_since[item.id] = self._now_s
        if bucket.is_gang:
            bucket.blocked = False  # a new member may complete the gang
        self.pending[item.id] = item
        self._bucket_of[item.id] = key

    def _dequeue(self, item: WorkItem) -> None:
        self.pending.pop(item.id, None)
        self._pending_since.pop(item.id, None)
        key = self._bucket_of.pop(item.id)
        bucket = self._buckets[key]
        bucket.items = [e for e in bucket.items if e[2].id != item.id]
        if not bucket.items:
            del self._buckets[key]

    def _freed(self, node_index: int) -> None:
        self._touch(node_index)
        self._dirty_nodes.add(node_index)

    def _touch(self, node_index: int, started_class: PriorityClass | None = None) -> None:
        """Something changed on a node; a start only matters to preemptors of a higher class than its own."""
        self._victim_version += 1
        if started_class is None:
            self._touched_at[:, node_index] = self._victim_version
        else:
            self._touched_at[int(started_class) + 1 :, node_index] = self._victim_version

    def _forget_running(self, item_id: str) -> Running | None:
        running = self.running.pop(item_id, None)
        if running is not None:
            self._running_by_node.get(running.placement.node_index, {}).pop(item_id, None)
        return running

    def _record_start(self, item: WorkItem, placement: Placement, now_s: float) -> Running:
        model = self._model_of_node[placement.node_index]
        protected = now_s
        if self.config.honour_protection:
            if item.priority_class is PriorityClass.HIGH:
                protected = INFINITY
            elif item.priority_class is PriorityClass.NORMAL:
                minimum = self.config.normal_min_runtime_s if item.min_runtime_s is None else item.min_runtime_s
                protected = now_s + minimum
            if item.id in self._last_preempted_s:
                protected = max(protected, now_s + self.config.preempt_backoff_s)
        elif item.priority_class is PriorityClass.HIGH:
            protected = INFINITY
        running = Running(item, placement, model, now_s, protected, self._lineage.get(item.id, frozenset()))
        if now_s < protected < INFINITY:
            heapq.heappush(self._protection_heap, (protected, item.id))
        self.running[item.id] = running
        self._running_by_node.setdefault(placement.node_index, {})[item.id] = running
        self.queues.add(item.queue, model, item.request, +1)
        self._touch(placement.node_index, item.priority_class)
        return running

    def _start(
        self,
        item: WorkItem,
        placement: Placement,
        now_s: float,
        result: CycleResult,
        reason: str,
        after: tuple[str, ...] = (),
    ) -> None:
        self._dequeue(item)
        self._record_start(item, placement, now_s)
        result.starts.append(Start(item, placement, reason, after))
        if self._head == item.id:
            self._clear_head()

    def _clear_head(self) -> None:
        if self._reserved_node is not None:
            self._touch(self._reserved_node)
            self._dirty_nodes.add(self._reserved_node)  # work held off it may fit there now
            self._unblock_for({self._reserved_node})
        self._head = None
        self._reserved_node = None

    def _unblock_for(self, nodes: set[int]) -> None:
        """Buckets blocked before resources were freed on ``nodes`` are tried again if they could fit there."""
        rows = {n: self._node_free(n) for n in nodes}
        for bucket in self._buckets.values():
            if not bucket.blocked:
                if bucket.recheck_nodes is not None:
                    bucket.recheck_nodes |= nodes
                continue
            if bucket.is_gang:
                bucket.blocked = False
                continue
            where = {n for n, row in rows.items() if self._fits_on(bucket.request, n, row)}
            if where:
                bucket.blocked = False
                bucket.recheck_nodes = where

    def _node_free(self, node: int) -> tuple[list[int], list[int], int, int, bool]:
        count = int(self.state.device_count[node])
        return (
            self.state.free_share_milli[node, :count].tolist(),
            self.state.free_device_memory_mib[node, :count].tolist(),
            int(self.state.free_cpu_milli[node]),
            int(self.state.free_host_memory_mib[node]),
            bool(self.state.device_memory_known[node]),
        )

    def _fits_on(self, request: Request, node: int, row: tuple[list[int], list[int], int, int, bool]) -> bool:
        request = self.engine.effective(request)
        share, memory, cpu, host, memory_known = row
        if cpu < request.cpu_milli or host < request.host_memory_mib:
            return False
        if not request.device_count:
            return True
        if request.allowed_models and self._model_of_node[node] not in request.allowed_models:
            return False
        fitting = sum(
            1
            for s, m in zip(share, memory, strict=True)
            if s >= request.share_milli and (not memory_known or m >= request.device_memory_mib)
        )
        return fitting >= request.device_count

    def _order(self, bucket: _Bucket) -> tuple[object, ...]:
        head = bucket.head
        several = len(self.queues.specs) > 1
        borrowing = 0 if several and self._within_guarantee_any(head) else 1
        return (
            -int(head.priority_class),
            -head.priority,
            borrowing,
            self.queues.dominant_share(head.queue) if several else 0.0,
            bucket.items[0][0],
            bucket.items[0][1],
        )

    def _within_guarantee_any(self, item: WorkItem) -> bool:
        spec = self.queues.ensure(item.queue)
        if not spec.guarantee.share_milli and spec.guarantee.cpu_milli is None:
            return False
        return any(self.queues.within_guarantee(item.queue, m, item.request) for m in self._models_for(item.request))

    def _models_for(self, request: Request) -> list[str]:
        if not request.device_count:
            return [""]
        models = self.state.model_names
        return [m for m in models if not request.allowed_models or m in request.allowed_models]

    def _worth_trying(self, bucket: _Bucket, now_s: float) -> bool:
        if not bucket.blocked:
            return True
        if bucket.is_gang:
            return False
        if self.preemption is None or not self._may_preempt(bucket.head):
            return False
        blocked = bucket.preempt_blocked
        if blocked is None or now_s >= blocked[1]:
            return True
        if blocked[0] == self._victim_version:
            return False
        touched = self._touched_at[int(bucket.head.priority_class)]
        return bool((touched[self._node_array_for(bucket.request)] > blocked[0]).any())

    def _node_array_for(self, request: Request) -> np.ndarray:
        key = shape_key(request)
        nodes = self._static_arrays.get(key)
        if nodes is None:
            nodes = self._static_arrays[key] = np.asarray(self._nodes_for(request), dtype=np.int64)
        return nodes

    def _nodes_for(self, request: Request) -> list[int]:
        """Nodes where the request fits when empty (cached per shape)."""
        key = shape_key(request)
        nodes = self._static_nodes.get(key)
        if nodes is None:
            nodes = self._static_nodes[key] = np.flatnonzero(
                self.engine.feasible_when_empty(self.engine.effective(request))
            ).tolist()
        return nodes

    def _may_preempt(self, item: WorkItem) -> bool:
        if item.priority_class > PriorityClass.LOW:
            return True
        return self.config.reclaim and self._within_guarantee_any(item)

    # ------------------------------------------------------------------ internals: placing
    def _quota_models(self, item: WorkItem) -> list[str] | None:
        """Models on which the queue's limit still admits the item (None: any, the queue has no limit)."""
        spec = self.queues.ensure(item.queue)
        if spec.borrowing_limit is None:
            return None
        return [m for m in self._models_for(item.request) if self.queues.within_limit(item.queue, m, item.request)]

    def _restrict(self, request: Request, models: list[str] | None) -> Request | None:
        if models is None or not request.device_count:
            return request if models is None or models else None
        if not models:
            return None
        return replace(request, allowed_models=frozenset(models))

    def _mask(self, item: WorkItem) -> np.ndarray | None:
        """The reserved node is closed to work behind the head in line (work ahead of it may use it)."""
        if self._reserved_node is None or self._head == item.id:
            return None
        head_bucket = self._buckets.get(self._bucket_of.get(self._head or "", ()))
        own_bucket = self._buckets.get(self._bucket_of.get(item.id, ()))
        if head_bucket is not None and own_bucket is not None and self._order(own_bucket) < self._order(head_bucket):
            return None
        cached = self._mask_cache
        if cached is None or cached[0] != self._reserved_node:
            mask = np.ones(self.state.node_count, dtype=bool)
            mask[self._reserved_node] = False
            cached = self._mask_cache = (self._reserved_node, mask)
        return cached[1]

    def _try_one(self, bucket: _Bucket, now_s: float, result: CycleResult) -> bool:
        item = bucket.head
        models = self._quota_models(item)
        request = self._restrict(item.request, models)
        if request is None:
            if self._try_preempt_within_queue(bucket, item, now_s, result):
                return True
            model = next(iter(self._models_for(item.request)), "")
            bucket.reason = f"waits for queue {item.queue}'s quota: {self.queues.describe(item.queue, model)}"
            bucket.blocked = True
            bucket.quota_blocked = True
            return False
        bucket.quota_blocked = False
        if not bucket.blocked and bucket.recheck_nodes is not None:
            # Freed resources elsewhere were taken earlier in this cycle: skip the engine unless they still fit.
            nodes = bucket.recheck_nodes
            bucket.recheck_nodes = None
            if not any(self._fits_on(request, n, self._node_free(n)) for n in nodes):
                bucket.blocked = True
        if not bucket.blocked:
            outcome = self.engine.schedule(request, item.id, node_mask=self._mask(item))
            if outcome.status is Status.SCHEDULED and outcome.placement is not None:
                self._start(item, outcome.placement, now_s, result, "placed")
                return True
            if outcome.status is Status.ERROR:
                raise RuntimeError(outcome.reason)
            bucket.blocked = True
            held = outcome.reason.startswith("fits only on nodes held")
            bucket.reason = ("held", request) if held else ("resources", request)
        if self.preemption is not None and self._may_preempt(item):
            ready_s = self._pending_since.get(item.id, now_s) + self.config.preemption_delay_s
            if now_s < ready_s:
                bucket.preempt_blocked = (self._victim_version, ready_s)
                self._maybe_reserve(bucket, item, now_s)
                return False
            if self._try_preempt(item, request, now_s, result, bucket):
                return True
            bucket.preempt_blocked = (self._victim_version, self._protection_ends(now_s))
            if item.priority_class > PriorityClass.LOW and bucket.reason[:1] == ("resources",):
                bucket.reason = ("resources-preempt", bucket.reason[-1])
        self._maybe_reserve(bucket, item, now_s)
        return False

    def _try_preempt_within_queue(self, bucket: _Bucket, item: WorkItem, now_s: float, result: CycleResult) -> bool:
        """The item's queue is at its limit: stop the queue's own lower-class work so that its quota and the
        slices make room (kube-scheduler and Kueue preempt lower priorities within a queue; waiting would
        leave the item behind work it may preempt). The victims that free the quota are the fewest, then
        least lost work; if the item does not fit where they freed slices, the usual victim choice opens a
        hole among the other lower-class work."""
        if self.preemption is None or item.gang or item.priority_class is PriorityClass.LOW:
            return False
        blocked = bucket.quota_preempt_blocked
        if blocked is not None and blocked[0] == self._victim_version and now_s < blocked[1]:
            return False
        ready_s = self._pending_since.get(item.id, now_s) + self.config.preemption_delay_s
        if now_s < ready_s:
            bucket.quota_preempt_blocked = (self._victim_version, ready_s)
            return False
        bucket.quota_preempt_blocked = (self._victim_version, self._protection_ends(now_s))
        ancestors = self._lineage.get(item.id, frozenset())
        own = [
            r
            for r in self.running.values()
            if r.item.queue == item.queue
            and r.item.priority_class < item.priority_class
            and not r.item.gang
            and now_s >= r.protected_until_s
            and r.item.id not in ancestors
            and item.id not in r.preempted_by
        ]
        if not own:
            return False

        def lost(r: Running) -> float:
            return self.lost_work_s(r, now_s) * r.placement.share_milli * len(r.placement.device_indices)

        def quota_models(victims: list[Running]) -> list[str] | None:
            """``_quota_models`` once ``victims`` are gone."""
            for v in victims:
                self.queues.add(v.item.queue, v.model, v.item.request, -1)
            try:
                return self._quota_models(item)
            finally:
                for v in victims:
                    self.queues.add(v.item.queue, v.model, v.item.request, +1)

        def admitted(victims: list[Running]) -> bool:
            models = quota_models(victims)
            return models is None or bool(models)

        own.sort(key=lambda r: (r.item.priority_class, lost(r), -r.item.request.total_share_milli))
        chosen = next(([r] for r in own if admitted([r])), [])
        if not chosen:
            for r in own:
                chosen.append(r)
                if admitted(chosen):
                    break
            else:
                return False
        request = self._restrict(item.request, quota_models(chosen))
        if request is None:
            return False
        effective = self.engine.effective(request)
        mask = self._mask(item)
        checkpoint = self.state.checkpoint()
        for v in chosen:
            self.state.unreserve(v.item.id)
        node_mask = None if mask is None else mask.copy()
        outcome = self.engine.schedule(request, item.id, node_mask=node_mask)
        if outcome.status is Status.SCHEDULED and outcome.placement is not None:
            node = outcome.placement.node_index
            self._rollback_placements(checkpoint, [])
            extra: tuple[Running, ...] = ()
        else:
            # The quota victims' slices alone leave no room: a hole among the other lower-class work too.
            taken = {v.item.id for v in chosen}
            candidates = [n for n in self._nodes_for(request) if mask is None or mask[n]]
            by_node = {
                n: members
                for n, victims in self._eligible_victims(item, now_s, candidates).items()
                if (members := [r for r in victims if r.item.id not in taken])
            }
            nodes = [n for n in candidates if n in by_node]
            choice = self.preemption.choose(self.state, effective, nodes, by_node, lost) if nodes else None
            self._rollback_placements(checkpoint, [])
            if choice is None:
                return False
            node, extra = choice.node_index, choice.victims
        victims = tuple(chosen) + extra
        return self._commit_preemption(item, request, VictimSet(node, victims, 0.0, 0), now_s, result)

    def _maybe_reserve(self, bucket: _Bucket, item: WorkItem, now_s: float) -> None:
        if self.config.reservation and not item.gang and not bucket.quota_blocked:
            if self._head is not None and self._head != item.id:
                head_bucket = self._buckets.get(self._bucket_of.get(self._head, ()))
                if head_bucket is not None and self._order(bucket) < self._order(head_bucket):
                    self._clear_head()  # a blocked item ahead of the head in line takes over the reservation
            if self._head is None:
                self._reserve_for(item, now_s)

    def _held_reason(self, now_s: float) -> str:
        head = self.pending.get(self._head or "")
        if head is None:
            return "the room it fits in was held for work ahead of it in line; it is tried again"
        label = head.label
        return f"held behind {label}, first in line for {now_s - self._head_since_s:.0f} s"

    def _resource_reason(self, request: Request) -> str:
        request = self.engine.effective(request)
        state = self.state
        if not self.engine.ever_fits(request):
            return "can never fit on this cluster: " + self.engine.explain(request)
        models = "/".join(sorted(request.allowed_models)) or "device"
        if request.device_count == 0:
            best = int(state.free_cpu_milli.max()) if state.node_count else 0
            return f"needs {request.cpu_milli / 1000:g} CPUs; the most free on any node is {best / 1000:g}"
        mask = state.model_mask(request.allowed_models)
        host_ok = (state.free_cpu_milli >= request.cpu_milli) & (state.free_host_memory_mib >= request.host_memory_mib)
        free = np.where(state.device_present & mask[:, None], state.free_share_milli, 0)
        if request.device_count == 1 and request.share_milli < FULL_SHARE_MILLI:
            most = int(free.max()) if free.size else 0
            if most >= request.share_milli:
                if not host_ok[mask].any():
                    return (
                        f"needs {request.cpu_milli / 1000:g} CPUs beside its slice; no node with a free slice has them"
                    )
                return f"needs {request.device_memory_mib} MiB of device memory beside {request.share_milli / 10:g} %"
            return (
                f"needs {request.share_milli / 10:g} % on one {models}; the most free on any device is {most / 10:g} %"
            )
        if request.multi_slice:
            enough = (free >= request.share_milli).sum(axis=1)
            most = int(enough.max()) if enough.size else 0
            if most >= request.device_count:
                if not host_ok[enough >= request.device_count].any():
                    return (
                        f"needs {request.cpu_milli / 1000:g} CPUs and {request.host_memory_mib} MiB beside its "
                        "slices; no node with room for the slices has them"
                    )
                return (
                    f"needs {request.device_memory_mib} MiB of device memory beside {request.share_milli / 10:g} % "
                    f"on each of {request.device_count} devices"
                )
            return (
                f"needs {request.share_milli / 10:g} % on each of {request.device_count} {models}s on one node; "
                f"at most {most} such on any node"
            )
        whole = (free == FULL_SHARE_MILLI).sum(axis=1)
        most = int(whole.max()) if whole.size else 0
        if most >= request.device_count:
            return f"needs {request.cpu_milli / 1000:g} CPUs and {request.host_memory_mib} MiB beside its devices"
        return (
            f"needs {request.device_count} whole {models}{'s' if request.device_count > 1 else ''} on one node; "
            f"at most {most} free on any node"
        )

    def _reserve_for(self, item: WorkItem, now_s: float) -> None:
        """The head: hold the node that is closest to fitting it (least share missing)."""
        request = self.engine.effective(item.request)
        state = self.state
        if not self.engine.ever_fits(request):
            return
        mask = state.model_mask(request.allowed_models) if request.device_count else np.ones(state.node_count, bool)
        mask &= state.capacity_cpu_milli >= request.cpu_milli
        mask &= state.capacity_host_memory_mib >= request.host_memory_mib
        mask &= state.device_count >= request.device_count
        candidates = np.flatnonzero(mask)
        if not len(candidates):
            return
        if request.device_count:
            free = np.sort(state.free_share_milli[candidates], axis=1)[:, ::-1][:, : request.device_count]
            missing = (request.share_milli - free).clip(min=0).sum(axis=1)
        else:
            missing = (request.cpu_milli - state.free_cpu_milli[candidates]).clip(min=0)
        self._head = item.id
        self._head_since_s = now_s
        self._reserved_node = int(candidates[int(np.argmin(missing))])

    # ------------------------------------------------------------------ internals: preemption
    def _eligible_victims(self, preemptor: WorkItem, now_s: float, nodes: Iterable[int]) -> dict[int, list[Running]]:
        ancestors = self._lineage.get(preemptor.id, frozenset())
        reclaiming = self.config.reclaim and self._within_guarantee_any(preemptor)
        by_node: dict[int, list[Running]] = {}
        if not ancestors and not reclaiming:
            # The common case: candidates depend only on the node, the class and the time; shared per cycle.
            cls = int(preemptor.priority_class)
            for n in nodes:
                key = int(self._touched_at[cls, n])
                cached = self._eligible_cache.get((n, cls))
                if cached is None or cached[0] != key or cached[1] != now_s:
                    members = [
                        r
                        for r in self._running_by_node.get(n, {}).values()
                        if r.item.priority_class < preemptor.priority_class
                        and now_s >= r.protected_until_s
                        and not r.item.gang
                    ]
                    cached = self._eligible_cache[(n, cls)] = (key, now_s, members)
                members = [r for r in cached[2] if preemptor.id not in r.preempted_by]
                if members:
                    by_node[n] = members
            return by_node
        for r in (r for n in nodes for r in self._running_by_node.get(n, {}).values()):
            victim = r.item
            if victim.priority_class is PriorityClass.HIGH or victim.id in ancestors:
                continue
            if preemptor.id in r.preempted_by:
                continue
            if now_s < r.protected_until_s:
                continue
            if victim.gang:
                continue  # a gang member is stopped only with its gang
            lower = victim.priority_class < preemptor.priority_class
            borrower = (
                reclaiming and victim.queue != preemptor.queue and self.queues.over_guarantee(victim.queue, r.model)
            )
            if lower or borrower:
                by_node.setdefault(r.placement.node_index, []).append(r)
        return by_node

    def lost_work_s(self, running: Running, now_s: float) -> float:
        """Seconds of work the item redoes if stopped now (``low`` restarts from scratch)."""
        ran = max(0.0, now_s - running.started_s)
        if running.item.priority_class is PriorityClass.NORMAL and self.config.normal_checkpoint_s:
            return ran % self.config.normal_checkpoint_s
        return ran

    def _try_preempt(
        self, item: WorkItem, request: Request, now_s: float, result: CycleResult, bucket: _Bucket
    ) -> bool:
        assert self.preemption is not None
        effective = self.engine.effective(request)
        candidates = self._nodes_for(request)
        blocked = bucket.preempt_blocked
        if blocked is not None and now_s < blocked[1] and not self._within_guarantee_any(item):
            # Found nothing before: only nodes where something changed since can offer a hole now.
            touched = self._touched_at[int(item.priority_class)]
            candidates = [n for n in candidates if touched[n] > blocked[0]]
        mask = self._mask(item)
        if mask is not None:
            candidates = [n for n in candidates if mask[n]]
        by_node = self._eligible_victims(item, now_s, candidates)
        nodes = [n for n in candidates if n in by_node]
        if not nodes:
            return False

        def lost(r: Running) -> float:
            return self.lost_work_s(r, now_s) * r.placement.share_milli * len(r.placement.device_indices)

        choice = self.preemption.choose(self.state, effective, nodes, by_node, lost)
        if choice is None:
            return False
        return self._commit_preemption(item, request, choice, now_s, result)

    def _commit_preemption(
        self, item: WorkItem, request: Request, choice: VictimSet, now_s: float, result: CycleResult
    ) -> bool:
        node_mask = np.zeros(self.state.node_count, dtype=bool)
        node_mask[choice.node_index] = True
        checkpoint = self.state.checkpoint()
        for v in choice.victims:
            self.state.unreserve(v.item.id)
        outcome = self.engine.schedule(request, item.id, node_mask=node_mask)
        if outcome.status is not Status.SCHEDULED or outcome.placement is None:
            self._rollback_placements(checkpoint, [])
            return False
        # Commit: the victims' slices are gone from the ledger; tell the policy and the books.
        for v in choice.victims:
            self.engine.policy.released(self.engine.effective(v.item.request), v.placement)
        placement = outcome.placement
        if not choice.victims:
            self._start(item, placement, now_s, result, "placed")
            return True
        freed = self._describe_hole(choice, placement)
        for v in choice.victims:
            self._forget_running(v.item.id)
            self.queues.add(v.item.queue, v.model, v.item.request, -1)
            self._dirty_queues.add(v.item.queue)
            self.stopping[v.item.id] = v.item
            self.preempt_count[v.item.id] = self.preempt_count.get(v.item.id, 0) + 1
            self._last_preempted_s[v.item.id] = now_s
            self._lineage[v.item.id] = frozenset(list({item.id} | self._lineage.get(item.id, frozenset()))[:64])
            lost = self.lost_work_s(v, now_s)
            result.preemptions.append(Preempt(v.item, item.id, f"preempted by {item.label} to free {freed}", lost))
        for node in {choice.node_index} | {v.placement.node_index for v in choice.victims}:
            self._touch(node)  # its victims are gone: every class's view of the node changed
            self._dirty_nodes.add(node)  # share freed beyond the hole may seat others
        self._start(
            item,
            placement,
            now_s,
            result,
            f"preempted {len(choice.victims)} to free {freed}",
            tuple(v.item.id for v in choice.victims),
        )
        return True

    def _rollback_placements(self, checkpoint: int, placed: list[tuple[WorkItem, Placement]]) -> None:
        """Undo a what-if: the ledger goes back to ``checkpoint`` and the policy forgets what it was told."""
        for member, placement in placed:
            self.engine.policy.released(self.engine.effective(member.request), placement)
        self.state.rollback(checkpoint)

    def _describe_hole(self, choice: VictimSet, placement: Placement) -> str:
        node = self.state.nodes[choice.node_index]
        devices = sorted(
            {d for v in choice.victims for d in v.placement.device_indices} & set(placement.device_indices)
        )
        share = sum(v.placement.share_milli for v in choice.victims for d in v.placement.device_indices if d in devices)
        where = ", ".join(f"GPU {d}" for d in devices) or "host resources"
        return f"{share / 10:g} % of {where} on {node.name}"

    def _protection_ends(self, now_s: float) -> float:
        """The next time a running item's protection (minimum runtime, back-off) ends."""
        heap = self._protection_heap
        while heap:
            until, item_id = heap[0]
            running = self.running.get(item_id)
            if until > now_s and running is not None and running.protected_until_s == until:
                return until
            heapq.heappop(heap)
        return INFINITY

    def _next_wakeup(self, now_s: float) -> float | None:
        wake = INFINITY
        for bucket in self._buckets.values():
            if bucket.preempt_blocked is not None and bucket.blocked:
                wake = min(wake, bucket.preempt_blocked[1])
            if bucket.quota_preempt_blocked is not None and bucket.blocked:
                wake = min(wake, bucket.quota_preempt_blocked[1])
        for deadline, _ in self._unconfirmed_gangs.values():
            wake = min(wake, deadline)
        return None if wake == INFINITY else max(wake, now_s)

    # ------------------------------------------------------------------ internals: gangs
    def _try_gang(self, bucket: _Bucket, now_s: float, result: CycleResult) -> bool:
        members = [entry[2] for entry in bucket.items]
        size = members[0].gang_size
        gang = members[0].gang
        if len(members) < size:
            waited = now_s - bucket.items[0][0]
            bucket.reason = f"gang {gang}: {len(members)} of {size} members submitted (first {waited:.0f} s ago)"
            bucket.blocked = True
            return False
        checkpoint = self.state.checkpoint()
        trial = CycleResult()
        placed: list[tuple[WorkItem, Placement]] = []
        ok = True
        for member in members[:size]:
            request = self._restrict(member.request, self._quota_models(member))
            outcome = self.engine.schedule(request, member.id, node_mask=self._mask(member)) if request else None
            if outcome is not None and outcome.status is Status.SCHEDULED and outcome.placement is not None:
                placed.append((member, outcome.placement))
                # Count it now, so the next member's quota check sees it.
                self.queues.add(member.queue, self._model_of_node[outcome.placement.node_index], member.request, +1)
                continue
            ok = False
            bucket.reason = (
                f"gang {gang}: {len(placed)} of {size} members fit now; it starts all together or not at all"
            )
            break
        for member, placement in placed:
            self.queues.add(member.queue, self._model_of_node[placement.node_index], member.request, -1)
        if not ok:
            self._rollback_placements(checkpoint, placed)
            bucket.blocked = True
            return False
        for member, placement in placed:
            self._start(member, placement, now_s, trial, f"gang {gang}: all {size} members placed")
        result.starts.extend(trial.starts)
        self._unconfirmed_gangs[gang] = (now_s + self.config.gang_timeout_s, {m.id for m, _ in placed})
        return True

    def _expire_gangs(self, now_s: float, result: CycleResult) -> None:
        for gang, (deadline, unconfirmed) in list(self._unconfirmed_gangs.items()):
            if now_s < deadline:
                continue
            del self._unconfirmed_gangs[gang]
            members = [r for r in self.running.values() if r.item.gang == gang]
            for r in members:
                self._forget_running(r.item.id)
                self.engine.release(r.item.id, r.item.request)
                self.queues.add(r.item.queue, r.model, r.item.request, -1)
                self._freed(r.placement.node_index)
                self.stopping[r.item.id] = r.item
                result.preemptions.append(
                    Preempt(
                        r.item,
                        "",
                        f"gang {gang}: {len(unconfirmed)} member(s) did not start within "
                        f"{self.config.gang_timeout_s:g} s; the gang's slices are released",
                        self.lost_work_s(r, now_s),
                    )
                )


__all__ = ["HiConfig", "HiScheduler", "shape_key"]
