"""GpuPacking (FGD paper baseline): prefer a partly used device (tighter first), then a free device on a
used node, then an idle node (smaller first). CPU-only pods score 0 everywhere (pure tie-break)."""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.model.units import FULL_SHARE_MILLI
from flexai.scheduler.framework import Policy, device_fit_mask
from flexai.scheduler.registry import register


@register
class PackingPolicy(Policy):
    name = "packing"

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        scores = np.zeros(state.node_count, dtype=np.int64)
        if request.device_count == 0:
            return scores
        free = state.free_share_milli
        fully_free = (free == FULL_SHARE_MILLI) & state.device_present
        free_count = fully_free.sum(axis=1)
        idle_node = free_count == state.device_count
        if request.is_fractional:
            fits = device_fit_mask(state, request)
            tightest = np.where(fits, free, FULL_SHARE_MILLI + 1).min(axis=1)
            used_device = tightest < FULL_SHARE_MILLI
            # Score of the tightest partly used device: 100 - int(int(r * 100 / 1000) / 10).
            partial = np.maximum(100 - (tightest * 100 // FULL_SHARE_MILLI) // 10, 50)
            scores = np.where(used_device, partial, 50 - 1)
        else:
            scores = np.full(state.node_count, max(50 - request.device_count, 33), dtype=np.int64)
        return np.where(idle_node, 33 - state.device_count, scores).astype(np.int64)
