"""One interface over every vendor's devices: ``DeviceInfo``, ``DeviceBackend``, the registry and ``discover``.

Each vendor backend reads its own tool (NVML, ``npu-smi``, AMD SMI) and answers in the same terms, so the
layers above (the embedded pool, the Kubernetes device plugin) never branch on the vendor. A backend that
cannot work on this machine steps aside with a one-line reason instead of raising, so that discovery can
try the next vendor and, when none fits, tell the user why each one was skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

Vendor = Literal["nvidia", "ascend", "amd", "sim"]
VENDORS: tuple[Vendor, ...] = ("nvidia", "ascend", "amd", "sim")

MIB = 1024 * 1024
"""Bytes per MiB: NVML and AMD SMI report bytes, flexai counts device memory in MiB."""

AUTO_ORDER: tuple[str, ...] = ("nvidia", "ascend", "amd")
"""The vendors ``discover("auto")`` tries, in this order; the first with at least one device wins."""

SIM_EXAMPLE = "2xA100-80GB,1xAscend910B-64GB"


class DiscoveryError(RuntimeError):
    """A backend could not read its devices (tool failed or timed out, output unreadable, device lost)."""


class NoDevicesError(DiscoveryError):
    """``discover`` found no usable backend; the message says why each one stepped aside."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One physical accelerator as the node sees it now.

    ``index`` is the number the vendor's visibility variable uses for this device; ``uuid`` is stable across
    reboots and re-enumeration. ``memory_mib`` is the device's total memory (0 when it could not be read, in
    which case ``healthy`` is False). ``utilisation_pct`` and ``memory_used_mib`` are None when the tool
    cannot tell. ``health_detail`` says in one line why an unhealthy device is unhealthy.
    """

    vendor: Vendor
    index: int
    uuid: str
    model: str
    memory_mib: int
    healthy: bool
    utilisation_pct: float | None = None
    memory_used_mib: int | None = None
    health_detail: str = ""

    def __post_init__(self) -> None:
        if self.vendor not in VENDORS:
            raise ValueError(f"vendor={self.vendor!r} is not allowed: use one of {', '.join(VENDORS)}")
        if self.index < 0:
            raise ValueError(f"index={self.index} is not allowed: a device index is 0 or more")
        if self.memory_mib < 0:
            raise ValueError(f"memory_mib={self.memory_mib} is not allowed: memory is 0 MiB or more")


class DeviceBackend(ABC):
    """What every vendor backend answers. ``name`` is the vendor; construction never touches the hardware."""

    name: ClassVar[str] = ""
    visibility_variable: ClassVar[str] = ""
    """The environment variable that limits which devices a process sees."""

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") when this backend can read devices here, else (False, one line saying why not)."""

    @abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """Every device the vendor's tool sees, read now (raises ``DiscoveryError`` if the tool fails)."""

    @abstractmethod
    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        """Device memory in MiB used by each process (pid -> MiB) on one device; {} where the tool cannot tell.

        Slice enforcement compares this with each slice's memory quota.
        """

    @abstractmethod
    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        """Environment that makes a child process see exactly these devices (same order as given)."""

    def visibility_env_for(self, devices: Sequence[DeviceInfo]) -> dict[str, str]:
        """``visibility_env`` for these devices, so callers need not pick indices or UUIDs per vendor."""
        return self.visibility_env([d.index for d in devices], [d.uuid for d in devices])

    def close(self) -> None:  # noqa: B027  (an optional hook: most backends hold nothing to release)
        """Release the vendor library (NVML, AMD SMI); a no-op for tools run per call."""

    def __enter__(self) -> DeviceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def index_of(device: int | DeviceInfo) -> int:
    """Accept a device index or a ``DeviceInfo`` wherever one device is meant."""
    return device.index if isinstance(device, DeviceInfo) else int(device)


def joined_visibility(variable: str, values: Sequence[int] | Sequence[str], what: str) -> dict[str, str]:
    """``{variable: "a,b,c"}``; an empty list hides every device (the vendors read "" as "none")."""
    texts = [str(v) for v in values]
    for text in texts:
        if not text or "," in text:
            raise ValueError(f"{what}={text!r} is not allowed in {variable}: use a non-empty value without commas")
    return {variable: ",".join(texts)}


def one_line(exc: BaseException) -> str:
    """An exception as one line for a reason or a log (vendor errors sometimes span lines or are empty)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_same_length(indices: Sequence[int], uuids: Sequence[str]) -> None:
    if len(indices) != len(uuids):
        raise ValueError(f"got {len(indices)} indices and {len(uuids)} uuids: pass one of each per device")


# -- registry -------------------------------------------------------------------------------------------------

_BACKENDS: dict[str, Callable[[], DeviceBackend]] = {}


def register_backend(name: str, factory: Callable[[], DeviceBackend]) -> None:
    """Code registers a vendor backend under its name; ``discover`` creates it by that name."""
    if name in _BACKENDS and _BACKENDS[name] is not factory:
        raise ValueError(f"device backend name {name!r} registered twice")
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    """Registered hardware backends, in the order ``auto`` tries them (``sim`` needs a SPEC, so is not listed)."""
    _load_builtin()
    preferred = [n for n in AUTO_ORDER if n in _BACKENDS]
    return preferred + sorted(n for n in _BACKENDS if n not in preferred)


def create_backend(name: str) -> DeviceBackend:
    """A fresh backend by vendor name (nothing is touched until ``available`` is called)."""
    _load_builtin()
    factory = _BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"device backend {name!r} is not known: choose from {', '.join(backend_names())}")
    return factory()


def _load_builtin() -> None:
    import flexai.node.amd  # noqa: F401  (each module registers its backend)
    import flexai.node.ascend  # noqa: F401
    import flexai.node.nvidia  # noqa: F401


# -- discovery ------------------------------------------------------------------------------------------------


def discover(
    devices: str = "auto", *, candidates: Sequence[DeviceBackend] | None = None
) -> tuple[DeviceBackend, list[DeviceInfo]]:
    """Choose the backend for this machine and read its devices.

    ``devices`` is ``auto`` (try nvidia, ascend, amd in order; the first available one with at least one
    device wins), a vendor name (only that one), or ``sim:SPEC`` (fake devices, e.g. ``sim:2xA100-80GB``).
    ``candidates`` replaces the backends ``auto`` tries (tests inject backends with fake vendor modules).
    Raises ``NoDevicesError`` naming why every backend stepped aside, ``ValueError`` for a bad ``devices``.
    """
    value = devices.strip()
    if value.startswith("sim:"):
        from flexai.node.sim import SimBackend

        backend = SimBackend(value.removeprefix("sim:"))
        return backend, backend.devices()
    names = backend_names()
    if value == "auto":
        tried = list(candidates) if candidates is not None else [create_backend(n) for n in AUTO_ORDER]
    elif value in names:
        tried = [create_backend(value)]
    else:
        allowed = ", ".join(["auto", *names, "sim:SPEC"])
        raise ValueError(f"devices={devices!r} is not allowed: use {allowed} (SPEC like {SIM_EXAMPLE})")

    reasons: list[str] = []
    for backend in tried:
        ok, why = backend.available()
        if not ok:
            reasons.append(f"{backend.name}: {why}")
            continue
        try:
            found = backend.devices()
        except DiscoveryError as exc:
            backend.close()
            reasons.append(f"{backend.name}: {exc}")
            continue
        if not found:
            backend.close()
            reasons.append(f"{backend.name}: the tool works but sees no devices")
            continue
        return backend, found
    raise NoDevicesError(
        f"no accelerator found: {'; '.join(reasons)}. "
        f"To run without one, fake devices with --devices sim:SPEC, e.g. --devices sim:{SIM_EXAMPLE}"
    )
