"""Expected GPU fragmentation of a node against a workload's shape distribution (FGD, ATC'23).

For each shape p of the profile, the fragment F_p of a node is the idle device share that p cannot use:
all of it when p is CPU-only, may not run on the node's model, or does not fit (devices or CPU); otherwise
only the slivers smaller than p's per-device share. Frag(node) = sum_p weight_p * F_p, in milli.
Everything is vectorised over a batch of node states.
"""

from __future__ import annotations

import numpy as np

from flexai.model.state import ClusterState
from flexai.model.workload import WorkloadProfile


class FragmentationModel:
    def __init__(self, profile: WorkloadProfile, state: ClusterState) -> None:
        shapes = profile.shapes
        self.shape_cpu_milli = np.array([s.cpu_milli for s in shapes], dtype=np.int64)
        self.shape_share_milli = np.array([s.share_milli for s in shapes], dtype=np.int64)
        self.shape_device_count = np.array([s.device_count for s in shapes], dtype=np.int64)
        self.weight = np.array(profile.weights, dtype=np.float64)
        is_device_shape = self.shape_device_count > 0
        # model_ok[model_id, p]; the extra last row serves model_id -1 (node without devices).
        model_ok = np.zeros((len(state.model_names) + 1, len(shapes)), dtype=bool)
        for p, shape in enumerate(shapes):
            allowed = shape.allowed_models
            for model, i in state.model_index.items():
                model_ok[i, p] = is_device_shape[p] and (not allowed or model in allowed)
        self.model_ok = model_ok
        # Work per distinct per-device share only (shapes share few distinct values).
        self.distinct_share_milli, self.share_slot = np.unique(
            np.where(is_device_shape, self.shape_share_milli, 1), return_inverse=True
        )

    def node_frag(self, free_share_milli: np.ndarray, free_cpu_milli: np.ndarray, model_id: np.ndarray) -> np.ndarray:
        """Frag (milli) of each node state in the batch: free_share (B, devices), free_cpu (B,), model (B,)."""
        free = free_share_milli[:, None, :]
        fits_device = free >= self.distinct_share_milli[None, :, None]  # (B, U, G)
        count_fit = fits_device.sum(axis=2)[:, self.share_slot]  # (B, P)
        sliver = np.where(fits_device, 0, free).sum(axis=2)[:, self.share_slot]  # (B, P)
        idle = free_share_milli.sum(axis=1)
        shape_fits = (
            self.model_ok[model_id]
            & (count_fit >= self.shape_device_count[None, :])
            & (free_cpu_milli[:, None] >= self.shape_cpu_milli[None, :])
        )
        fragment = np.where(shape_fits, sliver, idle[:, None])
        return fragment @ self.weight

    def cluster_frag_milli(self, state: ClusterState) -> float:
        return float(self.node_frag(state.free_share_milli, state.free_cpu_milli, state.node_model_id).sum())
