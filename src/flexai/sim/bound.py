"""A lower bound on unallocated GPU %: no placement of the same arrived pods can leave less idle.

The bound solves a relaxation of "place as much GPU demand as possible from these pods on these nodes"
as a mixed-integer program with HiGHS (through scipy). Nodes are grouped by type (CPU, memory, devices,
model) and pods by shape; y[s, t] counts pods of shape s on nodes of type t. Every real placement
satisfies these constraints, so the program's optimum (or HiGHS's dual bound, if the time limit stops
it) is at least the best real allocation:

* per type: CPU, host memory and device share sums within the type's total;
* per type: for dual-feasible functions u (bin-packing theory: sum of u over items in one bin <= 1),
  sum u(share) over pods <= devices of the type, which accounts for slivers that no pod can fill
  (two 0.81-GPU pods never share a device); the same on each node's device count (an 8-GPU pod needs a
  whole 8-GPU node) and CPU (two pods above half of a node's CPU never share it);
* per shape: no more pods than arrived; a shape may only use types it fits on one node of.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from flexai.model.cluster import Node, Request
from flexai.model.units import FULL_SHARE_MILLI

Dff = Callable[[np.ndarray], np.ndarray]


def _dff_half(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0.5, 1.0, np.where(x == 0.5, 0.5, 0.0))


def _dff_fs1(k: int) -> Dff:
    # Fekete-Schepers: u(x) = x if (k+1)x is an integer, else floor((k+1)x)/k.
    def u(x: np.ndarray) -> np.ndarray:
        scaled = (k + 1) * x
        integral = np.isclose(scaled, np.round(scaled))
        return np.where(integral, x, np.floor(scaled) / k)

    return u


def _dff_threshold(eps: float) -> Dff:
    # u(x) = 1 above 1 - eps, 0 below eps, x between (valid for eps <= 1/2).
    def u(x: np.ndarray) -> np.ndarray:
        return np.where(x > 1 - eps + 1e-12, 1.0, np.where(x < eps - 1e-12, 0.0, x))

    return u


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS's C++ core sometimes prints debug lines straight to file descriptor 1; keep them off the report."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@dataclass(frozen=True)
class BoundResult:
    unallocated_gpu_pct: float
    """Least unallocated GPU % any placement could reach (a valid lower bound)."""
    max_allocated_milli: float
    capacity_milli: int
    optimal: bool
    pods: int


def lower_bound_unallocated(
    nodes: Sequence[Node], requests: Sequence[Request], time_limit_s: float = 20.0
) -> BoundResult:
    capacity = sum(n.device_count for n in nodes) * FULL_SHARE_MILLI
    node_types = Counter(
        (n.cpu_milli, n.host_memory_mib, n.device_count, n.device_model) for n in nodes if n.device_count
    )
    shapes = Counter(
        (r.cpu_milli, r.host_memory_mib, r.device_count, r.share_milli, r.allowed_models)
        for r in requests
        if r.device_count
    )
    types = list(node_types.items())
    shape_list = list(shapes.items())
    pairs: list[tuple[int, int]] = []
    for s, ((cpu, mem, count, _share, allowed), _) in enumerate(shape_list):
        for t, ((t_cpu, t_mem, t_dev, t_model), _) in enumerate(types):
            if cpu <= t_cpu and mem <= t_mem and count <= t_dev and (not allowed or t_model in allowed):
                pairs.append((s, t))
    if not pairs:
        return BoundResult(100.0, 0.0, capacity, True, len(requests))
    shape_arr = np.array([k for k, _ in shape_list], dtype=object)
    pair_s = np.array([p[0] for p in pairs])
    pair_t = np.array([p[1] for p in pairs])
    cpu = np.array([k[0] for k in shape_arr], dtype=float)[pair_s]
    mem = np.array([k[1] for k in shape_arr], dtype=float)[pair_s]
    dev = np.array([k[2] for k in shape_arr], dtype=float)[pair_s]
    share = np.array([k[3] for k in shape_arr], dtype=float)[pair_s] / FULL_SHARE_MILLI
    gpu_milli = dev * share * FULL_SHARE_MILLI
    t_cpu = np.array([k[0] for k, _ in types], dtype=float)
    t_mem = np.array([k[1] for k, _ in types], dtype=float)
    t_dev = np.array([k[2] for k, _ in types], dtype=float)
    t_count = np.array([c for _, c in types], dtype=float)

    share_dffs: list[Dff] = [_dff_half] + [_dff_fs1(k) for k in range(1, 11)]
    distinct = sorted({float(x) for x in share if x < 1})
    # Thresholds just above 1 - x make a share x count as a whole device; thresholds at x drop smaller items.
    eps = {round(1 - x + 1e-3, 6) for x in distinct} | set(distinct)
    share_dffs += [_dff_threshold(e) for e in sorted(eps) if 0 < e <= 0.5]
    node_dffs: list[Dff] = [_dff_half, _dff_fs1(2), _dff_fs1(3)]

    rows: list[tuple[np.ndarray, float, np.ndarray]] = []  # (coefficients per pair, rhs, mask of pairs)

    def add(coef: np.ndarray, rhs_per_type: np.ndarray) -> None:
        for t in range(len(types)):
            mask = pair_t == t
            if mask.any():
                rows.append((coef, float(rhs_per_type[t]), mask))

    add(cpu, t_count * t_cpu)
    add(mem, t_count * t_mem)
    add(gpu_milli, t_count * t_dev * FULL_SHARE_MILLI)
    for u in share_dffs:
        add(dev * u(share), t_count * t_dev)
    for u in node_dffs:
        # A node's devices, in device units: a slice counts its share, not a whole device.
        add(u(dev * share / t_dev[pair_t]), t_count)
        add(u(cpu / t_cpu[pair_t]), t_count)

    n_rows = len(rows) + len(shape_list)
    a = lil_matrix((n_rows, len(pairs)))
    upper = np.empty(n_rows)
    for i, (coef, rhs, mask) in enumerate(rows):
        idx = np.flatnonzero(mask)
        a[i, idx] = coef[idx]
        upper[i] = rhs
    for s, (_, count) in enumerate(shape_list):
        i = len(rows) + s
        idx = np.flatnonzero(pair_s == s)
        a[i, idx] = 1.0
        upper[i] = count
    with _quiet_stdout():
        result = _solve(a, upper, gpu_milli, time_limit_s)
    optimal = result.status == 0
    return _finish(result, optimal, capacity, len(requests))


def _solve(a: lil_matrix, upper: np.ndarray, gpu_milli: np.ndarray, time_limit_s: float):  # noqa: ANN202
    return milp(
        c=-gpu_milli,
        constraints=LinearConstraint(a.tocsr(), -np.inf, upper),
        integrality=np.ones(len(gpu_milli)),
        bounds=Bounds(0, np.inf),
        options={"time_limit": time_limit_s, "disp": False},
    )


def _finish(result, optimal: bool, capacity: int, pods: int) -> BoundResult:  # noqa: ANN001
    # We minimise -allocated: HiGHS's dual bound is a lower bound of -allocated, valid even when the time
    # limit stopped the search; at optimality it equals the objective.
    dual = getattr(result, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        best = -float(dual)
    elif optimal and result.fun is not None:
        best = -float(result.fun)
    else:
        raise RuntimeError(f"the bound's MILP gave no bound: {result.message}")
    best = min(best, float(capacity))
    return BoundResult(100.0 * (1 - best / capacity), best, capacity, optimal, pods)
