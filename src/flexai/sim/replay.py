"""The replay over time: a discrete-event simulation of a production trace on a sub-cluster, through ``flexai.hi``.

- Arrivals are the trace's ``creation_time``; a pod that ran needs ``deletion_time - scheduled_time`` of
  work; a pod that never ran leaves after its recorded wait unless started before (then it stays until its
  recorded deletion, doing no requested work). Pods alive when the 34-day window opens start as residents.
- The trace is a sample of a large cluster, so the replay runs on a sub-cluster drawn from the node list
  (each device model keeps its share of the GPUs; nodes drawn at random within a model) and sets the
  offered load by superposing copies of the trace shifted by whole days (wrapping inside the window); the
  last copy is thinned at random so the offered GPU-time is exactly ``load`` x the sub-cluster's.
- QoS maps to classes: LS -> ``high``, Burstable/Guaranteed -> ``normal`` (lost work counted from a
  30-minute checkpoint), BE -> ``low`` (restarts from scratch).
- Busy GPU: each ``high`` and ``normal`` pod gets a GenAI duty-cycle series and a phase drawn with the
  seed, integrated over its runs; ``low`` (batch) work counts as busy over its whole share.

- Time-sharing (``hi``): every ``TICK_S`` the replay shows Hi what the devices did (the owners' utilisation
  over the last tick, from their duty-cycle series; their memory from the GenAI memory series, at its peak
  over the coming tick, as the pool's memory watchdog sees it at once) and carries out Hi's decisions. A
  ``low`` guest gets the owners' idle time on its devices (``min(share, 1 - owners' use)``, nothing while the
  owners are busy) and finishes when that adds up to its work; a guest that yields for memory loses its work
  (``low`` restarts from scratch). Owners are slowed by ``interference`` (alpha) per co-running guest: that
  is reported as ``high_slowdown``; the owners' lifetimes stay the trace's.
- Migration (``hi``): a move stops the pod, costs it ``MOVE_DOWNTIME_S`` and its work since its last
  checkpoint, and restarts it on the target Hi already reserved.

- Allocated GPU counts what the scheduler granted (a whole-GPU scheduler rounds slices up); work done
  counts the GPU-hours of *requested* work performed inside the window and kept: the requested share times
  run time, less the work redone after preemptions (lost work), for pods that ran in the trace.

Every scheduler decides through ``HiScheduler``; they differ only in policy and configuration.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np

from flexai.hi import QOS_CLASSES, HiConfig, HiScheduler, PriorityClass, WorkItem
from flexai.model.cluster import Node, Placement
from flexai.model.state import ClusterState
from flexai.scheduler import PolicyContext, Scheduler, create_policy
from flexai.sim.duty import DutyGrid, DutySeries, duty_grid, load_duty_series
from flexai.sim.openb import NodeList, PodTrace

DAY_S = 86_400.0
CHECKPOINT_S = 1800.0
TICK_S = 300.0
"""How often the replay shows Hi what the devices did (time-sharing)."""
MOVE_DOWNTIME_S = 60.0
"""What one migration costs a pod beside its work since its last checkpoint."""
MAX_MOVES = 16
"""Moves per defragmentation (KAI caps consolidation at 16 victims)."""
CONSOLIDATION_INTERVAL_S = 3600.0


@dataclass(frozen=True)
class ReplayScheduler:
    name: str
    policy: str
    hi: HiConfig
    description: str


_HI = HiConfig(normal_checkpoint_s=CHECKPOINT_S, preemption_delay_s=120.0)

REPLAY_SCHEDULERS: dict[str, ReplayScheduler] = {
    s.name: s
    for s in (
        ReplayScheduler(
            "k8s-default",
            "k8s-whole-gpu",
            HiConfig(preemption="k8s-default", reservation=False, honour_protection=False, reclaim=False),
            "plain Kubernetes: whole GPUs, least-allocated, priority queue, default preemption of whole pods",
        ),
        ReplayScheduler(
            "fgd",
            "fgd",
            HiConfig(preemption="none", reservation=False, reclaim=False),
            "FGD placement of slices, priority then arrival order, no preemption",
        ),
        ReplayScheduler(
            "flex",
            "flex",
            HiConfig(preemption="none", reservation=False, reclaim=False),
            "flex placement of slices, priority then arrival order, no preemption",
        ),
        ReplayScheduler(
            "hi",
            "flex",
            replace(_HI, timeshare=True, defrag_max_moves=MAX_MOVES, consolidation_interval_s=CONSOLIDATION_INTERVAL_S),
            "flex placement under flexai.hi: fraction-aware preemption, backfill with reservation, time-sharing "
            f"of idle share, defragmentation by at most {MAX_MOVES} moves",
        ),
        ReplayScheduler(
            "hi-no-timeshare",
            "flex",
            replace(_HI, defrag_max_moves=MAX_MOVES, consolidation_interval_s=CONSOLIDATION_INTERVAL_S),
            "hi without time-sharing (ablation)",
        ),
        ReplayScheduler(
            "hi-no-defrag",
            "flex",
            replace(_HI, timeshare=True),
            "hi without defragmentation (ablation)",
        ),
    )
}


class ReplayError(ValueError):
    """Input the replay refuses: one line naming the field, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class ReplayPod:
    """One pod of one copy of the trace, on the replay's clock."""

    key: str
    trace_index: int
    arrival_s: float
    work_s: float
    """Requested work inside the window (0 for a pod that never ran)."""
    leave_s: float
    """For a pod that never ran: when its user gives up (or deletes it, if it was started)."""
    ran: bool
    resident: bool


@dataclass(frozen=True)
class Workload:
    window_s: tuple[float, float]
    pods: tuple[ReplayPod, ...]
    copies: int
    offered_load: float


def trace_window(trace: PodTrace) -> tuple[float, float]:
    times = trace.times
    assert times is not None
    return float(times.deletion_s.min()), float(times.deletion_s.max())


def build_workload(trace: PodTrace, gpus: int, load: float, rng: np.random.Generator) -> Workload:
    """Superpose day-shifted copies of the trace until the offered GPU-time is ``load`` x the sub-cluster's."""
    times = trace.times
    if times is None:
        raise ReplayError(
            f"trace={trace.name!r} is not allowed: it has no time columns (creation_time, deletion_time, "
            "scheduled_time); the multigpu variants carry none"
        )
    w0, w1 = trace_window(trace)
    window = w1 - w0
    gpu_share = np.array([r.total_share_milli for r in trace.requests], dtype=np.float64) / 1000.0
    base: list[tuple[int, float, float, float, bool, bool]] = []
    for i in range(len(trace.requests)):
        created, deleted, scheduled = times.creation_s[i], times.deletion_s[i], times.scheduled_s[i]
        if deleted <= w0:
            continue
        ran = not math.isnan(scheduled)
        if created < w0:
            if not ran:
                continue
            base.append((i, w0, deleted - max(scheduled, w0), deleted, True, True))
        else:
            work = deleted - scheduled if ran else 0.0
            base.append((i, created, work, deleted, ran, False))
    target = load * gpus * window
    pods: list[ReplayPod] = []
    offered = 0.0
    shifts = [0.0] + [float(d) * DAY_S for d in rng.permutation(np.arange(1, max(2, int(window // DAY_S))))]
    copy = 0
    while offered < target:
        if copy >= len(shifts):
            shifts.append(float(rng.integers(0, int(window // DAY_S))) * DAY_S)
        batch = _rotated_copy(base, copy, shifts[copy], w0, w1, gpu_share)
        copy_demand = sum(d for d, _ in batch)
        if offered + copy_demand <= target:
            pods.extend(p for _, p in batch)
            offered += copy_demand
        else:
            for j in rng.permutation(len(batch)):
                demand, pod = batch[int(j)]
                if offered >= target:
                    break
                pods.append(pod)
                offered += demand
        copy += 1
        if copy > 10_000:
            raise ReplayError(f"load={load} is not allowed here: the trace offers too little GPU-time for it")
    pods.sort(key=lambda p: (p.arrival_s, p.key))
    return Workload((w0, w1), tuple(pods), copy, offered / (gpus * window))


def _rotated_copy(
    base: list[tuple[int, float, float, float, bool, bool]],
    copy: int,
    shift: float,
    w0: float,
    w1: float,
    gpu_share: np.ndarray,
) -> list[tuple[float, ReplayPod]]:
    """The trace rotated by ``shift`` inside the window: what runs past the end wraps round to its start (as a
    resident), so every copy offers the same GPU-time with its peaks moved by whole days."""
    window = w1 - w0
    batch: list[tuple[float, ReplayPod]] = []
    for i, arrival, work, leave, ran, resident in base:
        start = w0 + ((arrival - w0 + shift) % window)
        key = f"{copy}-{i}"
        if not ran:
            batch.append((0.0, ReplayPod(key, i, start, 0.0, start + (leave - arrival), False, False)))
            continue
        first = min(work, w1 - start)
        batch.append(
            (
                gpu_share[i] * first,
                ReplayPod(key, i, start, work if shift == 0 else first, start + work, True, resident and shift == 0),
            )
        )
        wrapped = work - first if shift else 0.0
        if wrapped > 0:
            # The rest of a run that the rotation carried past the window's end runs from its start.
            batch.append((gpu_share[i] * wrapped, ReplayPod(key + "w", i, w0, wrapped, w0 + wrapped, True, True)))
    return batch


def draw_subcluster(nodes: NodeList, gpus: int, rng: np.random.Generator) -> tuple[Node, ...]:
    """Nodes whose GPUs add up to ``gpus`` (or just past it), each device model keeping its share of GPUs."""
    gpu_nodes = [n for n in nodes.nodes if n.device_count]
    total = sum(n.device_count for n in gpu_nodes)
    if total == 0:
        raise ReplayError(f"nodes={nodes.name!r} is not allowed: the list has no GPU nodes")
    if not 1 <= gpus <= total:
        raise ReplayError(f"gpus={gpus} is not allowed: 1..{total} (the GPUs in node list {nodes.name!r})")
    by_model: dict[str, list[Node]] = {}
    for n in sorted(gpu_nodes, key=lambda n: n.name):
        by_model.setdefault(n.device_model, []).append(n)
    exact = {m: gpus * sum(n.device_count for n in ns) / total for m, ns in by_model.items()}
    target = {m: int(v) for m, v in exact.items()}
    for m in sorted(exact, key=lambda m: (-(exact[m] - target[m]), m))[: gpus - sum(target.values())]:
        target[m] += 1
    chosen: list[Node] = []
    carry = 0  # GPUs taken beyond one model's target come off the next one's, so the total stays near ``gpus``
    for model in sorted(by_model, key=lambda m: (-target[m], m)):
        remaining = target[model] - carry
        carry = 0
        if remaining <= 0:
            carry = -remaining
            continue
        members = [by_model[model][int(i)] for i in rng.permutation(len(by_model[model]))]
        rest = []
        for n in members:
            if n.device_count <= remaining:
                chosen.append(n)
                remaining -= n.device_count
            else:
                rest.append(n)
            if remaining == 0:
                break
        if remaining > 0 and rest:
            extra = min(rest, key=lambda n: n.device_count)
            chosen.append(extra)
            carry = extra.device_count - remaining
    return tuple(chosen)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class _PodRun:
    pod: ReplayPod
    item: WorkItem
    index: int
    share_gpus: float
    """What the pod asked for (GPUs); its real use and its requested work are counted in it."""
    remaining_s: float
    series: int
    phase_s: float
    token: int = 0
    granted_gpus: float = 0.0
    """What the scheduler granted (a whole-GPU scheduler rounds slices up)."""
    started_s: float | None = None
    first_start_s: float | None = None
    preemptions: int = 0
    moves: int = 0
    done: bool = False
    guest: bool = False
    """Running as a time-sharing guest (progress counted per tick, in GPU-seconds)."""
    guest_done_gpu_s: float = 0.0
    guest_devices: tuple[int, ...] = ()
    guest_node: int = -1
    slots: tuple[int, ...] = ()
    """Its entries in the owners' table (one per device), while it runs as an owner."""
    run_s: float = 0.0
    corun_s: float = 0.0
    """Seconds x guests beside it (the most on any of its devices), for the owners' slowdown."""


@dataclass
class ReplayResult:
    scheduler: str
    load: float
    seed: int
    gpus: int
    gpu_allocated_pct: float
    gpu_busy_pct: float
    work_done_gpu_hours: float
    queue_delay_s: dict[str, dict[str, float]]
    completed: int
    abandoned: int
    preemptions: int
    preempted_over_3: int
    lost_gpu_hours: float
    wall_s: float
    pods: int
    never_fit: int
    offered_load: float
    copies: int
    interference: float = 0.02
    migrations: int = 0
    migrated_pods_pct: float = 0.0
    blocked_by_fragmentation_pct: float = 0.0
    high_slowdown: dict[str, float] = field(default_factory=lambda: {"p50": 0.0, "p99": 0.0})
    opportunistic_gpu_hours: float = 0.0
    idle_unusable_for_memory_pct: float = 0.0
    multi_gpu_queue_delay_s: dict[str, float] = field(default_factory=lambda: {"p50": 0.0, "p99": 0.0})
    guest_starts: int = 0
    guest_yields: int = 0
    series: dict[str, list[float]] = field(default_factory=dict)
    """Hourly points for the report: time (h), allocated and busy GPUs, and the queueing delays per class."""
    high_corun_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per ``high`` pod that ran: guests beside it, time-averaged over its run (the slowdown is alpha x this)."""

    def json(self) -> dict[str, object]:
        """Every field but the hourly series (those go to the plots) and the per-pod table."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("series", "high_corun_fraction")}

    def with_interference(self, alpha: float) -> ReplayResult:
        """The same run reported at another interference alpha (alpha slows the owners, it changes no decision)."""
        slowdown = alpha * self.high_corun_fraction
        return replace(
            self,
            interference=alpha,
            high_slowdown={
                "p50": float(np.percentile(slowdown, 50)) if len(slowdown) else 0.0,
                "p99": float(np.percentile(slowdown, 99)) if len(slowdown) else 0.0,
            },
        )


Progress = Callable[[float], None]

ARRIVE, FINISH, GIVE_UP, WAKE, TICK, RESUME = 0, 1, 2, 3, 4, 5


class _Owners:
    """The devices' owners (every granted slice), as flat arrays: what the devices do at any time is a few
    array lookups in the duty grid. ``low`` work counts as using its whole share (series ``constant``)."""

    def __init__(self, capacity: int) -> None:
        self.series = np.zeros(capacity, dtype=np.int64)
        self.phase = np.zeros(capacity)
        self.share = np.zeros(capacity)
        self.device = np.zeros(capacity, dtype=np.int64)
        self.live = np.zeros(capacity, dtype=bool)
        self.owner = np.zeros(capacity, dtype=np.int64)
        self.free: list[int] = list(range(capacity - 1, -1, -1))

    def add(
        self, run_index: int, series: int, phase_s: float, share: float, flat_devices: list[int]
    ) -> tuple[int, ...]:
        if len(self.free) < len(flat_devices):
            self._grow()
        slots = tuple(self.free.pop() for _ in flat_devices)
        for slot, flat in zip(slots, flat_devices, strict=True):
            self.series[slot], self.phase[slot], self.share[slot] = series, phase_s, share
            self.device[slot], self.owner[slot], self.live[slot] = flat, run_index, True
        return slots

    def remove(self, slots: tuple[int, ...]) -> None:
        for slot in slots:
            self.live[slot] = False
            self.share[slot] = 0.0
            self.free.append(slot)

    def _grow(self) -> None:
        n = len(self.share)
        for name in ("series", "phase", "share", "device", "live", "owner"):
            old = getattr(self, name)
            new = np.zeros(2 * n, dtype=old.dtype)
            new[:n] = old
            setattr(self, name, new)
        self.free.extend(range(2 * n - 1, n - 1, -1))


def run_replay(  # noqa: C901  (one event loop; its parts share the run's state)
    trace: PodTrace,
    nodes: NodeList,
    scheduler: str,
    load: float,
    seed: int,
    gpus: int = 128,
    progress: Progress | None = None,
    duty: tuple[DutySeries, ...] | None = None,
    interference: float = 0.02,
) -> ReplayResult:
    """One replay: one scheduler, one offered load, one seed."""
    began = time.perf_counter()
    spec = REPLAY_SCHEDULERS.get(scheduler)
    if spec is None:
        raise ReplayError(f"scheduler={scheduler!r} is not allowed: one of {', '.join(REPLAY_SCHEDULERS)}")
    if not load > 0:
        raise ReplayError(f"load={load} is not allowed: a fraction of the GPU capacity > 0")
    if not 0 <= interference <= 10:
        raise ReplayError(f"interference={interference} is not allowed: a slowdown per co-runner in 0..10")
    rng = np.random.default_rng(seed)
    sub = draw_subcluster(nodes, gpus, rng)
    workload = build_workload(trace, gpus, load, rng)
    duty = duty if duty is not None else load_duty_series()
    grid = DutyGrid.of(duty, TICK_S) if duty is not load_duty_series() else duty_grid(TICK_S)
    constant = len(duty)  # the series index of work that uses its whole share all the time (``low``)
    grid_busy = np.vstack([grid.busy, np.ones((1, grid.busy.shape[1]))])
    grid_memory = np.vstack([grid.memory, np.ones((1, grid.memory.shape[1]))])
    grid_steps = np.append(grid.steps, 1)
    real_gpus = sum(n.device_count for n in sub)
    state = ClusterState(sub)
    policy = create_policy(spec.policy, PolicyContext(profile=trace.profile(), rng=np.random.default_rng(seed)))
    engine = Scheduler(state, policy, rng.permutation(len(sub)))
    hi = HiScheduler(engine, spec.hi)
    timeshare = spec.hi.timeshare
    w0, w1 = workload.window_s
    max_devices = state.max_devices_per_node
    device_memory_mib = state.capacity_device_memory_mib.astype(np.float64).ravel()
    owned_capacity = state.capacity_share_milli.ravel() > 0

    runs: dict[str, _PodRun] = {}
    run_list: list[_PodRun] = []
    events: list[tuple[float, int, int, str, int]] = []
    seq = 0

    def push(t: float, kind: int, key: str, token: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, kind, seq, key, token))

    pods_by_key = {pod.key: pod for pod in workload.pods}
    wakes: set[float] = set()
    for pod in workload.pods:
        push(pod.arrival_s, ARRIVE, pod.key)
    if timeshare:
        push(w0 + TICK_S, TICK, "")

    allocated_gpu_s = 0.0
    busy_gpu_s = 0.0
    lost_gpu_s = 0.0
    work_done_gpu_s = 0.0
    opportunistic_gpu_s = 0.0
    idle_while_low_waits_s = 0.0
    idle_short_of_memory_s = 0.0
    fragmentation_blocked_s = 0.0
    completed = abandoned = preemptions = never_fit = migrations = guest_starts = guest_yields = 0
    hourly_alloc = np.zeros(int(math.ceil((w1 - w0) / 3600)) + 1)
    hourly_busy = np.zeros_like(hourly_alloc)
    owners = _Owners(4096)
    guests: dict[str, _PodRun] = {}
    last_tick = w0
    last_cycle = w0
    head_fragmented = False

    def hour_add(array: np.ndarray, begin: float, end: float, amount: float) -> None:
        first, last = int((begin - w0) // 3600), int((end - w0) // 3600)
        if first == last:
            array[first] += amount
        else:  # spread over the hours it spans (pro rata: enough for a plot)
            edges = np.clip(w0 + 3600.0 * np.arange(first, last + 2), begin, end)
            array[first : last + 1] += amount * np.diff(edges) / (end - begin)

    def account(run: _PodRun, begin: float, end: float) -> None:
        """Allocated and busy GPU-seconds of one run segment, clipped to the window."""
        nonlocal allocated_gpu_s, busy_gpu_s, work_done_gpu_s
        begin, end = max(begin, w0), min(end, w1)
        if end <= begin:
            return
        run.run_s += end - begin
        allocated_gpu_s += run.granted_gpus * (end - begin)
        if run.pod.ran:
            work_done_gpu_s += run.share_gpus * (end - begin)
        if run.item.priority_class is PriorityClass.LOW:
            busy = run.share_gpus * (end - begin)
        else:
            busy = run.share_gpus * float(duty[run.series].busy_fraction_seconds(run.phase_s, begin, end))
        busy_gpu_s += busy
        hour_add(hourly_alloc, begin, end, run.granted_gpus * (end - begin))
        hour_add(hourly_busy, begin, end, busy)

    def own(run: _PodRun, placement: Placement) -> None:
        if not timeshare:
            return
        flat = [placement.node_index * max_devices + d for d in placement.device_indices]
        low = run.item.priority_class is PriorityClass.LOW
        per_device = placement.share_milli / 1000.0
        run.slots = owners.add(run.index, constant if low else run.series, run.phase_s, per_device, flat)

    def disown(run: _PodRun) -> None:
        if run.slots:
            owners.remove(run.slots)
            run.slots = ()

    def stop_run(run: _PodRun, now: float) -> None:
        """Stop a run (also one between a move and its restart: it holds its target, runs nothing)."""
        if run.started_s is not None and not run.guest:
            account(run, run.started_s, now)
        disown(run)
        run.started_s = None
        run.token += 1

    def start_run(run: _PodRun, placement: Placement, now: float, opportunistic: bool = False) -> None:
        run.started_s = now
        if run.first_start_s is None:
            run.first_start_s = now
        run.guest = opportunistic
        if opportunistic:
            run.granted_gpus = 0.0
            run.guest_done_gpu_s = 0.0
            run.guest_node, run.guest_devices = placement.node_index, placement.device_indices
            guests[run.item.id] = run
            if not run.pod.ran:  # it holds its place until its user deleted it, doing no requested work
                push(max(now, run.pod.leave_s), FINISH, run.item.id, run.token)
            return
        run.granted_gpus = placement.share_milli * len(placement.device_indices) / 1000.0
        own(run, placement)
        # A pod that never ran in the trace stays until its user deleted it (at once if that is past).
        end = now + run.remaining_s if run.pod.ran else max(now, run.pod.leave_s)
        if end <= w1:
            push(end, FINISH, run.item.id, run.token)

    def lose(run: _PodRun, now: float, ran: float) -> None:
        """Book the work a stopped run redoes (``normal`` keeps its checkpoints, ``low`` restarts)."""
        nonlocal lost_gpu_s
        kept = 0.0
        if run.item.priority_class is PriorityClass.NORMAL:
            kept = math.floor(ran / CHECKPOINT_S) * CHECKPOINT_S
        if run.pod.ran:
            lost_gpu_s += run.share_gpus * max(0.0, min(ran - kept, now - w0))
            run.remaining_s -= kept

    def apply(now: float) -> None:
        nonlocal preemptions, lost_gpu_s, migrations, guest_starts, guest_yields
        for _ in range(50):
            result = hi.cycle(now)
            if result.next_wakeup_s is not None and result.next_wakeup_s > now and result.next_wakeup_s not in wakes:
                wakes.add(result.next_wakeup_s)  # one cycle at that time is enough
                push(result.next_wakeup_s, WAKE, "")
            for p in result.preemptions:
                run = runs[p.victim.id]
                if run.guest:
                    guest_yields += 1
                    guests.pop(run.item.id, None)
                    if run.pod.ran:  # a guest is ``low``: it restarts from scratch
                        lost_gpu_s += run.guest_done_gpu_s
                else:
                    lose(run, now, now - run.started_s if run.started_s is not None else 0.0)
                    run.preemptions += 1
                    preemptions += 1
                stop_run(run, now)
                hi.requeue(p.victim.id, now)
            for m in result.moves:
                run = runs[m.item.id]
                lose(run, now, now - run.started_s if run.started_s is not None else 0.0)
                run.moves += 1
                migrations += 1
                stop_run(run, now)
                run.granted_gpus = m.target.share_milli * len(m.target.device_indices) / 1000.0
                own(run, m.target)  # its target is held for it while it restarts
                push(now + MOVE_DOWNTIME_S, RESUME, m.item.id, run.token)
            for s in result.starts:
                run = runs[s.item.id]
                start_run(run, s.placement, now, s.opportunistic)
                guest_starts += s.opportunistic
                hi.started(s.item.id)
            if not result.preemptions and not result.moves:
                break

    def tick(now: float) -> None:
        """Guests' progress over the last tick, then what Hi sees of the devices for the next one."""
        nonlocal opportunistic_gpu_s, busy_gpu_s, work_done_gpu_s, idle_while_low_waits_s, idle_short_of_memory_s
        nonlocal completed, last_tick
        begin, span = last_tick, now - last_tick
        last_tick = now
        live = np.flatnonzero(owners.live)
        series = owners.series[live]
        steps = grid_steps[series]
        step_then = ((owners.phase[live] + begin) // TICK_S).astype(np.int64) % steps
        step_next = ((owners.phase[live] + now) // TICK_S).astype(np.int64) % steps
        flat = owners.device[live]
        size = state.node_count * max_devices
        busy = np.bincount(flat, weights=owners.share[live] * grid_busy[series, step_then], minlength=size)
        memory = (
            np.bincount(flat, weights=owners.share[live] * grid_memory[series, step_next], minlength=size)
            * device_memory_mib
        )
        threshold = spec.hi.timeshare_busy_pct / 100.0
        guest_count = hi.timesharing.guest_count.ravel()
        # Guests: the owners' idle time on their devices, nothing while they are busy.
        for key, run in list(guests.items()):
            devices = [run.guest_node * max_devices + d for d in run.guest_devices]
            owners_busy = float(busy[devices].max())
            share = run.share_gpus / len(devices)
            rate = 0.0 if owners_busy >= threshold else min(share, 1.0 - owners_busy) * len(devices)
            inside = (max(begin, w0), min(now, w1))
            done = rate * max(0.0, inside[1] - inside[0])
            run.guest_done_gpu_s += done
            opportunistic_gpu_s += done
            busy_gpu_s += done
            if run.pod.ran:
                work_done_gpu_s += done
            if done > 0:
                hour_add(hourly_busy, inside[0], inside[1], done)
            if run.pod.ran and run.guest_done_gpu_s >= run.share_gpus * run.remaining_s - 1e-6:
                del guests[key]
                stop_run(run, now)
                hi.release(key)
                run.done = True
                completed += 1
        # The owners' slowdown: guests beside them (the most on any of an owner's devices).
        if guest_count.any():
            beside = guest_count[flat]
            most: dict[int, int] = {}
            for owner, n in zip(owners.owner[live][beside > 0].tolist(), beside[beside > 0].tolist(), strict=True):
                most[owner] = max(n, most.get(owner, 0))
            for owner, n in most.items():
                run_list[owner].corun_s += n * max(0.0, min(now, w1) - max(begin, w0))
        # Idle time while low work waits, and how much of it the next guest in line could not use for lack of memory.
        waiting = hi.next_waiting_guest()
        if waiting is not None:
            owned = owned_capacity & (state.free_share_milli.ravel() < state.capacity_share_milli.ravel())
            idle = np.where(owned & (guest_count == 0) & (busy < threshold), 1.0 - np.minimum(busy, 1.0), 0.0)
            headroom = device_memory_mib * spec.hi.timeshare_memory_headroom_pct / 100.0
            need = waiting.device_memory_mib or waiting.share_milli / 1000.0 * device_memory_mib
            short = device_memory_mib - headroom - memory < need
            idle_while_low_waits_s += float(idle.sum()) * span
            idle_short_of_memory_s += float(idle[short].sum()) * span
        hi.observe_devices(
            np.minimum(busy, 1.0).reshape(state.node_count, max_devices),
            memory.astype(np.int64).reshape(state.node_count, max_devices),
        )
        if now + TICK_S <= w1:
            push(now + TICK_S, TICK, "")

    total_events = len(events)
    handled = 0
    step = max(1, total_events // 200)
    while events:
        now = events[0][0]
        if now > w1:
            break
        if head_fragmented:
            fragmentation_blocked_s += now - last_cycle
        while events and events[0][0] == now:
            _, kind, _, key, token = heapq.heappop(events)
            if kind == ARRIVE:
                handled += 1
                pod = pods_by_key[key]
                request = trace.requests[pod.trace_index]
                if not engine.ever_fits(request):
                    never_fit += 1
                    continue
                cls = QOS_CLASSES.get(request.qos, PriorityClass.NORMAL)
                item = WorkItem(key, request, cls, submit_time_s=pod.arrival_s, name=key)
                run = _PodRun(
                    pod,
                    item,
                    len(run_list),
                    request.total_share_milli / 1000.0,
                    pod.work_s,
                    int(rng.integers(len(duty))),
                    float(rng.uniform(0, DAY_S)),
                )
                runs[key] = run
                run_list.append(run)
                hi.submit(item, now)
                if not pod.ran:
                    push(pod.leave_s, GIVE_UP, key)
                if progress is not None and handled % step == 0:
                    progress((now - w0) / (w1 - w0))
            elif kind == FINISH:
                run = runs[key]
                if token != run.token or run.started_s is None:
                    continue
                guests.pop(key, None)
                stop_run(run, now)
                hi.release(key)
                run.done = True
                if run.pod.ran:
                    completed += 1
            elif kind == RESUME:
                run = runs[key]
                if token != run.token or run.done:
                    continue
                run.started_s = now  # on the target Hi reserved for it (its owners' entries are already there)
                end = now + run.remaining_s if run.pod.ran else max(now, run.pod.leave_s)
                if end <= w1:
                    push(end, FINISH, key, run.token)
            elif kind == GIVE_UP:
                run = runs[key]
                if hi.withdraw(key) is not None:  # still waiting (perhaps again, after a preemption): it leaves
                    run.done = True
                    if run.first_start_s is None:
                        abandoned += 1
            elif kind == TICK:
                tick(now)
        apply(now)
        last_cycle = now
        head_fragmented = hi.head_blocked_by_fragmentation()
    # The window closes: running work is accounted up to its end.
    for run in runs.values():
        if run.started_s is not None and not run.guest:
            account(run, run.started_s, w1)

    delays: dict[str, list[float]] = {c.label: [] for c in PriorityClass}
    multi_gpu_delays: list[float] = []
    hourly_delay = {c.label: np.zeros(len(hourly_alloc)) for c in PriorityClass}
    hourly_count = {c.label: np.zeros(len(hourly_alloc)) for c in PriorityClass}
    for run in runs.values():
        if not run.pod.ran:
            continue
        start = run.first_start_s if run.first_start_s is not None else w1
        label = run.item.priority_class.label
        delay = max(0.0, start - run.pod.arrival_s)
        delays[label].append(delay)
        if run.item.request.device_count > 1:
            multi_gpu_delays.append(delay)
        hour = min(len(hourly_alloc) - 1, int((run.pod.arrival_s - w0) // 3600))
        hourly_delay[label][hour] += delay
        hourly_count[label][hour] += 1

    def percentiles(values: list[float]) -> dict[str, float]:
        return {
            "p50": float(np.percentile(values, 50)) if values else 0.0,
            "p99": float(np.percentile(values, 99)) if values else 0.0,
        }

    queue_delay = {
        label: percentiles(values)
        for label, values in sorted(delays.items(), key=lambda kv: -PriorityClass[kv[0].upper()])
    }
    corun = np.array(
        [r.corun_s / r.run_s for r in runs.values() if r.item.priority_class is PriorityClass.HIGH and r.run_s > 0]
    )
    window = w1 - w0
    if progress is not None:
        progress(1.0)
    hours = np.arange(len(hourly_alloc), dtype=np.float64)
    result = ReplayResult(
        scheduler=scheduler,
        load=load,
        seed=seed,
        gpus=real_gpus,
        gpu_allocated_pct=100.0 * allocated_gpu_s / (window * real_gpus),
        gpu_busy_pct=100.0 * busy_gpu_s / (window * real_gpus),
        work_done_gpu_hours=(work_done_gpu_s - lost_gpu_s) / 3600.0,
        queue_delay_s=queue_delay,
        completed=completed,
        abandoned=abandoned,
        preemptions=preemptions,
        preempted_over_3=sum(1 for r in runs.values() if r.preemptions > 3),
        lost_gpu_hours=lost_gpu_s / 3600.0,
        wall_s=time.perf_counter() - began,
        pods=len(runs),
        never_fit=never_fit,
        offered_load=workload.offered_load,
        copies=workload.copies,
        migrations=migrations,
        migrated_pods_pct=100.0 * sum(1 for r in runs.values() if r.moves) / max(1, len(runs)),
        blocked_by_fragmentation_pct=100.0 * fragmentation_blocked_s / window,
        opportunistic_gpu_hours=opportunistic_gpu_s / 3600.0,
        idle_unusable_for_memory_pct=100.0 * idle_short_of_memory_s / idle_while_low_waits_s
        if idle_while_low_waits_s
        else 0.0,
        multi_gpu_queue_delay_s=percentiles(multi_gpu_delays),
        guest_starts=guest_starts,
        guest_yields=guest_yields,
        high_corun_fraction=corun,
        series={
            "hour": hours.tolist(),
            "allocated_gpus": (hourly_alloc / 3600.0).tolist(),
            "busy_gpus": (hourly_busy / 3600.0).tolist(),
            **{
                f"mean_delay_s_{label}": np.divide(
                    hourly_delay[label],
                    hourly_count[label],
                    out=np.full(len(hours), np.nan),
                    where=hourly_count[label] > 0,
                ).tolist()
                for label in hourly_delay
            },
        },
    )
    return result.with_interference(interference)
