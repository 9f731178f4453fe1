"""Per-(node, request shape) cache of policy results, valid until that node changes.

A placement changes one node, so between two requests of the same shape only a few nodes need new scores.
Entries remember the node version they were computed at (``ClusterState.node_version``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from flexai.model.state import ClusterState


@dataclass
class CachedScores:
    score: np.ndarray
    device: np.ndarray
    version: np.ndarray


Evaluator = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Computes (scores, chosen device) for the given node indices."""


class ShapeScoreCache:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.entries: dict[Hashable, CachedScores] = {}
        self.evaluations = 0

    def refresh(self, key: Hashable, nodes_mask: np.ndarray, evaluate: Evaluator) -> CachedScores:
        """Bring the entry for ``key`` up to date on the nodes in ``nodes_mask`` and return it."""
        entry = self.entries.get(key)
        n = self.state.node_count
        if entry is None:
            entry = CachedScores(
                np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
            )
            self.entries[key] = entry
        stale = np.flatnonzero(nodes_mask & (entry.version != self.state.node_version))
        if stale.size:
            score, device = evaluate(stale)
            entry.score[stale] = score
            entry.device[stale] = device
            entry.version[stale] = self.state.node_version[stale]
            self.evaluations += int(stale.size)
        return entry
