"""FGD, fragmentation gradient descent (Weng et al., USENIX ATC'23).

Score of a node = int(100 * sigmoid(delta / 1000)), delta = Frag(node) - Frag(node after placing the pod),
Frag measured against the workload profile (see ``fragmentation``). A slice may go to any fitting device:
each is tried, the node scores its best device, and that device (lowest index on integer ties) is used.
Whole-device pods take the lowest-index free devices.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.model.workload import WorkloadProfile
from flexai.scheduler.cache import CachedScores, ShapeScoreCache
from flexai.scheduler.fragmentation import FragmentationModel
from flexai.scheduler.framework import Policy, select_devices_best
from flexai.scheduler.registry import register


def sigmoid_score(delta_milli: np.ndarray) -> np.ndarray:
    return np.floor(100.0 / (1.0 + np.exp(-delta_milli / 1000.0))).astype(np.int64)


def take_whole_devices(free_share_milli: np.ndarray, share_milli: int, count: int) -> np.ndarray:
    """Rows of free share after taking ``share_milli`` from the ``count`` lowest-index devices that have it."""
    fits = free_share_milli >= share_milli
    taken = fits & (np.cumsum(fits, axis=1) <= count)
    return free_share_milli - share_milli * taken


class FragmentationDeltaPolicy(Policy):
    """Shared machinery of policies that score by the change of a fragmentation measure."""

    def profile(self) -> WorkloadProfile:
        if self.context.profile is None:
            raise ValueError(f"policy {self.name!r} needs a workload profile (the trace's shape distribution)")
        return self.context.profile

    def bind_state(self, state: ClusterState) -> None:
        self.frag_model = FragmentationModel(self.profile(), state)
        self.cache = ShapeScoreCache(state)
        self._entry: CachedScores | None = None

    device_choice_by_delta: ClassVar[bool] = False
    """False: a slice takes the device with the best integer score, lowest index on ties (FGD as published);
    True: the device with the best real-valued delta."""

    def node_frag(
        self, nodes: np.ndarray, free: np.ndarray, cpu: np.ndarray, memory: np.ndarray, model: np.ndarray
    ) -> np.ndarray:
        """Fragmentation of each node state in the batch (``nodes`` says which node each row belongs to)."""
        return self.frag_model.node_frag(free, cpu, model)

    def penalty(self, state: ClusterState, request: Request, nodes: np.ndarray) -> np.ndarray:
        """Extra cost (milli) of placing ``request`` on each node, subtracted from the delta; none for FGD."""
        return np.zeros(len(nodes))

    def evaluate(self, state: ClusterState, request: Request, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        free = state.free_share_milli[nodes]
        cpu = state.free_cpu_milli[nodes]
        memory = state.free_host_memory_mib[nodes]
        model = state.node_model_id[nodes]
        before = self.node_frag(nodes, free, cpu, memory, model)
        cpu_after = cpu - request.cpu_milli
        memory_after = memory - request.host_memory_mib
        penalty = self.penalty(state, request, nodes)
        if not request.is_fractional:
            free_after = take_whole_devices(free, request.share_milli, request.device_count)
            after = self.node_frag(nodes, free_after, cpu_after, memory_after, model)
            return sigmoid_score(before - after - penalty), np.zeros(len(nodes), dtype=np.int64)
        # A slice may go to any fitting device: score each hypothetical placement.
        devices = free.shape[1]
        hypo = (
            np.repeat(free[:, None, :], devices, axis=1) - request.share_milli * np.eye(devices, dtype=np.int64)[None]
        )
        after = self.node_frag(
            np.repeat(nodes, devices),
            hypo.reshape(-1, devices),
            np.repeat(cpu_after, devices),
            np.repeat(memory_after, devices),
            np.repeat(model, devices),
        ).reshape(-1, devices)
        fits = (free >= request.share_milli) & state.device_present[nodes]
        delta = np.where(fits, before[:, None] - after - penalty[:, None], 0.0)
        rows = np.arange(len(nodes))
        if self.device_choice_by_delta:
            best = np.argmax(np.where(fits, delta, -np.inf), axis=1)
            return sigmoid_score(delta[rows, best]), best
        score = np.where(fits, sigmoid_score(delta), np.iinfo(np.int64).min)
        best = np.argmax(score, axis=1)
        return score[rows, best], best

    def _refresh(self, state: ClusterState, request: Request, mask: np.ndarray) -> CachedScores:
        key = (request.cpu_milli, request.share_milli, request.device_count)
        return self.cache.refresh(key, mask, lambda nodes: self.evaluate(state, request, nodes))

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        return self._refresh(state, request, feasible).score

    def select_devices(self, state: ClusterState, request: Request, node_index: int) -> tuple[int, ...]:
        if not request.is_fractional or request.device_memory_mib:
            return select_devices_best(state, request, node_index)
        mask = np.zeros(state.node_count, dtype=bool)
        mask[node_index] = True
        return (int(self._refresh(state, request, mask).device[node_index]),)


@register
class FgdPolicy(FragmentationDeltaPolicy):
    name = "fgd"
