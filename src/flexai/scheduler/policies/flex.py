"""flex: flexai's default policy (experimental knobs while being tuned)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from flexai.model.state import ClusterState
from flexai.model.workload import Shape, WorkloadProfile
from flexai.scheduler.policies.fgd import FragmentationDeltaPolicy, sigmoid_score
from flexai.scheduler.registry import register


@register
class FlexPolicy(FragmentationDeltaPolicy):
    name = "flex"

    def profile(self) -> WorkloadProfile:
        base = super().profile()
        return base

    def bind_state(self, state: ClusterState) -> None:
        opts = self.context.options
        prof = super().profile()
        cov = opts.get("cov", 0.95)
        if cov != 0.95:
            prof = self._full_profile(cov)
        lam = opts.get("lam", -1.0)
        if lam >= 0:
            w = np.array([wt * (s.share_milli * s.device_count / 1000 + lam) for s, wt in zip(prof.shapes, prof.weights)])
            prof = WorkloadProfile(prof.shapes, tuple((w / w.sum()).tolist()))
        self._prof = prof
        from flexai.scheduler.fragmentation import FragmentationModel
        from flexai.scheduler.cache import ShapeScoreCache
        self.frag_model = FragmentationModel(prof, state)
        self.cache = ShapeScoreCache(state)
        self._entry = None
        self.tiebreak = opts.get("tiebreak", 0.0)

    def _full_profile(self, cov):
        return self.context.options["_trace_profile"](cov)

    def evaluate(self, state, request, nodes):
        if not (self.context.options.get("realdev", 0.0) and request.is_fractional):
            return super().evaluate(state, request, nodes)
        free = state.free_share_milli[nodes]
        cpu = state.free_cpu_milli[nodes]
        model = state.node_model_id[nodes]
        before = self.node_frag(state, free, cpu, model)
        cpu_after = cpu - request.cpu_milli
        devices = free.shape[1]
        m = request.share_milli
        hypo = np.repeat(free[:, None, :], devices, axis=1) - m * np.eye(devices, dtype=np.int64)[None]
        after = self.node_frag(state, hypo.reshape(-1, devices), np.repeat(cpu_after, devices), np.repeat(model, devices)).reshape(-1, devices)
        delta = before[:, None] - after
        fits = (free >= m) & state.device_present[nodes]
        delta = np.where(fits, delta, -np.inf)
        best = np.argmax(delta, axis=1)
        bd = delta[np.arange(len(nodes)), best]
        return self.delta_to_score(bd, nodes, state), best

    def score(self, state, request, feasible):
        base = super().score(state, request, feasible)
        ss = self.context.options.get("ss", 0.0)
        if ss == 0.0 or not request.is_fractional:
            return base
        hist = np.bincount(state.free_share_milli[state.device_present], minlength=1002).astype(np.int64)
        hist[0] = 0; hist[1000] = 0
        r = state.free_share_milli
        m = request.share_milli
        fits = (r >= m) & state.device_present
        after = np.clip(r - m, 0, 1001)
        cost = -(2 * hist[np.clip(r, 0, 1001)] - 1) * (r < 1000) + (2 * hist[after] + 1) * (after > 0)
        cost = np.where(fits, cost, 10**9)
        best = cost.min(axis=1)
        self._ss_dev = cost.argmin(axis=1)
        sec = np.clip(5000 - best, 0, 9999)
        if ss == 1.0:
            return base * 10000 + sec
        return base

    def select_devices(self, state, request, node_index):
        if self.context.options.get("ss", 0.0) and request.is_fractional and hasattr(self, "_ss_dev"):
            if self.context.options.get("ssdev", 1.0):
                r = state.free_share_milli[node_index]; m = request.share_milli
                hist = np.bincount(state.free_share_milli[state.device_present], minlength=1002).astype(np.int64)
                hist[0] = 0; hist[1000] = 0
                fits = (r >= m) & state.device_present[node_index]
                after = np.clip(r - m, 0, 1001)
                cost = -(2 * hist[np.clip(r, 0, 1001)] - 1) * (r < 1000) + (2 * hist[after] + 1) * (after > 0)
                cost = np.where(fits, cost, 10**9)
                return (int(np.argmin(cost)),)
        return super().select_devices(state, request, node_index)

    def delta_to_score(self, delta_milli, nodes, state):
        div = self.context.options.get("div", 1000.0); mult = self.context.options.get("mult", 100.0)
        s = np.floor(mult / (1.0 + np.exp(-delta_milli / div))).astype(np.int64)
        if self.tiebreak == 1.0:  # best-fit: less free GPU on the node wins ties
            free = state.free_share_milli[nodes].sum(axis=1)
            sec = 9000 - free
            if s.ndim == 2:
                sec = sec[:, None]
            return s * 10000 + sec
        if self.tiebreak == 2.0:  # real-valued delta
            sec = np.clip(np.round((delta_milli / 1000.0) * 1000) + 5000, 0, 9999).astype(np.int64)
            return s * 10000 + sec
        return s
