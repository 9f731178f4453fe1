"""The scheduling framework: filter -> score -> select devices -> reserve, with a closed result set.

Filters and policies are small named plugins (see ``registry``). The framework runs every filter over all
nodes at once (numpy masks over the state arrays), asks the policy for integer scores of the feasible
nodes, breaks ties with a fixed node priority, lets the policy choose the devices inside the node, and
reserves the slices in the ledger. Binding is the adapter's job.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState, LedgerError
from flexai.model.units import FULL_SHARE_MILLI
from flexai.model.workload import WorkloadProfile


class Status(enum.Enum):
    """Closed set of outcomes: SCHEDULED (placement reserved), UNSCHEDULABLE (no node fits now; the reason
    says which constraint stopped every node), ERROR (a bug or a broken invariant; nothing was reserved)."""

    SCHEDULED = "scheduled"
    UNSCHEDULABLE = "unschedulable"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    status: Status
    placement: Placement | None = None
    reason: str = ""


@dataclass
class PolicyContext:
    """What a policy may know besides the current state: the workload's shape distribution and a seeded RNG."""

    profile: WorkloadProfile | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    options: dict[str, float] = field(default_factory=dict)


class FilterPlugin(Protocol):
    name: ClassVar[str]

    def feasible(self, state: ClusterState, request: Request) -> np.ndarray:
        """Boolean mask over nodes: which nodes this filter lets through."""
        ...


class Policy:
    """Base of scoring policies: ``score`` ranks feasible nodes, ``select_devices`` picks devices inside one."""

    name: ClassVar[str] = ""
    whole_devices_only: ClassVar[bool] = False
    """True for a no-sharing baseline: every device request is rounded up to whole devices."""

    def __init__(self, context: PolicyContext | None = None) -> None:
        self.context = context or PolicyContext()

    def bind_state(self, state: ClusterState) -> None:
        """Called once with the state the policy will score (precompute per-cluster tables here)."""

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        """Integer score per node (higher is better); only entries where ``feasible`` is True are read."""
        raise NotImplementedError

    def select_devices(self, state: ClusterState, request: Request, node_index: int) -> tuple[int, ...]:
        return select_devices_best(state, request, node_index)

    def placed(self, request: Request, placement: Placement) -> None:
        """Told after a placement was reserved (for policies that track more than the state arrays)."""

    def released(self, request: Request, placement: Placement) -> None:
        """Told after a placement was returned to the pool."""


def device_fit_mask(state: ClusterState, request: Request) -> np.ndarray:
    """(nodes, devices) mask of devices with enough free share and (where known) memory for one replica."""
    fits = state.free_share_milli >= request.share_milli
    if request.device_memory_mib:
        fits &= (state.free_device_memory_mib >= request.device_memory_mib) | ~state.device_memory_known[:, None]
    return fits & state.device_present


def select_devices_best(state: ClusterState, request: Request, node_index: int) -> tuple[int, ...]:
    """Tightest fit: a slice goes to the fitting device with the least free share (a fully free device only
    when no used one fits; ties to the lowest index); whole devices are the lowest-index free ones; slices on
    several devices (``multi_slice``) go to the fitting devices with the least free share, in that order."""
    if request.device_count == 0:
        return ()
    row_fit = device_fit_mask(state, request)[node_index]
    if request.share_milli == FULL_SHARE_MILLI:
        return tuple(int(d) for d in np.flatnonzero(row_fit)[: request.device_count])
    free = np.where(row_fit, state.free_share_milli[node_index], FULL_SHARE_MILLI + 1)
    if request.device_count > 1:
        columns = np.flatnonzero(row_fit)
        order = np.lexsort((columns, free[columns]))
        return tuple(int(d) for d in columns[order][: request.device_count])
    return (int(np.argmin(free)),)


class ResourcesFit:
    name: ClassVar[str] = "resources-fit"

    def feasible(self, state: ClusterState, request: Request) -> np.ndarray:
        return (state.free_cpu_milli >= request.cpu_milli) & (state.free_host_memory_mib >= request.host_memory_mib)


class DeviceModelMatch:
    name: ClassVar[str] = "device-model"

    def feasible(self, state: ClusterState, request: Request) -> np.ndarray:
        if request.device_count == 0:
            return np.ones(state.node_count, dtype=bool)
        return state.model_mask(request.allowed_models)


class DeviceFit:
    name: ClassVar[str] = "device-fit"

    def feasible(self, state: ClusterState, request: Request) -> np.ndarray:
        if request.device_count == 0:
            return np.ones(state.node_count, dtype=bool)
        return device_fit_mask(state, request).sum(axis=1) >= request.device_count


DEFAULT_FILTERS: tuple[FilterPlugin, ...] = (ResourcesFit(), DeviceModelMatch(), DeviceFit())

_REASONS = {
    "resources-fit": "not enough free CPU or host memory",
    "device-model": "no allowed device model",
    "device-fit": "not enough free device share or memory",
}


class Scheduler:
    """Places one request at a time on a ClusterState with one policy."""

    def __init__(
        self,
        state: ClusterState,
        policy: Policy,
        node_priority: np.ndarray | None = None,
        filters: tuple[FilterPlugin, ...] = DEFAULT_FILTERS,
    ) -> None:
        self.state = state
        self.policy = policy
        self.filters = filters
        n = state.node_count
        priority = np.arange(n) if node_priority is None else np.asarray(node_priority, dtype=np.int64)
        if sorted(priority.tolist()) != list(range(n)):
            raise ValueError("node_priority must be a permutation of 0..nodes-1")
        # Ties go to the smallest priority: fold it into the low digits of the ranking key.
        self._tie_rank = (n - 1 - priority).astype(np.int64)
        self._key_scale = np.int64(n)
        self._empty_state: ClusterState | None = None
        self._ever_fits: dict[tuple[object, ...], bool] = {}
        policy.bind_state(state)

    def filter_masks(self, request: Request, state: ClusterState | None = None) -> dict[str, np.ndarray]:
        """Each filter's verdict per node (for reasons a user can act on)."""
        state = state or self.state
        return {f.name: f.feasible(state, request) for f in self.filters}

    def feasible(self, request: Request, state: ClusterState | None = None) -> np.ndarray:
        state = state or self.state
        mask = self.filters[0].feasible(state, request)
        for f in self.filters[1:]:
            mask = mask & f.feasible(state, request)
        return mask

    def feasible_when_empty(self, request: Request) -> np.ndarray:
        """Per node: would the request fit there if the node were empty?"""
        if self._empty_state is None:
            self._empty_state = ClusterState(self.state.nodes)
        return self.feasible(request, self._empty_state)

    def ever_fits(self, request: Request) -> bool:
        """Would the request fit somewhere if the cluster were empty? (False: waiting will never help.)"""
        key = (request.device_count, request.share_milli, request.device_memory_mib, request.allowed_models,
               request.cpu_milli, request.host_memory_mib)
        known = self._ever_fits.get(key)
        if known is None:
            known = self._ever_fits[key] = bool(self.feasible_when_empty(request).any())
            if len(self._ever_fits) > 4096:
                self._ever_fits.clear()
        return known

    def explain(self, request: Request) -> str:
        """A reason a user can act on: how many nodes each filter rejected."""
        parts = []
        real = self.state.real_rows()  # vacant rows kept as headroom are no nodes to the user
        for f in self.filters:
            rejected = int((~f.feasible(self.state, request) & real).sum())
            if rejected:
                parts.append(f"{rejected} {_REASONS.get(f.name, f.name)}")
        return f"0/{int(real.sum())} nodes fit: " + ", ".join(parts)

    def choose_node(self, request: Request, feasible: np.ndarray) -> int:
        candidates = np.flatnonzero(feasible)
        if len(candidates) == 1:
            return int(candidates[0])
        scores = np.asarray(self.policy.score(self.state, request, feasible), dtype=np.int64)
        key = scores[candidates] * self._key_scale + self._tie_rank[candidates]
        return int(candidates[int(np.argmax(key))])

    def effective(self, request: Request) -> Request:
        """The request as this policy grants it (a no-sharing baseline rounds up to whole devices)."""
        return request.whole_devices() if self.policy.whole_devices_only else request

    def schedule(self, request: Request, replica_id: str, node_mask: np.ndarray | None = None) -> ScheduleResult:
        """Place one replica; ``node_mask`` (optional, per node) limits the nodes it may use."""
        effective = self.effective(request)
        feasible = self.feasible(effective)
        if node_mask is not None:
            feasible = feasible & node_mask
        if not feasible.any():
            if node_mask is not None and self.feasible(effective).any():
                return ScheduleResult(Status.UNSCHEDULABLE, reason="fits only on nodes held for other work")
            return ScheduleResult(Status.UNSCHEDULABLE, reason=self.explain(effective))
        node = self.choose_node(effective, feasible)
        devices = self.policy.select_devices(self.state, effective, node)
        placement = Placement.for_request(effective, node, devices)
        try:
            self.state.reserve(replica_id, placement)
        except LedgerError as exc:
            return ScheduleResult(Status.ERROR, reason=f"policy {self.policy.name} chose an invalid placement: {exc}")
        self.policy.placed(effective, placement)
        return ScheduleResult(Status.SCHEDULED, placement=placement)

    def release(self, replica_id: str, request: Request) -> Placement | None:
        """Return a replica's slices to the pool (idempotent)."""
        placement = self.state.unreserve(replica_id)
        if placement is not None:
            effective = request.whole_devices() if self.policy.whole_devices_only else request
            self.policy.released(effective, placement)
        return placement
