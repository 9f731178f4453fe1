"""AMD GPUs through the ``amdsmi`` Python module (shipped with ROCm 6+; ``pip install amdsmi`` matches it).

``amdsmi`` is imported only when the backend is first asked, so flexai runs without it; the backend then
steps aside with the reason. Tests pass a fake module as ``amdsmi``. The device index is the position in
``amdsmi_get_processor_handles()``, which on a host with only AMD GPUs is the HIP enumeration order.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def short_model_name(market_name: str) -> str:
    """'AMD Instinct MI300X' -> 'MI300X', 'AMD Radeon RX 7900 XTX' -> 'Radeon-RX-7900-XTX'."""
    for prefix in ("AMD ", "Instinct "):
        market_name = market_name.removeprefix(prefix)
    return "-".join(market_name.split()) or "unknown"


def _number(value: object) -> float | None:
    """AMD SMI answers "N/A" (a string) where a metric does not apply."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


class AmdBackend(DeviceBackend):
    """Reads UUID, market name, VRAM, GFX activity and per-process VRAM of each GPU from AMD SMI."""

    name = "amd"
    visibility_variable = "HIP_VISIBLE_DEVICES"

    def __init__(self, amdsmi: ModuleType | Any | None = None) -> None:
        self._smi = amdsmi
        self._started = False
        self._why_not = ""

    def available(self) -> tuple[bool, str]:
        if self._started:
            return True, ""
        if self._why_not:
            return False, self._why_not
        if self._smi is None:
            try:
                import amdsmi
            except ImportError:
                self._why_not = "amdsmi is not installed (it ships with ROCm 6 or newer)"
                return False, self._why_not
            except Exception as exc:  # the module loads libamd_smi.so at import time
                self._why_not = f"amdsmi could not load: {one_line(exc)}"
                return False, self._why_not
            self._smi = amdsmi
        flag = getattr(getattr(self._smi, "AmdSmiInitFlags", None), "INIT_AMD_GPUS", None)
        try:
            if flag is None:
                self._smi.amdsmi_init()
            else:
                self._smi.amdsmi_init(flag)
        except Exception as exc:  # AmdSmiLibraryException and friends all mean "not here"
            self._why_not = f"AMD SMI could not start: {one_line(exc)}"
            return False, self._why_not
        self._started = True
        return True, ""

    def close(self) -> None:
        if self._started:
            self._started = False
            try:
                self._smi.amdsmi_shut_down()
            except Exception:  # shutting down a library that is already gone is not worth an error
                pass

    def _lib(self) -> Any:
        ok, why = self.available()
        if not ok:
            raise DiscoveryError(f"amd backend is not available: {why}")
        return self._smi

    def _error_type(self) -> type[BaseException]:
        return getattr(self._smi, "AmdSmiException", Exception)

    def _handles(self) -> list[Any]:
        smi = self._lib()
        try:
            return list(smi.amdsmi_get_processor_handles())
        except self._error_type() as exc:
            raise DiscoveryError(f"AMD SMI could not list GPUs: {one_line(exc)}") from exc

    def devices(self) -> list[DeviceInfo]:
        return [self._device(i, handle) for i, handle in enumerate(self._handles())]

    def _device(self, index: int, handle: Any) -> DeviceInfo:
        """One GPU; a failing query makes it unhealthy (with the reason) instead of failing discovery."""
        smi = self._smi
        uuid, model, memory_mib, used_mib, util = f"amd-index-{index}", "unknown", 0, None, None
        step = "amdsmi_get_gpu_device_uuid"
        try:
            uuid = str(smi.amdsmi_get_gpu_device_uuid(handle))
            step = "amdsmi_get_gpu_asic_info"
            model = short_model_name(str(smi.amdsmi_get_gpu_asic_info(handle).get("market_name", "")))
            step = "amdsmi_get_gpu_vram_usage"
            vram = smi.amdsmi_get_gpu_vram_usage(handle)  # both in MiB
            memory_mib, used_mib = int(vram["vram_total"]), int(vram["vram_used"])
        except (self._error_type(), KeyError, TypeError, ValueError) as exc:
            return DeviceInfo(
                "amd", index, uuid, model, memory_mib, False, util, used_mib, f"{step} failed: {one_line(exc)}"
            )
        try:
            util = _number(smi.amdsmi_get_gpu_activity(handle).get("gfx_activity"))
        except self._error_type():
            util = None  # not supported on some parts and partitions: unknown, not unhealthy
        return DeviceInfo("amd", index, uuid, model, memory_mib, True, util, used_mib)

    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        index = index_of(device)
        handles = self._handles()
        if not 0 <= index < len(handles):
            raise DiscoveryError(f"amd device {index} is not present (AMD SMI sees {len(handles)} GPUs)")
        smi, handle = self._smi, handles[index]
        try:
            listed = smi.amdsmi_get_gpu_process_list(handle)
            # ROCm >= 6.1 lists dicts; older releases list process handles to look up one by one.
            infos = [p if isinstance(p, dict) else smi.amdsmi_get_gpu_process_info(handle, p) for p in listed]
        except self._error_type() as exc:
            raise DiscoveryError(f"AMD SMI could not list processes of GPU {index}: {one_line(exc)}") from exc
        used: dict[int, int] = {}
        for info in infos:
            n_bytes = _number((info.get("memory_usage") or {}).get("vram_mem"))
            if n_bytes is None or "pid" not in info:
                continue
            pid = int(info["pid"])
            used[pid] = used.get(pid, 0) + -(-int(n_bytes) // MIB)
        return used

    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        check_same_length(indices, uuids)
        return joined_visibility(self.visibility_variable, indices, "index")


register_backend("amd", AmdBackend)
