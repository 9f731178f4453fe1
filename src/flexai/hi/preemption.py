"""Victim choice: which running items on one node to stop so that a pending request fits there.

Two named plugins:

- ``fraction-aware`` (ours): looks at the *slices* — which devices a request needs and which grants on
  them, together, open a hole it fits in. Fewest victims, then least lost work, then least share freed
  beyond the need (less fragmentation).
- ``k8s-default``: kube-scheduler's default preemption, whole pods: remove every lower-priority pod on
  the node, put back ("reprieve") as many as still leave room, highest priority first; between nodes pick
  the lowest highest-victim priority, then the smallest sum of priorities, then the fewest victims.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar

from flexai.hi.work import Running
from flexai.model.cluster import Request
from flexai.model.state import ClusterState
from flexai.model.units import FULL_SHARE_MILLI


@dataclass(frozen=True, slots=True)
class VictimSet:
    node_index: int
    victims: tuple[Running, ...]
    lost_work: float
    """Lost share-seconds (share milli x seconds of work redone)."""
    excess_share_milli: int
    """Share freed beyond what the request needs (fragmentation left behind)."""

    @property
    def key(self) -> tuple[int, float, int]:
        return (len(self.victims), self.lost_work, self.excess_share_milli)


LostWork = Callable[[Running], float]


class _NodeFit:
    """Free resources of one node, and whether a request fits once a set of grants is returned."""

    def __init__(self, state: ClusterState, node: int, request: Request) -> None:
        self.node = node
        self.request = request
        count = int(state.device_count[node])
        self.free_share = [int(x) for x in state.free_share_milli[node, :count]]
        self.free_memory = [int(x) for x in state.free_device_memory_mib[node, :count]]
        self.memory_known = bool(state.device_memory_known[node])
        self.free_cpu = int(state.free_cpu_milli[node])
        self.free_host_memory = int(state.free_host_memory_mib[node])

    def freed(self, victims: Sequence[Running]) -> tuple[list[int], list[int]]:
        """Free share and device memory per device once ``victims`` have left."""
        share = list(self.free_share)
        memory = list(self.free_memory)
        for v in victims:
            for d in v.placement.device_indices:
                share[d] += v.placement.share_milli
                memory[d] += v.placement.device_memory_mib
        return share, memory

    def fits_without(self, victims: Sequence[Running]) -> bool:
        request = self.request
        cpu = self.free_cpu + sum(v.placement.cpu_milli for v in victims)
        host = self.free_host_memory + sum(v.placement.host_memory_mib for v in victims)
        if cpu < request.cpu_milli or host < request.host_memory_mib:
            return False
        if not request.device_count:
            return True
        share, memory = self.freed(victims)
        fitting = sum(
            1
            for d in range(len(share))
            if share[d] >= request.share_milli and (not self.memory_known or memory[d] >= request.device_memory_mib)
        )
        return fitting >= request.device_count

    def excess(self, victims: Sequence[Running]) -> int:
        freed = sum(v.placement.share_milli * len(v.placement.device_indices) for v in victims)
        return max(0, freed - self.request.total_share_milli)


class PreemptionPlugin:
    name: ClassVar[str] = ""

    def choose(
        self,
        state: ClusterState,
        request: Request,
        candidate_nodes: Sequence[int],
        candidates_by_node: dict[int, list[Running]],
        lost_work: LostWork,
    ) -> VictimSet | None:
        raise NotImplementedError


class FractionAware(PreemptionPlugin):
    """Per node, the smallest set of grants whose slices open a hole where the request fits."""

    name: ClassVar[str] = "fraction-aware"

    def __init__(self, max_victims: int = 8, max_combinations: int = 400) -> None:
        self.max_victims = max_victims
        self.max_combinations = max_combinations

    def choose(self, state, request, candidate_nodes, candidates_by_node, lost_work):  # type: ignore[override]
        best: VictimSet | None = None
        for node in candidate_nodes:
            found = self._best_on_node(state, node, request, candidates_by_node.get(node, []), lost_work)
            if found is not None and (best is None or found.key < best.key):
                best = found
                if len(best.victims) == 1 and best.lost_work == 0:
                    break
        return best

    def _best_on_node(
        self, state: ClusterState, node: int, request: Request, candidates: list[Running], lost_work: LostWork
    ) -> VictimSet | None:
        if not candidates:
            return None
        if request.device_count:
            # Cheap bound first: all the share on the node that could be freed is still too little.
            freeable = int(state.free_share_milli[node].sum()) + sum(
                r.placement.share_milli * len(r.placement.device_indices) for r in candidates
            )
            if freeable < request.total_share_milli:
                return None
        fit = _NodeFit(state, node, request)
        if fit.fits_without(()):
            return VictimSet(node, (), 0.0, 0)  # it fits already (freed earlier in this cycle)
        if not fit.fits_without(candidates):
            return None  # even every candidate together leaves no hole here
        costs = {id(r): lost_work(r) for r in candidates}

        def make(victims: Sequence[Running]) -> VictimSet:
            return VictimSet(node, tuple(victims), sum(costs[id(v)] for v in victims), fit.excess(victims))

        if request.device_count and request.share_milli == FULL_SHARE_MILLI:
            chosen = self._whole_devices(fit, request, candidates, costs)
            if chosen is not None and fit.fits_without(chosen):
                return make(chosen)
            return make(self._greedy(fit, candidates, costs))
        pools = self._pools(fit, request, candidates)
        best: VictimSet | None = None
        for pool in pools:
            pool = sorted(pool, key=lambda r: costs[id(r)])
            for size in range(1, min(len(pool), self.max_victims) + 1):
                if best is not None and size > len(best.victims):
                    break
                tried = 0
                for combo in combinations(pool, size):
                    tried += 1
                    if tried > self.max_combinations:
                        break
                    if fit.fits_without(combo):
                        option = make(combo)
                        if best is None or option.key < best.key:
                            best = option
                if best is not None:
                    break
        if best is None:
            best = make(self._greedy(fit, candidates, costs))
        return best

    @staticmethod
    def _pools(fit: _NodeFit, request: Request, candidates: list[Running]) -> list[list[Running]]:
        """Where to look: for one device, the grants on each device (plus CPU holders); for slices on several
        devices, every candidate on the node (whole devices are handled by ``_whole_devices``)."""
        needs_host = fit.free_cpu < request.cpu_milli or fit.free_host_memory < request.host_memory_mib
        if request.device_count == 0 or request.device_count > 1:
            return [candidates]  # slices on several devices: a hole may need grants on every one of them
        by_device: dict[int, list[Running]] = {}
        for r in candidates:
            for d in r.placement.device_indices:
                by_device.setdefault(d, []).append(r)
        if needs_host:
            return [candidates]
        return [members for _, members in sorted(by_device.items())]

    @staticmethod
    def _whole_devices(
        fit: _NodeFit, request: Request, candidates: list[Running], costs: dict[int, float]
    ) -> list[Running] | None:
        """Empty the ``device_count`` devices that are cheapest to empty (fewest grants, least lost work)."""
        on_device: dict[int, list[Running]] = {}
        for r in candidates:
            for d in r.placement.device_indices:
                on_device.setdefault(d, []).append(r)
        options = []
        for d in range(len(fit.free_share)):
            members = on_device.get(d, [])
            freed = fit.free_share[d] + sum(r.placement.share_milli for r in members)
            if freed < FULL_SHARE_MILLI:
                continue  # someone who may not be preempted holds part of it
            options.append((len(members), sum(costs[id(r)] for r in members), d, members))
        if len(options) < request.device_count:
            return None
        chosen: dict[int, Running] = {}
        for _, _, _, members in sorted(options, key=lambda o: o[:3])[: request.device_count]:
            for r in members:
                chosen[id(r)] = r
        return list(chosen.values())

    def _greedy(self, fit: _NodeFit, candidates: list[Running], costs: dict[int, float]) -> list[Running]:
        """Fallback past the enumeration bound: add the cheapest per share freed until it fits, then drop
        whoever is not needed."""
        chosen: list[Running] = []
        for r in sorted(candidates, key=lambda r: costs[id(r)] / max(1, r.placement.share_milli)):
            chosen.append(r)
            if fit.fits_without(chosen):
                break
        for r in sorted(chosen, key=lambda r: -costs[id(r)]):
            rest = [x for x in chosen if x is not r]
            if fit.fits_without(rest):
                chosen = rest
        return chosen


class KubeDefault(PreemptionPlugin):
    """kube-scheduler's default preemption (DefaultPreemption plugin), whole pods."""

    name: ClassVar[str] = "k8s-default"

    def choose(self, state, request, candidate_nodes, candidates_by_node, lost_work):  # type: ignore[override]
        best: tuple[tuple[float, ...], VictimSet] | None = None
        for node in candidate_nodes:
            candidates = candidates_by_node.get(node, [])
            if not candidates:
                continue
            fit = _NodeFit(state, node, request)
            if fit.fits_without(()):
                return VictimSet(node, (), 0.0, 0)
            if not fit.fits_without(candidates):
                continue
            victims = list(candidates)
            # Reprieve: keep as many as possible, highest priority first.
            for r in sorted(candidates, key=lambda r: (-r.item.priority_class, -r.item.priority, r.started_s)):
                rest = [v for v in victims if v is not r]
                if fit.fits_without(rest):
                    victims = rest
            ranks = [int(v.item.priority_class) * 1_000_000 + v.item.priority for v in victims]
            key = (max(ranks), sum(ranks), len(victims), -min(v.started_s for v in victims))
            option = VictimSet(node, tuple(victims), sum(lost_work(v) for v in victims), fit.excess(victims))
            if best is None or key < best[0]:
                best = (key, option)
        return best[1] if best else None


PREEMPTION_PLUGINS: dict[str, type[PreemptionPlugin]] = {p.name: p for p in (FractionAware, KubeDefault)}
