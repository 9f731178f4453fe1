"""Simulated devices, so the pool, the agent and their tests run on machines without accelerators.

A SPEC lists groups ``COUNTxMODEL-MEMORY`` separated by commas, e.g. ``2xA100-80GB,1xAscend910B-64GB``
(1 GB = 1024 MiB). Devices are numbered in SPEC order; UUIDs are ``SIM-<model>-<index>``, so they are the
same on every run. Per-process memory comes from the JSON file named by ``FLEXAI_SIM_MEMORY_FILE`` (read
on every call, so a test can change it between calls), in one of two forms::

    {"4242": 1024}                      pid -> MiB, on every simulated device
    {"0": {"4242": 1024}, "1": {}}      device index -> (pid -> MiB)

A sim device cannot tell how busy it is (``utilisation_pct`` None), unless ``FLEXAI_SIM_UTILISATION_FILE``
names a JSON file that scripts it (read on every call, so a test flips it between calls; devices it leaves out
still cannot tell), in one of two forms per device::

    {"0": 75}                                               device index -> percent busy
    {"0": {"utilisation_pct": 5, "memory_used_mib": 60000}} ... and the memory in use on it

``memory_used_mib`` is the device's whole memory in use (what NVML calls *used*: every process, the pool's jobs
included); it replaces the sum of the memory file's processes for that device, whose per-process figures stay
what ``process_memory_mib`` answers. Either key may be left out. The pool's time-sharing tests script an owner's
busy and idle periods and its memory growth with it. A third key scripts how busy each process keeps the device
(what ``process_utilisation_pct`` answers, as NVML's per-process utilisation does; a device without it cannot
tell)::

    {"0": {"utilisation_pct": 60, "process_utilisation_pct": {"4242": 55}}}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from flexai.node.devices import (
    SIM_EXAMPLE,
    DeviceBackend,
    DeviceInfo,
    DiscoveryError,
    check_same_length,
    index_of,
    joined_visibility,
    one_line,
)

MEMORY_FILE_ENV = "FLEXAI_SIM_MEMORY_FILE"
UTILISATION_FILE_ENV = "FLEXAI_SIM_UTILISATION_FILE"
MAX_SIM_DEVICES = 1024
"""More fake devices than any real node has; a larger SPEC is a typo."""

_GROUP = re.compile(r"(?P<count>[0-9]+)x(?P<model>[A-Za-z0-9][A-Za-z0-9._-]*)-(?P<gib>[0-9]+)GB")


def parse_devices_spec(spec: str) -> list[tuple[str, int]]:
    """``'2xA100-80GB,1xT4-16GB'`` -> ``[('A100', 81920), ('A100', 81920), ('T4', 16384)]`` (model, MiB).

    Raises ``ValueError`` with one line naming the value and the allowed form.
    """
    form = f"use COUNTxMODEL-MEMORY like {SIM_EXAMPLE}"
    devices: list[tuple[str, int]] = []
    groups = [g.strip() for g in spec.split(",")]
    for group in groups:
        match = _GROUP.fullmatch(group)
        if match is None or int(match["count"]) < 1 or int(match["gib"]) < 1:
            part = "" if group == spec.strip() else f" (part {group!r})"
            raise ValueError(f"devices spec {spec!r} is not allowed{part}: {form}")
        count = int(match["count"])
        if len(devices) + count > MAX_SIM_DEVICES:
            raise ValueError(f"devices spec {spec!r} is not allowed: at most {MAX_SIM_DEVICES} devices in all")
        devices.extend([(match["model"], int(match["gib"]) * 1024)] * count)
    return devices


class SimBackend(DeviceBackend):
    """Fake devices from a SPEC: always available, healthy, idle except for the memory file's processes."""

    name = "sim"
    visibility_variable = "FLEXAI_SIM_VISIBLE_DEVICES"

    def __init__(self, spec: str, *, memory_file: str | os.PathLike[str] | None = None) -> None:
        self.spec = spec
        self._devices = parse_devices_spec(spec)
        self._memory_file = memory_file

    def available(self) -> tuple[bool, str]:
        return True, ""

    def devices(self) -> list[DeviceInfo]:
        usage = self._usage()
        busy, used, _ = self._utilisation()
        return [
            DeviceInfo(
                vendor="sim",
                index=i,
                uuid=f"SIM-{model}-{i}",
                model=model,
                memory_mib=memory_mib,
                healthy=True,
                utilisation_pct=busy.get(i),  # None (cannot tell) unless the utilisation file says
                memory_used_mib=used.get(i, sum(usage.get(i, {}).values())),
            )
            for i, (model, memory_mib) in enumerate(self._devices)
        ]

    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        index = index_of(device)
        if not 0 <= index < len(self._devices):
            raise DiscoveryError(f"sim device {index} is not present (spec {self.spec!r} has {len(self._devices)})")
        return dict(self._usage().get(index, {}))

    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        check_same_length(indices, uuids)
        return joined_visibility(self.visibility_variable, indices, "index")

    def process_utilisation_pct(self, device: int | DeviceInfo) -> dict[int, float] | None:
        """pid -> percent busy on one device, as the utilisation file scripts it; None (cannot tell) where it does
        not."""
        index = index_of(device)
        if not 0 <= index < len(self._devices):
            raise DiscoveryError(f"sim device {index} is not present (spec {self.spec!r} has {len(self._devices)})")
        found = self._utilisation()[2].get(index)
        return None if found is None else dict(found)

    def _utilisation(self) -> tuple[dict[int, float], dict[int, int], dict[int, dict[int, float]]]:
        """(device index -> percent, device index -> MiB in use, device index -> pid -> percent) from the
        utilisation file; empty when none is named."""
        named = os.environ.get(UTILISATION_FILE_ENV, "")
        if not named:
            return {}, {}, {}
        where = f"{UTILISATION_FILE_ENV}={named!r}"
        form = (
            'use {"DEVICE_INDEX": PERCENT} or {"DEVICE_INDEX": {"utilisation_pct": PERCENT, "memory_used_mib": MiB,'
            ' "process_utilisation_pct": {"PID": PERCENT}}} with PERCENT in 0..100'
        )
        try:
            with open(named, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, ValueError) as exc:
            raise DiscoveryError(f"{where} cannot be read: {one_line(exc)}") from exc
        if not isinstance(data, dict):
            raise DiscoveryError(f"{where} holds {type(data).__name__}, not an object: {form}")
        busy: dict[int, float] = {}
        used: dict[int, int] = {}
        processes: dict[int, dict[int, float]] = {}
        for key, value in data.items():
            index = _key(key, where, form, "device index")
            if isinstance(value, dict):
                unknown = sorted(set(value) - {"utilisation_pct", "memory_used_mib", "process_utilisation_pct"})
                if unknown:
                    raise DiscoveryError(f"{where}: device {key} has unknown key {unknown[0]!r}: {form}")
                memory = value.get("memory_used_mib")
                if memory is not None:
                    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
                        raise DiscoveryError(
                            f"{where}: device {key} uses {memory!r} MiB, not a whole number >= 0: {form}"
                        )
                    used[index] = memory
                scripted = value.get("process_utilisation_pct")
                if scripted is not None:
                    if not isinstance(scripted, dict):
                        raise DiscoveryError(f"{where}: device {key} process_utilisation_pct is not an object: {form}")
                    processes[index] = {}
                    for pid, pct in scripted.items():
                        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
                            raise DiscoveryError(f"{where}: device {key} pid {pid} is {pct!r} busy: {form}")
                        processes[index][_key(pid, where, form, "pid")] = float(pct)
                value = value.get("utilisation_pct")
                if value is None:
                    continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                raise DiscoveryError(f"{where}: device {key} is {value!r} busy: {form}")
            busy[index] = float(value)
        return busy, used, processes

    def _usage(self) -> dict[int, dict[int, int]]:
        """Device index -> pid -> MiB from the memory file; {} when no file is named."""
        named = self._memory_file if self._memory_file is not None else os.environ.get(MEMORY_FILE_ENV, "")
        if not named:
            return {}
        where = f"{MEMORY_FILE_ENV}={os.fspath(named)!r}"
        try:
            with open(named, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, ValueError) as exc:
            raise DiscoveryError(f"{where} cannot be read: {one_line(exc)}") from exc
        form = 'use {"PID": MiB} or {"DEVICE_INDEX": {"PID": MiB}}'
        if not isinstance(data, dict):
            raise DiscoveryError(f"{where} holds {type(data).__name__}, not an object: {form}")
        if all(isinstance(v, dict) for v in data.values()) and data:
            per_device = {_key(k, where, form, "device index"): _pids(v, where, form) for k, v in data.items()}
            for index in per_device:
                if index >= len(self._devices):
                    count = len(self._devices)
                    raise DiscoveryError(f"{where} names device {index}, but spec {self.spec!r} has {count}")
            return per_device
        flat = _pids(data, where, form)
        return {i: dict(flat) for i in range(len(self._devices))}


def _key(text: str, where: str, form: str, what: str) -> int:
    if not text.isdecimal():
        raise DiscoveryError(f"{where}: {what} {text!r} is not a number: {form}")
    return int(text)


def _pids(data: object, where: str, form: str) -> dict[int, int]:
    if not isinstance(data, dict):
        raise DiscoveryError(f"{where}: {data!r} is not a pid -> MiB object: {form}")
    pids: dict[int, int] = {}
    for key, value in data.items():
        pid = _key(key, where, form, "pid")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DiscoveryError(f"{where}: pid {key} uses {value!r}, not a whole number of MiB >= 0: {form}")
        pids[pid] = value
    return pids
