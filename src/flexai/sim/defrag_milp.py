"""The exact answer on a neighbourhood: the fewest moves that open a hole, as a MILP solved by HiGHS.

The same question as ``flexai.hi.defrag.find_moves`` (same rules: targets must fit in what is free now,
make-before-break; no target on the hole's devices; at most ``max_moves``; fewest moves, then least lost
work), solved exactly over a neighbourhood: the ``hole_nodes`` most promising hole nodes (the heuristic's
ranking, which only drops nodes where even every movable replica together leaves no hole) with all their
movable replicas, and, for each replica, every device in the cluster with room for it (at most
``max_slots`` of them, tightest first). It lives in ``flexai.sim`` (scipy is not allowed in the pure core)
and serves ``benchmarks/defrag_quality.py``, which measures how far the heuristic is from it.

Variables: ``z[n]`` the hole is on node n; ``h[n, d]`` the hole takes device d; ``m[v]`` replica v moves;
``y[v, t]`` v goes to slot t (a device for a slice, a device of a multi-device target, a node for CPU-only
work) and ``w[v, n]`` v goes to node n (multi-device and CPU-only replicas).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from flexai.hi.defrag import Move, MovePlan, _gather, _Held, _rank_hole_nodes, _Room
from flexai.model.cluster import Placement, Request
from flexai.scheduler.framework import Scheduler


@dataclass(frozen=True)
class MilpAnswer:
    plan: MovePlan | None
    optimal: bool
    """HiGHS proved the answer optimal on the neighbourhood (or proved there is none)."""
    variables: int
    viable_nodes: int = 0
    """Nodes where free plus movable share could hold the request at all (no plan elsewhere): when at most
    ``hole_nodes``, the neighbourhood holds every possible hole and an optimal answer is exact."""


class _Model:
    def __init__(self) -> None:
        self.cost: list[float] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def var(self, cost: float = 0.0) -> int:
        self.cost.append(cost)
        return len(self.cost) - 1

    def row(self, terms: list[tuple[int, float]], lower: float, upper: float) -> None:
        r = len(self.lower)
        for c, v in terms:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(v)
        self.lower.append(lower)
        self.upper.append(upper)


def milp_moves(
    engine: Scheduler,
    request: Request,
    movable: Mapping[str, tuple[Request, Placement]],
    max_moves: int,
    lost_work_s: Mapping[str, float] | None = None,
    hole_nodes: int = 8,
    max_slots: int = 400,
    time_limit_s: float = 20.0,
) -> MilpAnswer:
    """The fewest moves (then least lost work) that open a hole for ``request`` on the neighbourhood."""
    state = engine.state
    effective = engine.effective(request)
    allowed = engine.feasible_when_empty(effective)
    room = _Room(state, None)
    gathered = _gather(state, room, movable, lost_work_s, allowed)
    viable = _rank_hole_nodes(state, effective, gathered)
    ranked = viable[:hole_nodes]
    if not ranked or max_moves <= 0:
        return MilpAnswer(None, True, 0, len(viable))
    holes = [node for _, _, node in ranked]
    victims: list[_Held] = [h for n in holes for h in gathered.by_node[n]]
    total_lost = sum(h.lost_work_s for h in victims)
    model = _Model()
    inf = np.inf
    k = effective.device_count
    present = state.device_present
    z = {n: model.var() for n in holes}
    model.row([(z[n], 1.0) for n in holes], 1, 1)
    h: dict[tuple[int, int], int] = {}
    if k:
        for n in holes:
            devices = [d for d in range(int(state.device_count[n]))]
            for d in devices:
                h[n, d] = model.var()
            model.row([(h[n, d], 1.0) for d in devices] + [(z[n], -float(k))], 0, 0)
    # Terms of the capacity constraints, gathered per device and per node while the variables are made.
    share_in: dict[tuple[int, int], list[tuple[int, float]]] = {}
    memory_in: dict[tuple[int, int], list[tuple[int, float]]] = {}
    cpu_in: dict[int, list[tuple[int, float]]] = {}
    host_in: dict[int, list[tuple[int, float]]] = {}
    move_vars: dict[int, int] = {}
    slot_vars: dict[int, list[tuple[int, tuple[int, tuple[int, ...]]]]] = {}
    for i, v in enumerate(victims):
        p = v.placement
        m = move_vars[i] = model.var(1.0 + (v.lost_work_s / (total_lost + 1.0) if total_lost else 0.0))
        count = len(p.device_indices)
        nodes_ok = (room.cpu >= p.cpu_milli) & (room.host >= p.host_memory_mib)
        nodes_ok &= room.model_mask(v.request.allowed_models, count)
        choices: list[tuple[int, tuple[int, tuple[int, ...]]]] = []
        if count == 0:
            nodes = np.flatnonzero(nodes_ok)
            nodes = nodes[nodes != p.node_index]
            nodes = nodes[np.argsort(-room.cpu[nodes], kind="stable")][:max_slots]
            for n in nodes.tolist():
                w = model.var()
                choices.append((w, (n, ())))
                cpu_in.setdefault(n, []).append((w, float(p.cpu_milli)))
                host_in.setdefault(n, []).append((w, float(p.host_memory_mib)))
        else:
            fits = (room.share >= p.share_milli) & (room.memory >= p.device_memory_mib) & nodes_ok[:, None]
            fits &= present
            fits[p.node_index, list(p.device_indices)] = False
            if count == 1:
                flat = np.flatnonzero(fits)
                flat = flat[np.argsort(room.share.ravel()[flat], kind="stable")][:max_slots]
                width = room.share.shape[1]
                for cell in flat.tolist():
                    n, d = divmod(cell, width)
                    y = model.var()
                    choices.append((y, (n, (d,))))
                    share_in.setdefault((n, d), []).append((y, float(p.share_milli)))
                    memory_in.setdefault((n, d), []).append((y, float(p.device_memory_mib)))
                    cpu_in.setdefault(n, []).append((y, float(p.cpu_milli)))
                    host_in.setdefault(n, []).append((y, float(p.host_memory_mib)))
            else:
                for n in np.flatnonzero(fits.sum(axis=1) >= count).tolist()[:max_slots]:
                    w = model.var()
                    devices = np.flatnonzero(fits[n]).tolist()
                    ys = []
                    for d in devices:
                        y = model.var()
                        ys.append((y, d))
                        share_in.setdefault((n, d), []).append((y, float(p.share_milli)))
                        memory_in.setdefault((n, d), []).append((y, float(p.device_memory_mib)))
                    model.row([(y, 1.0) for y, _ in ys] + [(w, -float(count))], 0, 0)
                    choices.append((w, (n, tuple(d for _, d in ys))))
                    cpu_in.setdefault(n, []).append((w, float(p.cpu_milli)))
                    host_in.setdefault(n, []).append((w, float(p.host_memory_mib)))
                    slot_vars.setdefault(-1 - i, []).extend((y, (n, (d,))) for y, d in ys)
        slot_vars[i] = choices
        model.row([(c, 1.0) for c, _ in choices] + [(m, -1.0)], 0, 0)
    model.row([(m, 1.0) for m in move_vars.values()], 0, max_moves)
    # Targets fit in what is free now and never on the hole's devices.
    cells = set(share_in) | set(h)
    for n, d in cells:
        free = float(state.free_share_milli[n, d])
        terms = list(share_in.get((n, d), []))
        if (n, d) in h:
            terms.append((h[n, d], free))  # a hole device takes no target: capacity free * (1 - h)
        if terms:
            model.row(terms, -inf, free)
        if state.device_memory_known[n] and memory_in.get((n, d)):
            model.row(memory_in[(n, d)], -inf, float(state.free_device_memory_mib[n, d]))
    for n, terms in cpu_in.items():
        model.row(terms, -inf, float(state.free_cpu_milli[n]))
    for n, terms in host_in.items():
        model.row(terms, -inf, float(state.free_host_memory_mib[n]))
    # The hole: what is free plus what the victims free, less what targets take there, holds the request.
    on_node: dict[int, list[int]] = {}
    for i, v in enumerate(victims):
        on_node.setdefault(v.placement.node_index, []).append(i)
    for n in holes:
        mine = on_node.get(n, [])
        cpu_terms = [(move_vars[i], float(victims[i].placement.cpu_milli)) for i in mine]
        cpu_terms += [(c, -val) for c, val in cpu_in.get(n, [])]
        model.row(cpu_terms + [(z[n], -float(effective.cpu_milli))], -float(state.free_cpu_milli[n]), inf)
        host_terms = [(move_vars[i], float(victims[i].placement.host_memory_mib)) for i in mine]
        host_terms += [(c, -val) for c, val in host_in.get(n, [])]
        model.row(host_terms + [(z[n], -float(effective.host_memory_mib))], -float(state.free_host_memory_mib[n]), inf)
        if not k:
            continue
        for d in range(int(state.device_count[n])):
            freed = [
                (move_vars[i], float(victims[i].placement.share_milli))
                for i in mine
                if d in victims[i].placement.device_indices
            ]
            model.row(freed + [(h[n, d], -float(effective.share_milli))], -float(state.free_share_milli[n, d]), inf)
            if state.device_memory_known[n] and effective.device_memory_mib:
                freed_memory = [
                    (move_vars[i], float(victims[i].placement.device_memory_mib))
                    for i in mine
                    if d in victims[i].placement.device_indices
                ]
                model.row(
                    freed_memory + [(h[n, d], -float(effective.device_memory_mib))],
                    -float(state.free_device_memory_mib[n, d]),
                    inf,
                )
    count_vars = len(model.cost)
    matrix = coo_matrix((model.vals, (model.rows, model.cols)), shape=(len(model.lower), count_vars)).tocsr()
    result = milp(
        np.asarray(model.cost),
        constraints=LinearConstraint(matrix, np.asarray(model.lower), np.asarray(model.upper)),
        integrality=np.ones(count_vars),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit_s, "disp": False},
    )
    optimal = result.status in (0, 2)  # 0: optimal, 2: infeasible (proved: no plan on the neighbourhood)
    if result.x is None:
        return MilpAnswer(None, optimal, count_vars, len(viable))
    x = np.round(result.x).astype(int)
    node = next(n for n in holes if x[z[n]])
    hole_devices = tuple(d for d in range(int(state.device_count[node])) if k and x[h[node, d]])
    moves = []
    for i, v in enumerate(victims):
        if not x[move_vars[i]]:
            continue
        target_node, devices = next(where for c, where in slot_vars[i] if x[c])
        if len(v.placement.device_indices) > 1:
            devices = tuple(d for c, (n, (d,)) in slot_vars[-1 - i] if n == target_node and x[c])
        p = v.placement
        target = Placement(target_node, devices, p.share_milli, p.device_memory_mib, p.cpu_milli, p.host_memory_mib)
        moves.append(Move(v.id, v.request, p, target))
    plan = MovePlan(tuple(moves), Placement.for_request(effective, node, hole_devices))
    return MilpAnswer(plan, optimal, count_vars, len(viable))
