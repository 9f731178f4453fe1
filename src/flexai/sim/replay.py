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
from dataclasses import dataclass, field, fields

import numpy as np

from flexai.hi import QOS_CLASSES, HiConfig, HiScheduler, PriorityClass, WorkItem
from flexai.model.cluster import Node
from flexai.model.state import ClusterState
from flexai.scheduler import PolicyContext, Scheduler, create_policy
from flexai.sim.duty import DutySeries, load_duty_series
from flexai.sim.openb import NodeList, PodTrace

DAY_S = 86_400.0
CHECKPOINT_S = 1800.0


@dataclass(frozen=True)
class ReplayScheduler:
    name: str
    policy: str
    hi: HiConfig
    description: str


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
            HiConfig(normal_checkpoint_s=CHECKPOINT_S, preemption_delay_s=120.0),
            "flex placement under flexai.hi: fraction-aware preemption, backfill with reservation",
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
    done: bool = False


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
    series: dict[str, list[float]] = field(default_factory=dict)
    """Hourly points for the report: time (h), allocated and busy GPUs, and the queueing delays per class."""

    def json(self) -> dict[str, object]:
        """Every field but the hourly series (those go to the plots)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "series"}


Progress = Callable[[float], None]

ARRIVE, FINISH, GIVE_UP, WAKE = 0, 1, 2, 3


def run_replay(
    trace: PodTrace,
    nodes: NodeList,
    scheduler: str,
    load: float,
    seed: int,
    gpus: int = 128,
    progress: Progress | None = None,
    duty: tuple[DutySeries, ...] | None = None,
) -> ReplayResult:
    """One replay: one scheduler, one offered load, one seed."""
    began = time.perf_counter()
    spec = REPLAY_SCHEDULERS.get(scheduler)
    if spec is None:
        raise ReplayError(f"scheduler={scheduler!r} is not allowed: one of {', '.join(REPLAY_SCHEDULERS)}")
    if not load > 0:
        raise ReplayError(f"load={load} is not allowed: a fraction of the GPU capacity > 0")
    rng = np.random.default_rng(seed)
    sub = draw_subcluster(nodes, gpus, rng)
    workload = build_workload(trace, gpus, load, rng)
    duty = duty if duty is not None else load_duty_series()
    real_gpus = sum(n.device_count for n in sub)
    state = ClusterState(sub)
    policy = create_policy(spec.policy, PolicyContext(profile=trace.profile(), rng=np.random.default_rng(seed)))
    engine = Scheduler(state, policy, rng.permutation(len(sub)))
    hi = HiScheduler(engine, spec.hi)
    w0, w1 = workload.window_s

    runs: dict[str, _PodRun] = {}
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

    allocated_gpu_s = 0.0
    busy_gpu_s = 0.0
    lost_gpu_s = 0.0
    work_done_gpu_s = 0.0
    completed = abandoned = preemptions = never_fit = 0
    hourly_alloc = np.zeros(int(math.ceil((w1 - w0) / 3600)) + 1)
    hourly_busy = np.zeros_like(hourly_alloc)

    def account(run: _PodRun, begin: float, end: float) -> None:
        """Allocated and busy GPU-seconds of one run segment, clipped to the window."""
        nonlocal allocated_gpu_s, busy_gpu_s, work_done_gpu_s
        begin, end = max(begin, w0), min(end, w1)
        if end <= begin:
            return
        allocated_gpu_s += run.granted_gpus * (end - begin)
        if run.pod.ran:
            work_done_gpu_s += run.share_gpus * (end - begin)
        if run.item.priority_class is PriorityClass.LOW:
            busy = run.share_gpus * (end - begin)
        else:
            busy = run.share_gpus * float(duty[run.series].busy_fraction_seconds(run.phase_s, begin, end))
        busy_gpu_s += busy
        first, last = int((begin - w0) // 3600), int((end - w0) // 3600)
        if first == last:
            hourly_alloc[first] += run.granted_gpus * (end - begin)
            hourly_busy[first] += busy
        else:  # spread over the hours it spans (busy pro rata: enough for a plot)
            edges = np.clip(w0 + 3600.0 * np.arange(first, last + 2), begin, end)
            widths = np.diff(edges)
            hourly_alloc[first : last + 1] += run.granted_gpus * widths
            hourly_busy[first : last + 1] += busy * widths / (end - begin)

    def stop_run(run: _PodRun, now: float) -> None:
        assert run.started_s is not None
        account(run, run.started_s, now)
        run.started_s = None
        run.token += 1

    def apply(now: float) -> None:
        nonlocal preemptions, lost_gpu_s
        for _ in range(50):
            result = hi.cycle(now)
            if result.next_wakeup_s is not None and result.next_wakeup_s > now and result.next_wakeup_s not in wakes:
                wakes.add(result.next_wakeup_s)  # one cycle at that time is enough
                push(result.next_wakeup_s, WAKE, "")
            for p in result.preemptions:
                run = runs[p.victim.id]
                assert run.started_s is not None
                ran = now - run.started_s
                kept = 0.0
                if run.item.priority_class is PriorityClass.NORMAL:
                    kept = math.floor(ran / CHECKPOINT_S) * CHECKPOINT_S
                if run.pod.ran:
                    lost_in_window = max(0.0, min(ran - kept, now - w0))
                    lost_gpu_s += run.share_gpus * lost_in_window
                    run.remaining_s -= kept
                run.preemptions += 1
                preemptions += 1
                stop_run(run, now)
                hi.requeue(p.victim.id, now)
            for s in result.starts:
                run = runs[s.item.id]
                run.started_s = now
                run.granted_gpus = s.placement.share_milli * len(s.placement.device_indices) / 1000.0
                if run.first_start_s is None:
                    run.first_start_s = now
                hi.started(s.item.id)
                # A pod that never ran in the trace stays until its user deleted it (at once if that is past).
                end = now + run.remaining_s if run.pod.ran else max(now, run.pod.leave_s)
                if end <= w1:
                    push(end, FINISH, s.item.id, run.token)
            if not result.preemptions:
                break

    total_events = len(events)
    handled = 0
    step = max(1, total_events // 200)
    while events:
        now = events[0][0]
        if now > w1:
            break
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
                    request.total_share_milli / 1000.0,
                    pod.work_s,
                    int(rng.integers(len(duty))),
                    float(rng.uniform(0, DAY_S)),
                )
                runs[key] = run
                hi.submit(item, now)
                if not pod.ran:
                    push(pod.leave_s, GIVE_UP, key)
                if progress is not None and handled % step == 0:
                    progress((now - w0) / (w1 - w0))
            elif kind == FINISH:
                run = runs[key]
                if token != run.token or run.started_s is None:
                    continue
                stop_run(run, now)
                hi.release(key)
                run.done = True
                if run.pod.ran:
                    completed += 1
            elif kind == GIVE_UP:
                run = runs[key]
                if hi.withdraw(key) is not None:  # still waiting (perhaps again, after a preemption): it leaves
                    run.done = True
                    if run.first_start_s is None:
                        abandoned += 1
        apply(now)
    # The window closes: running work is accounted up to its end.
    for run in runs.values():
        if run.started_s is not None:
            account(run, run.started_s, w1)

    delays: dict[str, list[float]] = {c.label: [] for c in PriorityClass}
    hourly_delay = {c.label: np.zeros(len(hourly_alloc)) for c in PriorityClass}
    hourly_count = {c.label: np.zeros(len(hourly_alloc)) for c in PriorityClass}
    for run in runs.values():
        if not run.pod.ran:
            continue
        start = run.first_start_s if run.first_start_s is not None else w1
        label = run.item.priority_class.label
        delay = max(0.0, start - run.pod.arrival_s)
        delays[label].append(delay)
        hour = min(len(hourly_alloc) - 1, int((run.pod.arrival_s - w0) // 3600))
        hourly_delay[label][hour] += delay
        hourly_count[label][hour] += 1
    queue_delay = {
        label: {
            "p50": float(np.percentile(values, 50)) if values else 0.0,
            "p99": float(np.percentile(values, 99)) if values else 0.0,
        }
        for label, values in sorted(delays.items(), key=lambda kv: -PriorityClass[kv[0].upper()])
    }
    window = w1 - w0
    if progress is not None:
        progress(1.0)
    hours = np.arange(len(hourly_alloc), dtype=np.float64)
    return ReplayResult(
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
