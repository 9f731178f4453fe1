"""GpuClustering (FGD paper baseline): keep pods of the same kind (sharing, K whole GPUs) together.

score = int(25 (8000 - R) / 8000) + 75 if the node holds only this kind, 50 if this kind and others,
25 if no GPU pod, 0 otherwise. CPU-only pods score 0 everywhere.
"""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState
from flexai.scheduler.framework import Policy
from flexai.scheduler.policies.dotprod import GPU_NORM_MILLI
from flexai.scheduler.registry import register

MAX_TAGS = 65  # tag 0 = sharing, tag K = K whole devices


def pod_tag(request: Request) -> int:
    return 0 if request.is_fractional else request.device_count


@register
class ClusteringPolicy(Policy):
    name = "clustering"

    def bind_state(self, state: ClusterState) -> None:
        self.tag_pods = np.zeros((state.node_count, MAX_TAGS), dtype=np.int64)

    def placed(self, request: Request, placement: Placement) -> None:
        if request.device_count:
            self.tag_pods[placement.node_index, pod_tag(request)] += 1

    def released(self, request: Request, placement: Placement) -> None:
        if request.device_count:
            self.tag_pods[placement.node_index, pod_tag(request)] -= 1

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        if request.device_count == 0:
            return np.zeros(state.node_count, dtype=np.int64)
        free_gpu = state.free_share_milli.sum(axis=1)
        base = 25 * (GPU_NORM_MILLI - free_gpu) // GPU_NORM_MILLI
        present = self.tag_pods > 0
        has_own = present[:, pod_tag(request)]
        kinds = present.sum(axis=1)
        bonus = np.where(kinds == 0, 25, np.where(has_own, np.where(kinds == 1, 75, 50), 0))
        return (base + bonus).astype(np.int64)
