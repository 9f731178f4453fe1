"""Plain Kubernetes baseline: no sharing (a pod asking for part of a GPU gets a whole one) and
kube-scheduler's default LeastAllocated scoring over CPU and memory (weights 1, integer 0..100)."""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.scheduler.framework import Policy
from flexai.scheduler.registry import register


def _least_allocated(free: np.ndarray, capacity: np.ndarray, requested: int) -> np.ndarray:
    left = free - requested
    safe_capacity = np.maximum(capacity, 1)
    return np.where((capacity > 0) & (left >= 0), left * 100 // safe_capacity, 0)


@register
class KubernetesWholeGpuPolicy(Policy):
    name = "k8s-whole-gpu"
    whole_devices_only = True

    def score(self, state: ClusterState, request: Request, feasible: np.ndarray) -> np.ndarray:
        cpu = _least_allocated(state.free_cpu_milli, state.capacity_cpu_milli, request.cpu_milli)
        memory = _least_allocated(state.free_host_memory_mib, state.capacity_host_memory_mib, request.host_memory_mib)
        return ((cpu + memory) // 2).astype(np.int64)
