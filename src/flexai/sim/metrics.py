"""Metrics of the fill experiment, binned as the FGD artifact's analysis scripts do."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

REPORT_ARRIVED_PCT = (90, 95, 100, 110, 130)


def binned_unallocated_pct(
    arrived_milli: np.ndarray, allocated_milli: np.ndarray, capacity_milli: int, points: Iterable[int]
) -> dict[int, float]:
    """Unallocated GPU % at each integer arrived % X: 100 - mean allocated % over the pod events whose
    arrived % rounds to X (ties to even), or over X-1..X+1 when none does; no interpolation."""
    arrived_bin = np.round(100.0 * arrived_milli / capacity_milli).astype(np.int64)
    allocated_pct = np.round(100.0 * allocated_milli / capacity_milli, 2)
    size = int(max(arrived_bin.max(initial=0), max(points, default=0))) + 3
    sums = np.bincount(arrived_bin, weights=allocated_pct, minlength=size)
    counts = np.bincount(arrived_bin, minlength=size)
    out: dict[int, float] = {}
    for x in points:
        if counts[x]:
            value = sums[x] / counts[x]
        else:
            lo, hi = max(x - 1, 0), x + 2
            n = counts[lo:hi].sum()
            value = sums[lo:hi].sum() / n if n else float("nan")
        out[x] = round(100.0 - round(float(value), 2), 2)
    return out


def events_behind_point(arrived_milli: np.ndarray, capacity_milli: int, x: int) -> int:
    """How many pod events (from the start) the value at arrived % ``x`` depends on: up to the last event
    averaged into that point. A bound over these events' pods holds for every event averaged."""
    arrived_bin = np.round(100.0 * arrived_milli / capacity_milli).astype(np.int64)
    hits = np.flatnonzero(arrived_bin == x)
    if hits.size == 0:
        hits = np.flatnonzero((arrived_bin >= x - 1) & (arrived_bin <= x + 1))
    if hits.size == 0:
        return int(np.searchsorted(arrived_milli, x / 100 * capacity_milli, side="right"))
    return int(hits[-1]) + 1
