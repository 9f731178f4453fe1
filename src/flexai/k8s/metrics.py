"""Prometheus metrics of the Kubernetes components (prefix flexai_, base units, counters end in _total)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "SchedulerMetrics", "AgentMetrics", "generate_latest"]


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.attempts = Counter(
            "flexai_scheduling_attempts_total",
            "Scheduling decisions by verb (filter, bind, nominate) and result (scheduled, unschedulable, nominated, "
            "error).",
            ["verb", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flexai_decision_latency_seconds",
            "Time to answer one extender call.",
            ["verb"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.pending_pods = Gauge(
            "flexai_pending_pods", "Pods for the flexai scheduler not bound yet.", registry=self.registry
        )
        self.slices = Gauge(
            "flexai_slices_allocated", "Slices granted per device.", ["node", "device"], registry=self.registry
        )
        self.share = Gauge(
            "flexai_share_allocated_ratio",
            "Compute share granted per device (1 = the whole device).",
            ["node", "device"],
            registry=self.registry,
        )
        self.cluster_share = Gauge(
            "flexai_cluster_share_allocated_ratio",
            "Compute share granted over all devices of live and silent flexai nodes (1 = every device).",
            registry=self.registry,
        )


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.memory_used = Gauge(
            "flexai_device_memory_used_bytes", "Device memory in use.", ["device"], registry=self.registry
        )
        self.memory_total = Gauge(
            "flexai_device_memory_bytes", "Device memory in total.", ["device"], registry=self.registry
        )
        self.utilisation = Gauge(
            "flexai_device_utilisation_ratio", "Device busy time (0..1).", ["device"], registry=self.registry
        )
        self.healthy = Gauge("flexai_device_healthy", "1 if the device is healthy.", ["device"], registry=self.registry)
        self.allocations = Counter(
            "flexai_allocations_total", "Device plugin Allocate calls by result.", ["result"], registry=self.registry
        )
