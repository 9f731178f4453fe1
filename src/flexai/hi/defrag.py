"""Defragmentation by bounded migration: which running replicas to move so that a blocked request fits.

A request is *blocked by fragmentation* when the devices it may use hold enough free share in total but no
node can host it. ``find_moves`` then looks for at most ``max_moves`` moves of movable replicas that open a
hole for it on one node: the replicas on that node whose slices (or CPU, host memory) stand in the way go
to free room elsewhere. Fewest moves first, then least lost work. ``commit_plan`` carries a plan out in
the ledger, make-before-break: every target is reserved before any replica leaves its source, so the
targets must fit in what is free *now* (a move never lands in room another move of the same plan frees).

Movable replicas never include ``high`` ones: the caller decides what may move and filters them out (the
replay, the static experiment and the Hi Scheduler pass only ``normal`` and ``low`` work).

Search (``find_moves``), pure and fast enough to run on every blocked pod of a 1,000-node cluster:

1. Hole nodes: nodes where the request fits when empty, whose free share plus the share of their movable
   replicas could host it (one numpy pass). They are tried in order of a lower bound on the moves needed
   (one for a slice if the largest movable slice on some device covers what is missing there, else two;
   the replicas on the cheapest devices to empty for whole devices), then of the share still missing; the
   search stops at the first node whose bound exceeds the best plan found.
2. On one node, victim sets are enumerated by size, as ``FractionAware`` preemption does (the grants on
   one device for a slice, the cheapest devices to empty for whole devices), capped per node.
3. A victim set counts only if all of its replicas fit elsewhere at once: best fit (the fitting device
   with the least free share, so fully free devices are taken last) on a copy of the free arrays where the
   hole's devices are closed and the hole node keeps the CPU and host memory the request needs.

``find_consolidation`` runs the same relocation periodically: it empties the least-used partly-used nodes
whose replicas are all movable and fit on other partly-used nodes, so whole devices open for multi-GPU work.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from flexai.hi.preemption import FractionAware, _NodeFit
from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState, LedgerError
from flexai.model.units import FULL_SHARE_MILLI
from flexai.scheduler.framework import Scheduler

MAX_HOLE_NODES = 24
"""Hole nodes examined per ``find_moves`` call (in order of promise)."""
MAX_COMBINATIONS_PER_SIZE = 64
"""Victim sets of one size tried per device pool."""
MAX_RELOCATIONS_PER_NODE = 24
"""Victim sets whose relocation is checked per hole node (the costly step)."""
MAX_DEVICE_SETS = 24
"""Sets of devices tried per node for a whole-device request."""
_TARGET_PREFIX = "flexai.defrag.target:"


@dataclass(frozen=True, slots=True)
class Move:
    """Move the running replica ``id`` from ``source`` to ``target`` (same share, memory, CPU, host memory)."""

    id: str
    request: Request
    source: Placement
    target: Placement


@dataclass(frozen=True, slots=True)
class MovePlan:
    """Moves that open ``hole``, where the blocked request fits once they are done."""

    moves: tuple[Move, ...]
    hole: Placement


@dataclass(slots=True)
class _Held:
    """A movable replica as the search sees it (``placement`` lets ``_NodeFit`` read it)."""

    id: str
    request: Request
    placement: Placement
    lost_work_s: float

    @property
    def footprint(self) -> int:
        return self.placement.share_milli * len(self.placement.device_indices)


# ---------------------------------------------------------------------------------------------- queries
def blocked_by_fragmentation(engine: Scheduler, request: Request) -> bool:
    """Enough free share in total on devices the request may use (allowed models), but no node where it fits
    now. A CPU-only request: enough free CPU and host memory in total, but not on one node. A request that
    would not fit even on an empty node is not blocked by fragmentation (nothing could ever seat it)."""
    effective = engine.effective(request)
    state = engine.state
    if engine.feasible(effective).any() or not engine.ever_fits(effective):
        return False
    if effective.device_count == 0:
        return bool(
            int(state.free_cpu_milli.sum()) >= effective.cpu_milli
            and int(state.free_host_memory_mib.sum()) >= effective.host_memory_mib
        )
    allowed = state.model_mask(effective.allowed_models)
    free = int(state.free_share_milli[allowed].sum())
    return free >= effective.total_share_milli


# ---------------------------------------------------------------------------------------------- free room
class _Room:
    """A private copy of the free arrays on which relocations are tried (the ledger is never touched)."""

    __slots__ = ("state", "share", "memory", "cpu", "host", "_model_masks")

    def __init__(self, state: ClusterState, node_mask: np.ndarray | None) -> None:
        self.state = state
        self.share = np.where(state.device_present, state.free_share_milli, -1)
        self.memory = np.where(state.device_memory_known[:, None], state.free_device_memory_mib, np.iinfo(np.int64).max)
        self.cpu = state.free_cpu_milli.copy()
        self.host = state.free_host_memory_mib.copy()
        if node_mask is not None:
            closed = ~np.asarray(node_mask, dtype=bool)
            self.share[closed] = -1
            self.cpu[closed] = -1
            self.host[closed] = -1
        self._model_masks: dict[frozenset[str], np.ndarray] = {}

    def copy(self) -> _Room:
        other = _Room.__new__(_Room)
        other.state = self.state
        other.share = self.share.copy()
        other.memory = self.memory.copy()
        other.cpu = self.cpu.copy()
        other.host = self.host.copy()
        other._model_masks = self._model_masks
        return other

    def model_mask(self, models: frozenset[str], device_count: int) -> np.ndarray:
        if device_count == 0:
            return np.ones(self.state.node_count, dtype=bool)
        mask = self._model_masks.get(models)
        if mask is None:
            mask = self._model_masks[models] = self.state.model_mask(models)
        return mask

    def reach(self, p: Placement, models: frozenset[str]) -> tuple[list[int], list[int]] | None:
        """Where a replica with ``p``'s slices could go now: over the nodes with device room for them, sorted
        by free CPU (most first), minus that CPU and the running maximum of free host memory; None when no
        node has device room. ``can_reach`` answers for one replica's CPU and host memory from it."""
        count = len(p.device_indices)
        nodes_ok = self.model_mask(models, count)
        if count:
            fits = self.share >= p.share_milli
            if p.device_memory_mib:
                fits &= self.memory >= p.device_memory_mib
            nodes_ok = nodes_ok & ((fits.any(axis=1)) if count == 1 else (fits.sum(axis=1) >= count))
        nodes = np.flatnonzero(nodes_ok)
        if not len(nodes):
            return None
        cpu = self.cpu[nodes]
        order = np.argsort(-cpu, kind="stable")
        return (-cpu[order]).tolist(), np.maximum.accumulate(self.host[nodes][order]).tolist()

    @staticmethod
    def can_reach(reach: tuple[list[int], list[int]] | None, cpu_milli: int, host_memory_mib: int) -> bool:
        """Is there a node with device room, ``cpu_milli`` and ``host_memory_mib`` free (from ``reach``)?"""
        if reach is None:
            return False
        upto = bisect_right(reach[0], -cpu_milli)
        return upto > 0 and reach[1][upto - 1] >= host_memory_mib

    def place(self, held: _Held) -> Placement | None:
        """Best-fit target for ``held`` (never on its own devices); taken from the room if found."""
        p = held.placement
        count = len(p.device_indices)
        nodes_ok = (self.cpu >= p.cpu_milli) & (self.host >= p.host_memory_mib)
        nodes_ok &= self.model_mask(held.request.allowed_models, count)
        if count == 0:
            candidates = np.flatnonzero(nodes_ok & (np.arange(self.state.node_count) != p.node_index))
            if not len(candidates):
                return None
            node = int(candidates[int(np.argmin(self.cpu[candidates]))])
            target = Placement(node, (), 0, 0, p.cpu_milli, p.host_memory_mib)
        else:
            fits = (self.share >= p.share_milli) & (self.memory >= p.device_memory_mib) & nodes_ok[:, None]
            fits[p.node_index, list(p.device_indices)] = False
            if count == 1:
                flat = np.flatnonzero(fits)
                if not len(flat):
                    return None
                best = int(flat[int(np.argmin(self.share.ravel()[flat]))])
                node, device = divmod(best, self.share.shape[1])
                target = Placement(node, (device,), p.share_milli, p.device_memory_mib, p.cpu_milli, p.host_memory_mib)
            else:
                per_node = fits.sum(axis=1)
                candidates = np.flatnonzero(per_node >= count)
                if not len(candidates):
                    return None
                node = int(candidates[int(np.argmin(per_node[candidates]))])
                devices = tuple(int(d) for d in np.flatnonzero(fits[node])[:count])
                target = Placement(node, devices, p.share_milli, p.device_memory_mib, p.cpu_milli, p.host_memory_mib)
        self.take(target)
        return target

    def take(self, p: Placement) -> None:
        n = p.node_index
        self.cpu[n] -= p.cpu_milli
        self.host[n] -= p.host_memory_mib
        if p.device_indices:
            devices = list(p.device_indices)
            self.share[n, devices] -= p.share_milli
            self.memory[n, devices] -= p.device_memory_mib


def _relocate(room: _Room, victims: Sequence[_Held]) -> list[Placement] | None:
    """Targets for all ``victims`` at once (largest first), or None; ``room`` is used up either way."""
    order = sorted(range(len(victims)), key=lambda i: (-victims[i].footprint, -victims[i].placement.cpu_milli))
    targets: list[Placement | None] = [None] * len(victims)
    for i in order:
        target = room.place(victims[i])
        if target is None:
            return None
        targets[i] = target
    return [t for t in targets if t is not None]


# ---------------------------------------------------------------------------------------------- find_moves
class _Gathered:
    """The movable replicas on the wanted nodes that could go somewhere, grouped by node, plus flat arrays
    (one entry per (replica, device)) for the vectorised ranking."""

    __slots__ = ("by_node", "node", "device", "share", "weight", "cpu_node", "cpu", "host")

    def __init__(self) -> None:
        self.by_node: dict[int, list[_Held]] = {}
        self.node: list[int] = []
        self.device: list[int] = []
        self.share: list[int] = []
        self.weight: list[float] = []
        self.cpu_node: list[int] = []
        self.cpu: list[int] = []
        self.host: list[int] = []


def _gather(
    state: ClusterState,
    room: _Room,
    movable: Mapping[str, tuple[Request, Placement]],
    lost_work_s: Mapping[str, float] | None,
    wanted: np.ndarray,
) -> _Gathered:
    out = _Gathered()
    lost = lost_work_s or {}
    grants = state.grants
    # Per device shape: the nodes with room for it now, by free CPU and host memory (None: no room at all).
    # A replica that no node can take now cannot move, whatever else moves (targets take what is free now).
    reach: dict[tuple[object, ...], tuple[list[int], list[int]] | None] = {}
    can_reach = _Room.can_reach
    wanted_list = wanted.tolist()
    by_node = out.by_node
    nodes, devices_out, shares, weights, cpu_nodes, cpus, hosts = (
        out.node,
        out.device,
        out.share,
        out.weight,
        out.cpu_node,
        out.cpu,
        out.host,
    )
    largest_slice = int(room.share.max())
    for replica_id, (request, placement) in movable.items():
        node = placement.node_index
        if not wanted_list[node] or placement.share_milli > largest_slice:
            continue
        devices = placement.device_indices
        key = (placement.share_milli, placement.device_memory_mib, len(devices), request.allowed_models)
        where = reach.get(key, False)
        if where is False:
            where = reach[key] = room.reach(placement, request.allowed_models)
        if not can_reach(where, placement.cpu_milli, placement.host_memory_mib):  # type: ignore[arg-type]
            continue
        held = grants.get(replica_id)
        if held is not placement and held != placement:
            continue  # not (or no longer) granted there: nothing to move
        members = by_node.get(node)
        if members is None:
            members = by_node[node] = []
        members.append(_Held(replica_id, request, placement, float(lost.get(replica_id, 0.0)) if lost else 0.0))
        cpu_nodes.append(node)
        cpus.append(placement.cpu_milli)
        hosts.append(placement.host_memory_mib)
        weight = 1.0 / len(devices) if devices else 0.0
        for d in devices:
            nodes.append(node)
            devices_out.append(d)
            shares.append(placement.share_milli)
            weights.append(weight)
    return out


def _rank_hole_nodes(state: ClusterState, request: Request, gathered: _Gathered) -> list[tuple[int, int, int]]:
    """(estimated moves, missing share, node) of the nodes where moving replicas could open a hole."""
    if not gathered.by_node:
        return []
    shape = state.free_share_milli.shape
    node = np.asarray(gathered.node, dtype=np.int64)
    device = np.asarray(gathered.device, dtype=np.int64)
    share = np.asarray(gathered.share, dtype=np.int64)
    movable_share = np.zeros(shape, dtype=np.int64)
    largest = np.zeros(shape, dtype=np.int64)
    holders = np.zeros(shape, dtype=np.float64)
    np.add.at(movable_share, (node, device), share)
    np.maximum.at(largest, (node, device), share)
    # A replica on several devices counts 1/len on each: the k cheapest devices' sum bounds the moves from below.
    np.add.at(holders, (node, device), np.asarray(gathered.weight, dtype=np.float64))
    cpu = np.bincount(gathered.cpu_node, weights=gathered.cpu, minlength=state.node_count)
    host = np.bincount(gathered.cpu_node, weights=gathered.host, minlength=state.node_count)
    nodes = np.fromiter(gathered.by_node, dtype=np.int64, count=len(gathered.by_node))
    host_ok = (state.free_cpu_milli[nodes] + cpu[nodes] >= request.cpu_milli) & (
        state.free_host_memory_mib[nodes] + host[nodes] >= request.host_memory_mib
    )
    if request.device_count == 0:
        missing_cpu = np.maximum(request.cpu_milli - state.free_cpu_milli[nodes], 0)
        return sorted((1, int(missing_cpu[i]), int(nodes[i])) for i in np.flatnonzero(host_ok))
    free = np.where(state.device_present[nodes], state.free_share_milli[nodes], 0)
    present = state.device_present[nodes]
    movable_share, largest, holders = movable_share[nodes], largest[nodes], holders[nodes]
    if request.share_milli < FULL_SHARE_MILLI:
        possible = present & (free + movable_share >= request.share_milli)
        missing = np.where(possible, np.maximum(request.share_milli - free, 0), FULL_SHARE_MILLI + 1)
        best_device = np.argmin(missing, axis=1)
        rows = np.arange(len(nodes))
        least_missing = missing[rows, best_device]
        # One move suffices only on a device where the largest movable slice covers what is missing.
        one_will_do = possible & (largest >= np.maximum(request.share_milli - free, 0))
        estimate = np.where(one_will_do.any(axis=1), 1, 2)
    else:
        possible = present & (free + movable_share >= FULL_SHARE_MILLI)
        cheapest = np.sort(np.where(possible, holders, 1e6), axis=1)[:, : request.device_count].sum(axis=1)
        estimate = np.ceil(cheapest - 1e-9).astype(np.int64)
        least_missing = np.sort(np.where(possible, FULL_SHARE_MILLI - free, 10**6), axis=1)[
            :, : request.device_count
        ].sum(axis=1)
    viable = host_ok & (possible.sum(axis=1) >= request.device_count)
    return sorted((max(1, int(estimate[i])), int(least_missing[i]), int(nodes[i])) for i in np.flatnonzero(viable))


def _victim_sets(fit: _NodeFit, request: Request, members: list[_Held], limit: int) -> list[list[_Held]]:
    """Victim sets on one node that open the hole (``fit``), fewest first, at most ``limit`` replicas each."""
    found: list[list[_Held]] = []
    if request.device_count and request.share_milli == FULL_SHARE_MILLI:
        on_device: dict[int, list[_Held]] = {}
        for h in members:
            for d in h.placement.device_indices:
                on_device.setdefault(d, []).append(h)
        freeable = [
            d
            for d in range(len(fit.free_share))
            if fit.free_share[d] + sum(h.placement.share_milli for h in on_device.get(d, [])) >= FULL_SHARE_MILLI
        ]
        freeable.sort(key=lambda d: (len(on_device.get(d, [])), sum(h.lost_work_s for h in on_device.get(d, []))))
        seen: set[frozenset[str]] = set()
        for tried, devices in enumerate(combinations(freeable, request.device_count)):
            if tried >= MAX_DEVICE_SETS:
                break
            chosen: dict[str, _Held] = {}
            for d in devices:
                for h in on_device.get(d, []):
                    chosen[h.id] = h
            base = list(chosen.values())
            if len(base) > limit:
                continue
            for victims in _with_host_room(fit, base, [h for h in members if h.id not in chosen], limit):
                key = frozenset(h.id for h in victims)
                if key not in seen:
                    seen.add(key)
                    found.append(victims)
        found.sort(key=lambda v: (len(v), sum(h.lost_work_s for h in v)))
        return found
    pools = FractionAware._pools(fit, request, members)  # type: ignore[arg-type]
    for pool in pools:
        pool = sorted(pool, key=lambda h: (-h.footprint, h.lost_work_s))
        shares = [h.footprint for h in pool]
        for size in range(1, min(len(pool), limit) + 1):
            if request.device_count and sum(shares[:size]) + max(fit.free_share) < request.share_milli:
                continue  # even the largest ones together free too little on one device
            hits = 0
            for tried, combo in enumerate(combinations(pool, size)):
                if tried >= MAX_COMBINATIONS_PER_SIZE:
                    break
                if fit.fits_without(combo):
                    found.append(list(combo))
                    hits += 1
                    if hits >= MAX_COMBINATIONS_PER_SIZE // 4:
                        break
    found.sort(key=lambda v: (len(v), sum(h.lost_work_s for h in v)))
    return found


def _with_host_room(fit: _NodeFit, base: list[_Held], others: list[_Held], limit: int) -> list[list[_Held]]:
    """``base`` frees the devices; if the node still lacks CPU or host memory for the request, the smallest
    sets of ``others`` that free enough besides (several, so that one whose members all fit elsewhere can
    be found)."""
    if fit.fits_without(base):
        return [base]
    found: list[list[_Held]] = []
    others = sorted(others, key=lambda h: (h.lost_work_s, -h.placement.cpu_milli, -h.placement.host_memory_mib))
    for size in range(1, min(len(others), limit - len(base), 3) + 1):
        for tried, extra in enumerate(combinations(others, size)):
            if tried >= MAX_COMBINATIONS_PER_SIZE:
                break
            if fit.fits_without(base + list(extra)):
                found.append(base + list(extra))
        if found:
            break
    return found


def _hole_devices(fit: _NodeFit, request: Request, victims: Sequence[_Held]) -> tuple[int, ...]:
    """The devices the request takes once ``victims`` left: tightest fit for a slice, lowest index else."""
    if not request.device_count:
        return ()
    share, memory = fit.freed(victims)  # type: ignore[arg-type]  (a _Held reads like a Running here)
    fitting = [
        d
        for d in range(len(share))
        if share[d] >= request.share_milli and (not fit.memory_known or memory[d] >= request.device_memory_mib)
    ]
    if request.share_milli < FULL_SHARE_MILLI:
        return (min(fitting, key=lambda d: (share[d], d)),)
    return tuple(fitting[: request.device_count])


def find_moves(
    engine: Scheduler,
    request: Request,
    movable: Mapping[str, tuple[Request, Placement]],
    max_moves: int,
    lost_work_s: Mapping[str, float] | None = None,
    node_mask: np.ndarray | None = None,
) -> MovePlan | None:
    """At most ``max_moves`` moves of ``movable`` replicas (currently granted in ``engine.state`` under their
    id) that open a hole for ``request``; fewest moves, then least lost work. Leaves ``engine.state`` exactly
    as it found it (the search works on copies of the free arrays).

    ``movable`` maps replica id -> (its request, its placement); it must not hold ``high`` work (the caller
    filters). ``lost_work_s`` (default 0 for everyone) breaks ties between plans with as many moves.
    ``node_mask`` (per node) limits the nodes the hole and the moved replicas may use. A request that fits
    now gets a plan without moves; None when no plan within the bound was found.
    """
    if max_moves < 0:
        raise ValueError(f"max_moves={max_moves} is not allowed: an integer >= 0")
    state = engine.state
    effective = engine.effective(request)
    allowed = engine.feasible_when_empty(effective)
    if node_mask is not None:
        allowed = allowed & np.asarray(node_mask, dtype=bool)
    now = engine.feasible(effective) & allowed
    if now.any():
        node = engine.choose_node(effective, now)
        devices = engine.policy.select_devices(state, effective, node)
        return MovePlan((), Placement.for_request(effective, node, devices))
    if max_moves == 0 or not allowed.any():
        return None
    base_room = _Room(state, node_mask)
    gathered = _gather(state, base_room, movable, lost_work_s, allowed)
    by_node = gathered.by_node
    ranked = _rank_hole_nodes(state, effective, gathered)
    if not ranked:
        return None
    best: tuple[tuple[int, float], int, list[_Held], list[Placement], tuple[int, ...]] | None = None
    for tried_nodes, (estimate, _, node) in enumerate(ranked):
        if tried_nodes >= MAX_HOLE_NODES:
            break
        if best is not None and (best[0] == (1, 0.0) or estimate > best[0][0]):
            break  # one move without lost work is the least there is (it does not fit now)
        limit = max_moves if best is None else best[0][0]
        fit = _NodeFit(state, node, effective)
        sets = _victim_sets(fit, effective, by_node[node], limit)
        checked = 0
        for victims in sets:
            key = (len(victims), sum(h.lost_work_s for h in victims))
            if best is not None and key >= best[0]:
                continue
            checked += 1
            if checked > MAX_RELOCATIONS_PER_NODE:
                break
            hole = _hole_devices(fit, effective, victims)
            room = base_room.copy()
            room.share[node, list(hole)] = -1
            freed_cpu = sum(v.placement.cpu_milli for v in victims)
            freed_host = sum(v.placement.host_memory_mib for v in victims)
            # Targets on the hole node need room now and must leave the request its CPU and memory later.
            room.cpu[node] = min(room.cpu[node], state.free_cpu_milli[node] + freed_cpu - effective.cpu_milli)
            room.host[node] = min(
                room.host[node], state.free_host_memory_mib[node] + freed_host - effective.host_memory_mib
            )
            targets = _relocate(room, victims)
            if targets is None:
                continue
            best = (key, node, victims, targets, hole)
            break  # sets come fewest and cheapest first: the first that relocates is this node's best
    if best is None:
        return None
    _, node, victims, targets, hole = best
    moves = tuple(Move(v.id, v.request, v.placement, t) for v, t in zip(victims, targets, strict=True))
    return MovePlan(moves, Placement.for_request(effective, node, hole))


# ---------------------------------------------------------------------------------------------- commit
def _check_moves(state: ClusterState, moves: Sequence[Move]) -> None:
    ids = [m.id for m in moves]
    if len(set(ids)) != len(ids):
        raise LedgerError(f"the moves name a replica twice: {ids}")
    for m in moves:
        if state.grants.get(m.id) != m.source:
            raise LedgerError(f"replica_id={m.id!r} no longer holds the move's source placement")
        same = (m.target.share_milli, m.target.device_memory_mib, m.target.cpu_milli, m.target.host_memory_mib) == (
            m.source.share_milli,
            m.source.device_memory_mib,
            m.source.cpu_milli,
            m.source.host_memory_mib,
        )
        if not same or len(m.target.device_indices) != len(m.source.device_indices):
            raise LedgerError(f"move of {m.id!r}: the target asks for other amounts than the source holds")


def _move_in_ledger(state: ClusterState, moves: Sequence[Move]) -> None:
    for m in moves:  # make before break: every target first
        state.reserve(_TARGET_PREFIX + m.id, m.target)
    for m in moves:
        state.unreserve(m.id)
    for m in moves:
        state.unreserve(_TARGET_PREFIX + m.id)
        state.reserve(m.id, m.target)


def _tell_policy(engine: Scheduler, moves: Sequence[Move]) -> None:
    for m in moves:
        moved = engine.effective(m.request)
        engine.policy.released(moved, m.source)
        engine.policy.placed(moved, m.target)


def commit_plan(engine: Scheduler, plan: MovePlan, request_id: str, request: Request) -> None:
    """In one ledger transaction: each moved replica's grant goes from source to target (targets reserved
    before anything moves), and the hole is reserved for ``request_id``. Raises LedgerError and rolls back if
    anything no longer fits (or a replica no longer holds its source). The policy is told (``released`` for
    each source, ``placed`` for each target and for the hole) only once everything is in the ledger, as
    ``Scheduler.schedule`` and ``Scheduler.release`` would have told it."""
    state = engine.state
    effective = engine.effective(request)
    expected = Placement.for_request(effective, plan.hole.node_index, plan.hole.device_indices)
    if plan.hole != expected:
        raise LedgerError(f"plan.hole={plan.hole} does not match the request ({expected})")
    if request_id in {m.id for m in plan.moves}:
        raise LedgerError(f"the plan moves {request_id!r}, the replica it opens a hole for")
    with state.transaction():
        _check_moves(state, plan.moves)
        _move_in_ledger(state, plan.moves)
        state.reserve(request_id, plan.hole)
    _tell_policy(engine, plan.moves)
    engine.policy.placed(effective, plan.hole)


def commit_moves(engine: Scheduler, moves: Sequence[Move]) -> None:
    """``commit_plan`` without a hole (for ``find_consolidation``'s moves): one transaction, targets first."""
    with engine.state.transaction():
        _check_moves(engine.state, moves)
        _move_in_ledger(engine.state, moves)
    _tell_policy(engine, moves)


# ---------------------------------------------------------------------------------------------- consolidation
def find_consolidation(
    engine: Scheduler,
    movable: Mapping[str, tuple[Request, Placement]],
    max_moves: int,
    lost_work_s: Mapping[str, float] | None = None,
) -> tuple[Move, ...]:
    """Periodic consolidation with the same bound: empty the least-used partly-used nodes whose replicas are
    all movable and all fit on other partly-used devices and nodes (never on a fully free device, never on a
    node being emptied), so whole devices and nodes open for multi-GPU work. At most ``max_moves`` moves in
    all; among nodes as used, those with less lost work go first. The moves fit together in what is free now
    (make-before-break); carry them out with ``commit_moves``. The ledger is not touched here."""
    if max_moves < 0:
        raise ValueError(f"max_moves={max_moves} is not allowed: an integer >= 0")
    state = engine.state
    if max_moves == 0:
        return ()
    lost = lost_work_s or {}
    on_node: dict[int, list[_Held]] = {}
    unmovable = np.zeros(state.node_count, dtype=bool)
    for replica_id, placement in state.grants.items():
        entry = movable.get(replica_id)
        if entry is None or entry[1] != placement:
            unmovable[placement.node_index] = True
            continue
        on_node.setdefault(placement.node_index, []).append(
            _Held(replica_id, entry[0], placement, float(lost.get(replica_id, 0.0)))
        )
    used = (state.capacity_share_milli - state.free_share_milli).sum(axis=1)
    has_devices = state.device_count > 0
    candidates = [
        n
        for n in np.flatnonzero(has_devices & ~unmovable & (used > 0)).tolist()
        if 0 < len(on_node.get(n, [])) <= max_moves
    ]
    candidates.sort(key=lambda n: (int(used[n]), len(on_node[n]), sum(h.lost_work_s for h in on_node[n]), n))
    room = _Room(state, None)
    room.share[room.share == FULL_SHARE_MILLI] = -1  # never fill a fully free device
    emptied: set[int] = set()
    moves: list[Move] = []
    for n in candidates:
        members = on_node[n]
        if len(moves) + len(members) > max_moves:
            continue
        trial = room.copy()
        trial.share[n] = -1
        trial.cpu[n] = -1
        trial.host[n] = -1
        for e in emptied:
            trial.share[e] = -1
            trial.cpu[e] = -1
            trial.host[e] = -1
        # Whole-device replicas need fully free devices: only on partly used nodes, never an emptied one.
        targets = _relocate_consolidating(trial, members, state)
        if targets is None:
            continue
        room = trial
        room.share[n] = -1
        room.cpu[n] = -1
        room.host[n] = -1
        emptied.add(n)
        moves.extend(Move(h.id, h.request, h.placement, t) for h, t in zip(members, targets, strict=True))
    return tuple(moves)


def _relocate_consolidating(room: _Room, members: list[_Held], state: ClusterState) -> list[Placement] | None:
    """Like ``_relocate``, but whole-device replicas may use fully free devices of partly used nodes."""
    slices = [h for h in members if h.placement.share_milli < FULL_SHARE_MILLI]
    whole = [h for h in members if h.placement.share_milli >= FULL_SHARE_MILLI]
    targets: dict[str, Placement] = {}
    placed = _relocate(room, slices)
    if placed is None:
        return None
    targets.update({h.id: t for h, t in zip(slices, placed, strict=True)})
    if whole:
        partly_used = (state.free_share_milli < state.capacity_share_milli).any(axis=1) & (room.cpu >= 0)
        reopened = state.device_present & (state.free_share_milli == FULL_SHARE_MILLI) & partly_used[:, None]
        room.share = np.where(reopened & (room.share == -1), FULL_SHARE_MILLI, room.share)
        placed = _relocate(room, whole)
        room.share[room.share == FULL_SHARE_MILLI] = -1  # what is still fully free stays closed to slices
        if placed is None:
            return None
        targets.update({h.id: t for h, t in zip(whole, placed, strict=True)})
    return [targets[h.id] for h in members]


__all__ = [
    "Move",
    "MovePlan",
    "blocked_by_fragmentation",
    "commit_moves",
    "commit_plan",
    "find_consolidation",
    "find_moves",
]
