"""The shape distribution of a workload: which request shapes occur and how often.

Fragmentation-aware policies (FGD and flex) measure fragmentation against this distribution. It is learnt
from the trace's population of shapes, never from the order in which pods will arrive.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from flexai.model.cluster import Request


@dataclass(frozen=True, slots=True, order=True)
class Shape:
    """A request shape: what a fragmentation model needs to know about a pod (host memory excluded)."""

    cpu_milli: int
    share_milli: int
    device_count: int
    spec_label: str = ""
    """The allowed-models constraint as written (e.g. ``V100M16|V100M32``); empty = any model."""

    @property
    def allowed_models(self) -> frozenset[str]:
        return frozenset(p for p in self.spec_label.split("|") if p)

    @classmethod
    def of(cls, request: Request, spec_label: str | None = None) -> Shape:
        if request.device_count == 0:
            return cls(request.cpu_milli, 0, 0, "")
        label = spec_label if spec_label is not None else "|".join(sorted(request.allowed_models))
        return cls(request.cpu_milli, request.share_milli, request.device_count, label)


@dataclass(frozen=True, slots=True)
class WorkloadProfile:
    """Shapes and their popularity weights (weights sum to 1)."""

    shapes: tuple[Shape, ...]
    weights: tuple[float, ...]
    cpu_milli_per_share_milli: float = 0.0
    """Host CPU that device requests bring per milli of device share (their demand ratio), 0 if unknown."""
    host_memory_mib_per_share_milli: float = 0.0
    """Host memory that device requests bring per milli of device share, 0 if unknown."""

    @classmethod
    def from_requests(
        cls, requests: Iterable[Request], spec_labels: Iterable[str] | None = None, coverage: float = 0.95
    ) -> WorkloadProfile:
        """Shapes as in ``from_shapes`` plus the CPU and host memory that device requests bring per share."""
        requests = list(requests)
        labels = list(spec_labels) if spec_labels is not None else [None] * len(requests)
        profile = cls.from_shapes((Shape.of(r, label) for r, label in zip(requests, labels, strict=True)), coverage)
        device_requests = [r for r in requests if r.device_count]
        share = sum(r.total_share_milli for r in device_requests)
        if not share:
            return profile
        return cls(
            profile.shapes,
            profile.weights,
            sum(r.cpu_milli for r in device_requests) / share,
            sum(r.host_memory_mib for r in device_requests) / share,
        )

    @classmethod
    def from_shapes(cls, shapes: Iterable[Shape], coverage: float = 0.95) -> WorkloadProfile:
        """Keep the most popular shapes until they cover ``coverage`` of all pods (FGD's target workload).

        Shapes are ordered by count, then by shape descending, as the FGD artifact does.
        """
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage={coverage!r} is not allowed: a fraction in (0, 1]")
        counts = Counter(shapes)
        total = sum(counts.values())
        if total == 0:
            return cls((), ())
        ordered = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
        kept: list[tuple[Shape, int]] = []
        covered = 0
        for shape, count in ordered:
            if covered >= coverage * total:
                break
            kept.append((shape, count))
            covered += count
        return cls(tuple(s for s, _ in kept), tuple(c / covered for _, c in kept))
