"""Queues with a guaranteed quota and a borrowing limit, and their use, for admission and fair share.

A quota is kept per *bucket*: a device model name, or ``*`` for any model the queue names no bucket for.
Each bucket has a device share (milli, 1000 = one device) and a device memory (MiB); CPU is one number
per queue. Work within its queue's guarantee is admitted first and may reclaim capacity that other queues
borrowed; work beyond it borrows idle capacity up to the borrowing limit and is ordered between queues by
weighted dominant-resource fairness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flexai.hi.work import HiError
from flexai.model.cluster import Request

ANY_MODEL = "*"


@dataclass(frozen=True, slots=True)
class Quota:
    """Amounts per bucket; a bucket absent from ``share_milli`` has no amount (0 guaranteed, or no limit)."""

    share_milli: Mapping[str, int] = field(default_factory=dict)
    memory_mib: Mapping[str, int] = field(default_factory=dict)
    cpu_milli: int | None = None

    def __post_init__(self) -> None:
        for what, values in (("share_milli", self.share_milli), ("memory_mib", self.memory_mib)):
            for bucket, amount in values.items():
                if not isinstance(amount, int) or isinstance(amount, bool) or not 0 <= amount <= 1 << 40:
                    raise HiError(f"{what}[{bucket!r}]={amount!r} is not allowed: an integer in 0..2^40")
        if self.cpu_milli is not None and not 0 <= self.cpu_milli <= 1 << 40:
            raise HiError(f"cpu_milli={self.cpu_milli!r} is not allowed: an integer in 0..2^40")

    @property
    def buckets(self) -> set[str]:
        return set(self.share_milli) | set(self.memory_mib)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    guarantee: Quota = field(default_factory=Quota)
    borrowing_limit: Quota | None = None
    """How far beyond its guarantee the queue may borrow, per bucket; None (or a bucket not named) = no limit."""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 253:
            raise HiError(f"queue.name={self.name!r} is not allowed: 1..253 characters")
        if not 0 < self.weight <= 1e6:
            raise HiError(f"queue {self.name}: weight={self.weight!r} is not allowed: a number in (0, 1e6]")

    def bucket_of(self, model: str) -> str:
        guarantee_buckets = self.guarantee.buckets
        limit_buckets = self.borrowing_limit.buckets if self.borrowing_limit else set()
        return model if model in guarantee_buckets or model in limit_buckets else ANY_MODEL


@dataclass
class Use:
    share_milli: dict[str, int] = field(default_factory=dict)
    memory_mib: dict[str, int] = field(default_factory=dict)
    cpu_milli: int = 0
    total_share_milli: int = 0


def request_amounts(request: Request) -> tuple[int, int, int]:
    """(share milli over all devices, device memory MiB over all devices, CPU milli) of one replica."""
    return request.total_share_milli, request.device_memory_mib * request.device_count, request.cpu_milli


class QueueBook:
    """Use per queue; answers 'within guarantee?', 'within limit?' and the fair-share order."""

    def __init__(self, specs: Iterable[QueueSpec], total_share_milli: int, total_cpu_milli: int) -> None:
        self.specs: dict[str, QueueSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise HiError(f"queue.name={spec.name!r} is named twice: queue names must be unique")
            self.specs[spec.name] = spec
        self.use: dict[str, Use] = {name: Use() for name in self.specs}
        self.total_share_milli = max(1, total_share_milli)
        self.total_cpu_milli = max(1, total_cpu_milli)

    def ensure(self, name: str) -> QueueSpec:
        """Queues not configured get no guarantee and no borrowing limit (Kubernetes: one per namespace)."""
        spec = self.specs.get(name)
        if spec is None:
            spec = self.specs[name] = QueueSpec(name)
            self.use[name] = Use()
        return spec

    def add(self, queue: str, model: str, request: Request, sign: int = 1) -> None:
        spec = self.ensure(queue)
        use = self.use[queue]
        share, memory, cpu = request_amounts(request)
        bucket = spec.bucket_of(model) if request.device_count else ""
        if bucket:
            use.share_milli[bucket] = use.share_milli.get(bucket, 0) + sign * share
            use.memory_mib[bucket] = use.memory_mib.get(bucket, 0) + sign * memory
        use.cpu_milli += sign * cpu
        use.total_share_milli += sign * share

    def _fits(self, queue: str, model: str, request: Request, borrow: bool) -> bool:
        spec = self.ensure(queue)
        use = self.use[queue]
        share, memory, cpu = request_amounts(request)
        g = spec.guarantee
        extra = spec.borrowing_limit
        bucket = spec.bucket_of(model)

        def bound(amounts: Mapping[str, int], extra_amounts: Mapping[str, int] | None) -> float:
            limit: float = amounts.get(bucket, 0)
            if borrow:
                if extra_amounts is None or bucket not in extra_amounts:
                    return float("inf")
                limit += extra_amounts[bucket]
            return limit

        if request.device_count:
            if use.share_milli.get(bucket, 0) + share > bound(g.share_milli, extra.share_milli if extra else None):
                return False
            if g.memory_mib or (extra and extra.memory_mib) or not borrow:
                memory_bound = bound(g.memory_mib, extra.memory_mib if extra else None)
                if not borrow and bucket not in g.memory_mib:
                    memory_bound = float("inf")  # a guarantee in share only does not bind memory
                if use.memory_mib.get(bucket, 0) + memory > memory_bound:
                    return False
        if cpu:
            cpu_bound: float
            if borrow:
                cpu_bound = (
                    float("inf") if extra is None or extra.cpu_milli is None else (g.cpu_milli or 0) + extra.cpu_milli
                )
            else:
                cpu_bound = float("inf") if g.cpu_milli is None else g.cpu_milli
            if use.cpu_milli + cpu > cpu_bound:
                return False
        return True

    def within_guarantee(self, queue: str, model: str, request: Request) -> bool:
        spec = self.ensure(queue)
        if request.device_count and spec.bucket_of(model) not in spec.guarantee.share_milli:
            return False
        if not request.device_count and spec.guarantee.cpu_milli is None:
            return False
        return self._fits(queue, model, request, borrow=False)

    def within_limit(self, queue: str, model: str, request: Request) -> bool:
        return self._fits(queue, model, request, borrow=True)

    def over_guarantee(self, queue: str, model: str) -> bool:
        """Does the queue hold more than its guarantee in this model's bucket (a borrower)?"""
        spec = self.ensure(queue)
        bucket = spec.bucket_of(model)
        return self.use[queue].share_milli.get(bucket, 0) > spec.guarantee.share_milli.get(bucket, 0)

    def dominant_share(self, queue: str) -> float:
        spec = self.ensure(queue)
        use = self.use[queue]
        dominant = max(use.total_share_milli / self.total_share_milli, use.cpu_milli / self.total_cpu_milli)
        return dominant / spec.weight

    def describe(self, queue: str, model: str) -> str:
        """'4.0 of 4.0 GPUs in use' in the bucket that ``model`` falls in, for reasons a person reads."""
        spec = self.ensure(queue)
        bucket = spec.bucket_of(model)
        used = self.use[queue].share_milli.get(bucket, 0) / 1000
        guaranteed = spec.guarantee.share_milli.get(bucket, 0) / 1000
        extra = spec.borrowing_limit.share_milli.get(bucket) if spec.borrowing_limit else None
        where = "" if bucket == ANY_MODEL else f" {bucket}"
        limit = "no borrowing limit" if extra is None else f"limit {guaranteed + extra / 1000:.1f}"
        return f"{used:.1f}{where} devices in use, {guaranteed:.1f} guaranteed, {limit}"

    def view(self, pending: Mapping[str, int]) -> list[dict[str, object]]:
        """One row per queue: guarantee, limit, use, borrowing and pending count (``flexai queues``)."""
        rows = []
        for name in sorted(self.specs):
            spec = self.specs[name]
            use = self.use[name]
            buckets = sorted(
                spec.guarantee.buckets
                | set(use.share_milli)
                | (spec.borrowing_limit.buckets if spec.borrowing_limit else set())
            )
            per_bucket = []
            borrowed = 0
            for bucket in buckets:
                used = use.share_milli.get(bucket, 0)
                guaranteed = spec.guarantee.share_milli.get(bucket, 0)
                extra = spec.borrowing_limit.share_milli.get(bucket) if spec.borrowing_limit else None
                borrowed += max(0, used - guaranteed)
                per_bucket.append(
                    {
                        "bucket": bucket,
                        "guarantee_share_milli": guaranteed,
                        "borrowing_limit_share_milli": extra,
                        "used_share_milli": used,
                        "guarantee_memory_mib": spec.guarantee.memory_mib.get(bucket, 0),
                        "used_memory_mib": use.memory_mib.get(bucket, 0),
                    }
                )
            rows.append(
                {
                    "queue": name,
                    "weight": spec.weight,
                    "buckets": per_bucket,
                    "used_share_milli": use.total_share_milli,
                    "borrowed_share_milli": borrowed,
                    "used_cpu_milli": use.cpu_milli,
                    "pending": pending.get(name, 0),
                }
            )
        return rows
