"""BestFit (FGD paper baseline): the node left with the least free CPU and GPU after placing the pod,
f = 0.5 (C - c) / 128 cores + 0.5 (R - g) / 8 GPUs, score int(100 (1 - f))."""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.scheduler.framework import Policy
from flexai.scheduler.policies.dotprod import CPU_NORM_MILLI, GPU_NORM_MILLI
from flexai.scheduler.registry import register


@register
class BestFitPolicy(Policy):
    name = "bestfit"

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        free_gpu = state.free_share_milli.sum(axis=1)
        left = (
            0.5 * (state.free_cpu_milli - request.cpu_milli) / CPU_NORM_MILLI
            + 0.5 * (free_gpu - request.total_share_milli) / GPU_NORM_MILLI
        )
        return np.floor(100 * (1 - left)).astype(np.int64)
