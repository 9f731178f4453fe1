"""NVIDIA GPUs through NVML (the ``pynvml`` module of the ``nvidia-ml-py`` package, extra ``flexai[nvidia]``).

``pynvml`` is imported only when the backend is first asked, so flexai installs and runs without it; the
backend then steps aside with the reason. Tests pass a fake module as ``nvml``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from flexai.node.devices import (
    MIB,
    DeviceBackend,
    DeviceInfo,
    DiscoveryError,
    check_same_length,
    index_of,
    joined_visibility,
    one_line,
    register_backend,
)

_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED: the query does not apply to this device; not a fault
_NO_PERMISSION = 4  # NVML_ERROR_NO_PERMISSION: the tool cannot tell, the device may be fine
_NOT_FOUND = 6  # NVML_ERROR_NOT_FOUND: from nvmlDeviceGetProcessUtilization, no sample newer than the time asked
_SUCCESS = 0  # nvidia-ml-py raises NVMLError(NVML_SUCCESS) when the size query finds no sample at all
PROCESS_UTILISATION_WINDOW_S = 1.0
"""Per-process utilisation averages NVML's samples of this last stretch (about what ``nvmlDeviceGetUtilizationRates``
covers: its sample period is 1/6 s to 1 s)."""


def short_model_name(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'A100-SXM4-80GB', 'Tesla T4' -> 'T4', 'NVIDIA H100 80GB HBM3' -> 'H100-80GB-HBM3'."""
    for prefix in ("NVIDIA ", "Tesla "):
        name = name.removeprefix(prefix)
    return "-".join(name.split()) or "unknown"


def _text(value: str | bytes) -> str:
    """nvidia-ml-py before 11.5 returned bytes for names and UUIDs."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _ceil_mib(n_bytes: int) -> int:
    """Used memory rounds up: a quota check must not miss a partly used MiB."""
    return -(-int(n_bytes) // MIB)


class NvidiaBackend(DeviceBackend):
    """Reads UUID, name, memory, utilisation, per-process memory and per-process utilisation of each GPU from
    NVML."""

    name = "nvidia"
    visibility_variable = "CUDA_VISIBLE_DEVICES"

    def __init__(self, nvml: ModuleType | Any | None = None, clock: Callable[[], float] = time.time) -> None:
        self._nvml = nvml
        self._clock = clock
        """Wall-clock seconds (NVML's process samples carry CPU timestamps in microseconds since the epoch)."""
        self._started = False
        self._why_not = ""

    def available(self) -> tuple[bool, str]:
        if self._started:
            return True, ""
        if self._why_not:
            return False, self._why_not
        if self._nvml is None:
            try:
                import pynvml  # the nvidia-ml-py package
            except ImportError:
                self._why_not = "nvidia-ml-py is not installed (pip install 'flexai[nvidia]')"
                return False, self._why_not
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ... all mean "not here"
            self._why_not = f"NVML could not start: {one_line(exc)}"
            return False, self._why_not
        self._started = True
        return True, ""

    def close(self) -> None:
        if self._started:
            self._started = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a library that is already gone is not worth an error
                pass

    def _lib(self) -> Any:
        ok, why = self.available()
        if not ok:
            raise DiscoveryError(f"nvidia backend is not available: {why}")
        return self._nvml

    def devices(self) -> list[DeviceInfo]:
        nvml = self._lib()
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise DiscoveryError(f"NVML could not count devices: {one_line(exc)}") from exc
        return [self._device(nvml, i) for i in range(count)]

    def _device(self, nvml: Any, index: int) -> DeviceInfo:
        """One GPU; a failing query makes it unhealthy (with the reason) instead of failing discovery."""
        uuid, model, memory_mib, used_mib, util = f"nvidia-index-{index}", "unknown", 0, None, None
        step = "nvmlDeviceGetHandleByIndex"
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            step = "nvmlDeviceGetUUID"
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            step = "nvmlDeviceGetName"
            model = short_model_name(_text(nvml.nvmlDeviceGetName(handle)))
            step = "nvmlDeviceGetMemoryInfo"
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            memory_mib, used_mib = int(memory.total) // MIB, _ceil_mib(memory.used)
            step = "nvmlDeviceGetUtilizationRates"
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError as exc:
                if _code(exc) not in (_NOT_SUPPORTED, _NO_PERMISSION):
                    raise
        except nvml.NVMLError as exc:
            return DeviceInfo(
                "nvidia", index, uuid, model, memory_mib, False, util, used_mib, f"{step} failed: {one_line(exc)}"
            )
        return DeviceInfo("nvidia", index, uuid, model, memory_mib, True, util, used_mib)

    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        nvml = self._lib()
        index = index_of(device)
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError as exc:
            if _code(exc) in (_NOT_SUPPORTED, _NO_PERMISSION):
                return {}
            raise DiscoveryError(f"NVML could not list processes of GPU {index}: {one_line(exc)}") from exc
        used: dict[int, int] = {}
        for process in processes:
            n_bytes = getattr(process, "usedGpuMemory", None)
            if n_bytes is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. Windows WDDM, some containers)
                continue
            used[int(process.pid)] = used.get(int(process.pid), 0) + _ceil_mib(n_bytes)
        return used

    def process_utilisation_pct(
        self, device: int | DeviceInfo, window_s: float = PROCESS_UTILISATION_WINDOW_S
    ) -> dict[int, float] | None:
        """How busy each process keeps one GPU now (pid -> percent of the SMs, its latest NVML sample of the last
        ``window_s``), from ``nvmlDeviceGetProcessUtilization``; a process without a sample there is idle (left
        out). None where the device cannot tell (not supported, no permission, an nvidia-ml-py without the call).

        The pool subtracts its time-sharing guests' figures from the device's utilisation, so that a guest's own
        load does not count as its owners' busy time."""
        nvml = self._lib()
        index = index_of(device)
        since_us = max(0, int((self._clock() - window_s) * 1_000_000))
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            read = nvml.nvmlDeviceGetProcessUtilization
        except AttributeError:
            return None
        except nvml.NVMLError as exc:
            raise DiscoveryError(f"NVML could not find GPU {index}: {one_line(exc)}") from exc
        try:
            samples = read(handle, since_us)
        except nvml.NVMLError as exc:
            code = _code(exc)
            if code in (_NOT_FOUND, _SUCCESS):
                return {}  # no process used the GPU in the window
            if code in (_NOT_SUPPORTED, _NO_PERMISSION):
                return None
            raise DiscoveryError(
                f"NVML could not read per-process utilisation of GPU {index}: {one_line(exc)}"
            ) from exc
        latest: dict[int, tuple[int, float]] = {}
        for sample in samples or ():
            stamp = int(getattr(sample, "timeStamp", 0) or 0)
            sm = getattr(sample, "smUtil", None)
            if stamp <= since_us or sm is None or not 0 <= int(sm) <= 100:
                continue  # older than asked, or unsupported (read as 0xFFFFFFFF on some drivers)
            pid = int(sample.pid)
            if pid not in latest or stamp >= latest[pid][0]:
                latest[pid] = (stamp, float(sm))
        return {pid: pct for pid, (_, pct) in latest.items()}

    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        """UUIDs, not indices: CUDA orders devices fastest-first, NVML by PCI bus, so indices can disagree."""
        check_same_length(indices, uuids)
        return joined_visibility(self.visibility_variable, uuids, "uuid")


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


register_backend("nvidia", NvidiaBackend)
