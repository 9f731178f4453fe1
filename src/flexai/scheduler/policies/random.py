"""Random (FGD paper baseline): a uniformly random feasible node, a random fitting device inside it."""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.scheduler.framework import Policy, device_fit_mask, select_devices_best
from flexai.scheduler.registry import register


@register
class RandomPolicy(Policy):
    name = "random"

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        candidates = np.flatnonzero(feasible)
        scores = np.zeros(state.node_count, dtype=np.int64)
        scores[candidates[self.context.rng.integers(len(candidates))]] = 100
        return scores

    def select_devices(self, state: ClusterState, request: Request, node_index: int) -> tuple[int, ...]:
        if not request.is_fractional:
            return select_devices_best(state, request, node_index)
        fitting = np.flatnonzero(device_fit_mask(state, request)[node_index])
        return (int(fitting[self.context.rng.integers(len(fitting))]),)
