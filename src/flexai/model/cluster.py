"""Nodes, requests and placements: frozen value objects, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexai.model.units import FULL_SHARE_MILLI


class RequestError(ValueError):
    """A request or node description that cannot be accepted; the message names field, value and what is allowed."""


def _require(condition: bool, field_name: str, value: object, allowed: str) -> None:
    if not condition:
        raise RequestError(f"{field_name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True, slots=True)
class Node:
    """A machine with zero or more devices of one model, plus CPU and host memory."""

    name: str
    cpu_milli: int
    host_memory_mib: int
    device_count: int = 0
    device_model: str = ""
    device_memory_mib: int = 0
    """Memory of each device; 0 when unknown (then device memory is not checked)."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "node.name", self.name, "a non-empty name")
        _require(self.cpu_milli >= 0, "node.cpu_milli", self.cpu_milli, "an integer >= 0")
        _require(self.host_memory_mib >= 0, "node.host_memory_mib", self.host_memory_mib, "an integer >= 0")
        _require(0 <= self.device_count <= 64, "node.device_count", self.device_count, "0..64")
        _require(self.device_memory_mib >= 0, "node.device_memory_mib", self.device_memory_mib, "an integer >= 0")
        _require(
            self.device_count == 0 or bool(self.device_model),
            "node.device_model",
            self.device_model,
            "a model name when the node has devices",
        )


@dataclass(frozen=True, slots=True)
class Request:
    """What one replica needs. A request with device_count 0 is CPU-only.

    share_milli and device_memory_mib are per device. A share below 1000 (a slice) is allowed on a single
    device; on several devices only with ``multi_slice`` (otherwise multi-device requests take whole devices).
    """

    device_count: int = 0
    share_milli: int = 0
    device_memory_mib: int = 0
    allowed_models: frozenset[str] = field(default_factory=frozenset)
    """Device models the request may run on; empty means any."""
    cpu_milli: int = 0
    host_memory_mib: int = 0
    priority: int = 0
    qos: str = ""
    name: str = ""
    multi_slice: bool = False
    """device_count > 1 with share_milli < 1000: a slice of share_milli on each of device_count distinct devices
    of one node. Asked for explicitly (the Kubernetes adapter does, for a pod whose containers ask for part of
    several devices); the traces and the pool never do, so everything else keeps one-slice-or-whole-devices."""

    def __post_init__(self) -> None:
        _require(0 <= self.device_count <= 64, "device_count", self.device_count, "0..64")
        _require(self.cpu_milli >= 0, "cpu_milli", self.cpu_milli, "an integer >= 0")
        _require(self.host_memory_mib >= 0, "host_memory_mib", self.host_memory_mib, "an integer >= 0")
        _require(self.device_memory_mib >= 0, "device_memory_mib", self.device_memory_mib, "an integer >= 0")
        if self.device_count == 0:
            _require(self.share_milli == 0, "share_milli", self.share_milli, "0 when device_count is 0")
        else:
            _require(
                1 <= self.share_milli <= FULL_SHARE_MILLI,
                "share_milli",
                self.share_milli,
                f"1..{FULL_SHARE_MILLI} per device",
            )
            _require(
                self.device_count == 1 or self.share_milli == FULL_SHARE_MILLI or self.multi_slice,
                "share_milli",
                self.share_milli,
                f"{FULL_SHARE_MILLI} (whole devices) when device_count > 1, unless multi_slice=True",
            )
        _require(
            not self.multi_slice or (self.device_count > 1 and self.share_milli < FULL_SHARE_MILLI),
            "multi_slice",
            self.multi_slice,
            f"True only with device_count > 1 and share_milli < {FULL_SHARE_MILLI}",
        )

    @property
    def total_share_milli(self) -> int:
        """Compute share asked for over all devices (1000 = one whole device)."""
        return self.device_count * self.share_milli

    @property
    def is_fractional(self) -> bool:
        return self.device_count == 1 and self.share_milli < FULL_SHARE_MILLI

    def whole_devices(self) -> Request:
        """The same request rounded up to whole devices (what plain Kubernetes grants)."""
        if self.device_count == 0 or self.share_milli == FULL_SHARE_MILLI:
            return self
        return Request(
            device_count=self.device_count,
            share_milli=FULL_SHARE_MILLI,
            device_memory_mib=self.device_memory_mib,
            allowed_models=self.allowed_models,
            cpu_milli=self.cpu_milli,
            host_memory_mib=self.host_memory_mib,
            priority=self.priority,
            qos=self.qos,
            name=self.name,
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """Node and slices chosen for one replica: share_milli and device_memory_mib on each listed device."""

    node_index: int
    device_indices: tuple[int, ...]
    share_milli: int
    device_memory_mib: int
    cpu_milli: int
    host_memory_mib: int

    @classmethod
    def for_request(cls, request: Request, node_index: int, device_indices: tuple[int, ...]) -> Placement:
        return cls(
            node_index=node_index,
            device_indices=tuple(device_indices),
            share_milli=request.share_milli,
            device_memory_mib=request.device_memory_mib,
            cpu_milli=request.cpu_milli,
            host_memory_mib=request.host_memory_mib,
        )
