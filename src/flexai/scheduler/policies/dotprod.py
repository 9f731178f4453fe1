"""DotProd (FGD paper baseline): the node whose free (CPU, GPU) vector has the smallest dot product with
the request, both normalised by fixed maxima (128 cores, 8 GPUs); score int(100 * (1 - d / 2))."""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.scheduler.framework import Policy
from flexai.scheduler.registry import register

CPU_NORM_MILLI = 128_000
GPU_NORM_MILLI = 8_000


@register
class DotProdPolicy(Policy):
    name = "dotprod"

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        free_gpu = state.free_share_milli.sum(axis=1)
        dot = (state.free_cpu_milli / CPU_NORM_MILLI) * (request.cpu_milli / CPU_NORM_MILLI) + (
            free_gpu / GPU_NORM_MILLI
        ) * (request.total_share_milli / GPU_NORM_MILLI)
        return np.floor(100 * (1 - dot / 2)).astype(np.int64)
