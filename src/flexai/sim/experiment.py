"""The "fill the cluster" experiment of the FGD paper.

Per run and seed: shuffle the pods (after sorting by name), resample with replacement (or drop at random)
until the GPU request is ``inflate`` x the cluster's GPU capacity, give nodes a seeded random priority
(ties go to it), then submit the pods one at a time onto an empty cluster; nothing leaves, a pod that fits
nowhere fails and is skipped. One seeded RNG stream drives every random choice, in that order.

With ``migrations`` M > 0, a pod that fits nowhere although the devices it may use have enough free share in
total (blocked by fragmentation) gets a second chance: at most M moves of placed pods that open a hole for it
(``flexai.hi.defrag``); pods whose QoS maps to ``high`` are never moved. The moves are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flexai.hi.defrag import blocked_by_fragmentation, commit_plan, find_moves
from flexai.hi.work import QOS_CLASSES, PriorityClass
from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy
from flexai.scheduler.fragmentation import FragmentationModel
from flexai.sim.metrics import REPORT_ARRIVED_PCT, binned_unallocated_pct
from flexai.sim.openb import NodeList, PodTrace

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Arrivals:
    """The pod sequence of one run: indices into the trace, in submission order, and the node priority."""

    pod_index: np.ndarray
    node_priority: np.ndarray


def build_arrivals(trace: PodTrace, nodes: NodeList, seed: int, inflate: float, rng: np.random.Generator) -> Arrivals:
    capacity_milli = sum(n.device_count for n in nodes.nodes) * 1000
    if capacity_milli == 0:
        raise ValueError(f"nodes {nodes.name!r} have no devices: the experiment fills GPU capacity")
    if not (trace.total_share_milli > 0).any():
        raise ValueError(f"trace {trace.name!r} has no pod that asks for a GPU: nothing to fill the cluster with")
    by_name = np.array(sorted(range(len(trace.pod_names)), key=lambda i: trace.pod_names[i]), dtype=np.int64)
    total = trace.total_share_milli
    per_device = trace.per_device_share_milli
    rng.integers(1 << 62)  # the artifact draws (and discards) one number before shuffling
    order = list(by_name[rng.permutation(len(by_name))])
    target = inflate * capacity_milli
    requested = int(total[order].sum())
    if requested < target:
        while True:
            i = int(by_name[rng.integers(len(by_name))])
            # Quirk kept from the artifact: the per-device share is compared, not the pod's total.
            if requested + per_device[i] > target:
                break
            order.append(i)
            requested += int(total[i])
    else:
        while requested > target and order:
            i = order.pop(int(rng.integers(len(order))))
            requested -= int(total[i])
    node_order = sorted(range(len(nodes.nodes)), key=lambda i: nodes.nodes[i].name)
    perm = rng.permutation(len(node_order))
    priority = np.empty(len(node_order), dtype=np.int64)
    priority[np.array(node_order)] = perm
    return Arrivals(np.array(order, dtype=np.int64), priority)


@dataclass
class RunResult:
    policy: str
    seed: int
    capacity_milli: int
    arrived_milli: np.ndarray
    allocated_milli: np.ndarray
    placed_demand_milli: np.ndarray
    failed: np.ndarray
    wall_s: float
    fragmentation_pct_at_100: float
    unallocated_gpu_pct: dict[int, float] = field(default_factory=dict)
    max_migrations: int = 0
    """M: moves allowed per failed pod (0: none, the paper's experiment)."""
    migrations: int = 0
    """Moves made in the whole run."""
    unblocked_pods: int = 0
    """Pods that failed first and were placed after moves."""

    @property
    def failed_pods(self) -> int:
        return int(self.failed.sum())

    def index_at_arrived(self, pct: float) -> int:
        """Number of pod events up to the moment the arrived workload reaches ``pct`` % of capacity."""
        return int(np.searchsorted(self.arrived_milli, pct / 100 * self.capacity_milli, side="right"))

    def placed_pods_at(self, pct: float) -> int:
        upto = self.index_at_arrived(pct)
        return int(upto - self.failed[:upto].sum())

    def failed_pods_at(self, pct: float) -> int:
        return int(self.failed[: self.index_at_arrived(pct)].sum())

    def placed_demand_pct_at(self, pct: float) -> float:
        upto = self.index_at_arrived(pct)
        return 100.0 * float(self.placed_demand_milli[upto - 1]) / self.capacity_milli if upto else 0.0

    def curve(self, points: range = range(0, 131)) -> dict[int, float]:
        return binned_unallocated_pct(self.arrived_milli, self.allocated_milli, self.capacity_milli, points)

    def placed_demand_curve(self, points: range = range(0, 131)) -> dict[int, float]:
        unplaced = binned_unallocated_pct(self.arrived_milli, self.placed_demand_milli, self.capacity_milli, points)
        return {x: round(100.0 - v, 2) for x, v in unplaced.items()}


def run_fill(
    trace: PodTrace,
    nodes: NodeList,
    policy: str,
    seed: int,
    inflate: float = 1.3,
    progress: ProgressCallback | None = None,
    migrations: int = 0,
) -> RunResult:
    """One run of the experiment with one policy and one seed; at most ``migrations`` moves per failed pod."""
    if migrations < 0:
        raise ValueError(f"migrations={migrations} is not allowed: an integer >= 0")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    arrivals = build_arrivals(trace, nodes, seed, inflate, rng)
    state = ClusterState(nodes.nodes)
    profile = trace.profile()
    scheduler = Scheduler(state, create_policy(policy, PolicyContext(profile=profile, rng=rng)), arrivals.node_priority)
    capacity = state.total_share_milli
    frag_model = FragmentationModel(profile, state)
    total = trace.total_share_milli
    count = len(arrivals.pod_index)
    arrived = np.cumsum(total[arrivals.pod_index])
    allocated = np.zeros(count, dtype=np.int64)
    placed_demand = np.zeros(count, dtype=np.int64)
    failed = np.zeros(count, dtype=bool)
    demand = 0
    frag_at_100 = float("nan")
    crossed_100_at = int(np.searchsorted(arrived, capacity, side="right"))
    requests = trace.requests
    step = max(1, count // 100)
    movable: dict[str, tuple[Request, Placement]] = {}
    moves_made = 0
    unblocked = 0
    no_plan_at: dict[tuple[object, ...], int] = {}
    """Request shape -> ledger checkpoint at which no plan was found (nothing changed since: none now either)."""
    for event, pod in enumerate(arrivals.pod_index.tolist()):
        request = requests[pod]
        replica_id = str(event)
        result = scheduler.schedule(request, replica_id=replica_id)
        placement = result.placement
        if result.status is Status.UNSCHEDULABLE and migrations and blocked_by_fragmentation(scheduler, request):
            shape = (
                request.device_count,
                request.share_milli,
                request.device_memory_mib,
                request.allowed_models,
                request.cpu_milli,
                request.host_memory_mib,
            )
            checkpoint = state.checkpoint()
            plan = None if no_plan_at.get(shape) == checkpoint else find_moves(scheduler, request, movable, migrations)
            if plan is None:
                no_plan_at[shape] = checkpoint
            else:
                commit_plan(scheduler, plan, replica_id, request)
                for move in plan.moves:
                    movable[move.id] = (move.request, move.target)
                moves_made += len(plan.moves)
                unblocked += 1
                placement = plan.hole
        if placement is not None:
            demand += request.total_share_milli
            if migrations and QOS_CLASSES.get(request.qos, PriorityClass.NORMAL) is not PriorityClass.HIGH:
                movable[replica_id] = (request, placement)
        elif result.status is Status.ERROR:
            raise RuntimeError(result.reason)
        else:
            failed[event] = True
        allocated[event] = state.allocated_share_milli
        placed_demand[event] = demand
        if event + 1 == crossed_100_at:
            frag_at_100 = 100.0 * frag_model.cluster_frag_milli(state) / capacity
        if progress is not None and (event % step == 0 or event + 1 == count):
            progress(event + 1, count)
    result = RunResult(
        policy=policy,
        seed=seed,
        capacity_milli=capacity,
        arrived_milli=arrived,
        allocated_milli=allocated,
        placed_demand_milli=placed_demand,
        failed=failed,
        wall_s=time.perf_counter() - started,
        fragmentation_pct_at_100=frag_at_100,
        max_migrations=migrations,
        migrations=moves_made,
        unblocked_pods=unblocked,
    )
    result.unallocated_gpu_pct = binned_unallocated_pct(arrived, allocated, capacity, REPORT_ARRIVED_PCT)
    return result
