"""flex: flexai's default policy — FGD's fragmentation measure made aware of CPU, memory and model scarcity.

FGD (``fgd``) scores a node by how much placing the pod raises the node's expected GPU fragmentation
against the workload's shape distribution. It sees CPU and memory only as a cliff (a shape fits or not)
and sees device models only through the shapes that name them. flex adds two terms to the same measure,
both learnt from the trace's population of requests, never from the order of arrivals:

1. **Stranding (joint CPU/GPU fragmentation).** Idle device share is only usable while the node keeps the
   host CPU and memory that device requests bring with them. The profile gives the workload's ratios
   (CPU milli and memory MiB per milli of device share); each node expects at most its own capacity
   ratio. The share a node can no longer support, ``max(0, idle - min(cpu / cpu_ratio, mem / mem_ratio))``,
   counts as fragment with weight ``strand_weight``. So CPU-hungry pods and CPU-only pods go where CPU is
   plentiful for the idle devices, instead of leaving whole GPUs without CPU.
2. **Model pressure (keep scarce models for the requests that need them).** For each device model, the
   share of the profile's device demand that is constrained to it (spread over its allowed models),
   relative to the model's share of the capacity. Placing a request on a model under more pressure than
   the least-pressed model the request may use costs ``model_pressure_weight`` x pressure difference x
   its device share.

The node score is then FGD's: ``int(100 * sigmoid(delta / 1000))`` with ties to the fixed node priority
(the coarse, first-fit-like order matters: real-valued scores do worse). A slice picks its device inside
the chosen node by the real-valued delta. Results against FGD and the lower bound: BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np

from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.scheduler.policies.fgd import FragmentationDeltaPolicy
from flexai.scheduler.registry import register

DEFAULT_STRAND_WEIGHT = 0.5
DEFAULT_MODEL_PRESSURE_WEIGHT = 0.25


@register
class FlexPolicy(FragmentationDeltaPolicy):
    name = "flex"
    device_choice_by_delta = True

    def bind_state(self, state: ClusterState) -> None:
        super().bind_state(state)
        options = self.context.options
        profile = self.profile()
        self.strand_weight = float(options.get("strand_weight", DEFAULT_STRAND_WEIGHT))
        self.model_pressure_weight = float(options.get("model_pressure_weight", DEFAULT_MODEL_PRESSURE_WEIGHT))
        # Host resources each node should keep per milli of idle device share.
        capacity_share = np.maximum(state.capacity_share_milli.sum(axis=1), 1)
        self.cpu_per_share = np.minimum(profile.cpu_milli_per_share_milli, state.capacity_cpu_milli / capacity_share)
        self.memory_per_share = np.minimum(
            profile.host_memory_mib_per_share_milli, state.capacity_host_memory_mib / capacity_share
        )
        self.model_pressure = self._model_pressure(state)

    def _model_pressure(self, state: ClusterState) -> np.ndarray:
        """Per model id (last entry: no model): constrained demand share / capacity share."""
        profile = self.profile()
        models = len(state.model_names)
        capacity = np.zeros(models + 1)
        np.add.at(capacity, state.node_model_id, state.capacity_share_milli.sum(axis=1))
        capacity[-1] = 0.0
        constrained = np.zeros(models + 1)
        total_demand = 0.0
        for shape, weight in zip(profile.shapes, profile.weights, strict=True):
            demand = weight * shape.share_milli * shape.device_count
            total_demand += demand
            allowed = [state.model_index[m] for m in shape.allowed_models if m in state.model_index]
            for m in allowed:
                constrained[m] += demand / len(allowed)
        pressure = np.zeros(models + 1)
        has_capacity = capacity > 0
        if total_demand > 0:
            pressure[has_capacity] = (constrained[has_capacity] / total_demand) / (
                capacity[has_capacity] / capacity.sum()
            )
        return pressure

    def node_frag(
        self, nodes: np.ndarray, free: np.ndarray, cpu: np.ndarray, memory: np.ndarray, model: np.ndarray
    ) -> np.ndarray:
        frag = self.frag_model.node_frag(free, cpu, model)
        if not self.strand_weight:
            return frag
        supportable = np.minimum(
            cpu / np.maximum(self.cpu_per_share[nodes], 1e-9),
            memory / np.maximum(self.memory_per_share[nodes], 1e-9),
        )
        stranded = np.maximum(free.sum(axis=1) - supportable, 0.0)
        return frag + self.strand_weight * stranded

    def penalty(self, state: ClusterState, request: Request, nodes: np.ndarray) -> np.ndarray:
        if not self.model_pressure_weight or not request.device_count:
            return np.zeros(len(nodes))
        allowed = [state.model_index[m] for m in request.allowed_models if m in state.model_index]
        least = self.model_pressure[allowed].min() if allowed else self.model_pressure[:-1].min()
        own = self.model_pressure[state.node_model_id[nodes]]
        return self.model_pressure_weight * np.maximum(own - least, 0.0) * request.total_share_milli
