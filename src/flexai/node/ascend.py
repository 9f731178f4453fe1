"""Huawei Ascend NPUs through the ``npu-smi info`` table.

``npu-smi`` has no stable machine-readable output across driver versions, so this backend reads the table
it prints. The layout (CANN 23.x-25.x drivers, 910B and 310P cards)::

    | npu-smi 24.1.rc1                 Version: 24.1.rc1                                             |
    | NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
    | Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
    | 0     910B3               | OK            | 93.5        38                0    / 0             |
    | 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 65536         |
    ...
    | NPU   Chip                | Process id    | Process name             | Process memory(MB)      |
    | 0     0                   | 215487        | python3.10               | 55296                   |
    | No running processes found in NPU 1                                                            |

Each NPU row (id, name, health) is followed by one chip row per chip (bus id, AICore %, memory pairs
"used / total"). Cards with HBM (910 series) print the DDR pair, then the HBM pair, and the HBM pair is the
device memory; cards without HBM (310P) print one "Memory-Usage(MB)" pair. Cards with several chips per NPU
(310P Duo) print a "Chip Device" header and a logical device id per chip; that id is the device index.
Border lines (``+---``, ``+===``) and text outside the table are ignored. The parser is a pure function
so it is tested on recorded outputs; a row it cannot read raises ``NpuSmiParseError`` naming the line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexai.node.devices import (
    DeviceBackend,
    DeviceInfo,
    DiscoveryError,
    check_same_length,
    index_of,
    joined_visibility,
    one_line,
    register_backend,
)

HEALTHY_STATES = frozenset({"OK", "Warning"})
"""npu-smi health values a device still takes work in; "Alarm", "Critical" and anything else do not."""

_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_BUS_ID = re.compile(r"^(?:[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]|NA)$")


class NpuSmiParseError(DiscoveryError, ValueError):
    """``npu-smi info`` printed something this parser cannot read; the message names the line."""


@dataclass(frozen=True, slots=True)
class _NpuRow:
    line_no: int
    raw: str
    npu_id: int
    name: str
    health: str


@dataclass(frozen=True, slots=True)
class _Chip:
    line_no: int
    npu_id: int
    chip_id: int
    logical_id: int | None
    name: str
    health: str
    bus_id: str
    aicore_pct: float | None
    used_mib: int
    total_mib: int


@dataclass(frozen=True, slots=True)
class _Process:
    line_no: int
    npu_id: int
    chip_id: int
    pid: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class NpuSmiInfo:
    """What one ``npu-smi info`` output says: the devices and, per device index, pid -> MiB."""

    devices: list[DeviceInfo]
    process_memory_mib: dict[int, dict[int, int]]


def parse_npu_smi_info(text: str) -> list[DeviceInfo]:
    """Devices of an ``npu-smi info`` output (pure: no tool is run). Raises ``NpuSmiParseError``."""
    return parse_npu_smi(text).devices


def parse_npu_smi(text: str) -> NpuSmiInfo:
    """Devices and per-process memory of an ``npu-smi info`` output. Raises ``NpuSmiParseError``."""
    chips, processes = _read_rows(text)
    if not chips:
        return NpuSmiInfo([], {})
    indices = _device_indices(chips)
    devices = []
    by_chip: dict[tuple[int, int], int] = {}
    for chip, index in zip(chips, indices, strict=True):
        by_chip[(chip.npu_id, chip.chip_id)] = index
        healthy = chip.health in HEALTHY_STATES
        devices.append(
            DeviceInfo(
                vendor="ascend",
                index=index,
                uuid=_uuid(chip),
                model=chip.name if chip.name.startswith("Ascend") else f"Ascend{chip.name}",
                memory_mib=chip.total_mib,
                healthy=healthy,
                utilisation_pct=chip.aicore_pct,
                memory_used_mib=chip.used_mib,
                health_detail="" if healthy else f"npu-smi reports health {chip.health!r}",
            )
        )
    used: dict[int, dict[int, int]] = {index: {} for index in indices}
    for process in processes:
        index = by_chip.get((process.npu_id, process.chip_id))
        if index is None:
            raise NpuSmiParseError(
                f"npu-smi info line {process.line_no}: a process runs on NPU {process.npu_id} chip "
                f"{process.chip_id}, which the device table does not list"
            )
        per_pid = used[index]
        per_pid[process.pid] = per_pid.get(process.pid, 0) + process.memory_mib
    return NpuSmiInfo(devices, used)


def _read_rows(text: str) -> tuple[list[_Chip], list[_Process]]:
    section = ""  # "" before the device table, then "devices", then "processes"
    has_hbm = False
    has_device_column = False
    npu: _NpuRow | None = None  # the last NPU row
    npu_has_chip = False
    chips: list[_Chip] = []
    processes: list[_Process] = []

    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line.startswith("|"):
            continue  # borders, blank lines, banners
        cells = [c.strip() for c in line.strip("|").split("|")]
        first = cells[0].split()
        joined = " ".join(cells)
        if "NPU" in first and "Name" in first and "Health" in joined:
            section = "devices"
            continue
        if first[:1] == ["Chip"] and "Bus-Id" in joined:
            has_hbm = "HBM-Usage" in joined
            has_device_column = "Device" in first
            continue
        if "Process id" in joined:
            if npu is not None and not npu_has_chip:
                raise _error(npu.line_no, npu.raw, f"NPU {npu.npu_id} has no chip row after it")
            section = "processes"
            continue
        if joined.startswith("No running processes found") or joined.startswith("npu-smi"):
            continue
        if section == "devices":
            if len(first) >= 2 and not first[1].isdecimal():
                if npu is not None and not npu_has_chip:
                    raise _error(npu.line_no, npu.raw, f"NPU {npu.npu_id} has no chip row after it")
                npu = _npu_row(line_no, raw, cells, first)
                npu_has_chip = False
            else:
                if npu is None:
                    raise _error(line_no, raw, "a chip row comes before any NPU row")
                chips.append(_chip_row(line_no, raw, cells, first, npu, has_hbm, has_device_column))
                npu_has_chip = True
        elif section == "processes":
            processes.append(_process_row(line_no, raw, cells, first))

    if section == "":
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        got = repr(lines[0][:120]) if lines else "empty output"
        raise NpuSmiParseError(
            f"npu-smi info output has no device table (no header row with 'NPU', 'Name' and 'Health'); got {got}"
        )
    if npu is not None and not npu_has_chip:
        raise _error(npu.line_no, npu.raw, f"NPU {npu.npu_id} has no chip row after it (output cut short?)")
    return chips, processes


def _npu_row(line_no: int, raw: str, cells: list[str], first: list[str]) -> _NpuRow:
    if len(cells) < 3:
        raise _error(line_no, raw, "an NPU row needs 3 cells 'ID NAME | HEALTH | POWER TEMP ...'")
    if not first[0].isdecimal():
        raise _error(line_no, raw, f"NPU id {first[0]!r} is not a number")
    health = cells[1].split()
    if not health:
        raise _error(line_no, raw, "the NPU row has no health value")
    return _NpuRow(line_no, raw, int(first[0]), first[1], health[0])


def _chip_row(
    line_no: int,
    raw: str,
    cells: list[str],
    first: list[str],
    npu: _NpuRow,
    has_hbm: bool,
    has_device_column: bool,
) -> _Chip:
    npu_id = npu.npu_id
    if len(cells) < 3:
        raise _error(line_no, raw, f"the chip row of NPU {npu_id} needs 3 cells 'CHIP | BUS-ID | AICORE USED / TOTAL'")
    if not first or not all(token.isdecimal() for token in first):
        raise _error(line_no, raw, f"the chip row of NPU {npu_id} does not start with a chip number")
    bus_id = cells[1]
    if not _BUS_ID.match(bus_id):
        raise _error(line_no, raw, f"the chip row of NPU {npu_id} has {bus_id!r} where a PCI bus id belongs")
    pairs = _PAIR.findall(cells[2])
    wanted = 2 if has_hbm else 1
    if len(pairs) < wanted:
        columns = "Memory-Usage and HBM-Usage" if has_hbm else "Memory-Usage"
        raise _error(
            line_no,
            raw,
            f"the chip row of NPU {npu_id} has {len(pairs)} 'USED / TOTAL' pairs, expected {wanted} ({columns})",
        )
    used, total = (int(v) for v in pairs[-1])  # HBM where the card has it, else the only memory pair
    aicore_text = cells[2].split()[0]
    try:
        aicore: float | None = float(aicore_text)
    except ValueError:
        aicore = None  # "NA" or "-": the tool cannot tell
    if aicore is not None and not 0 <= aicore <= 100:
        aicore = None  # "nan" or out of range: not a percentage
    logical_id = int(first[1]) if has_device_column and len(first) >= 2 else None
    return _Chip(line_no, npu_id, int(first[0]), logical_id, npu.name, npu.health, bus_id, aicore, used, total)


def _process_row(line_no: int, raw: str, cells: list[str], first: list[str]) -> _Process:
    if len(cells) < 4:
        raise _error(line_no, raw, "a process row needs 4 cells 'NPU CHIP | PID | NAME | MEMORY(MB)'")
    if len(first) < 2 or not (first[0].isdecimal() and first[1].isdecimal()):
        raise _error(line_no, raw, "a process row does not start with 'NPU CHIP' numbers")
    pid, memory = cells[1], cells[3].split()[:1]
    if not pid.isdecimal():
        raise _error(line_no, raw, f"process id {pid!r} is not a number")
    if not memory or not memory[0].isdecimal():
        raise _error(line_no, raw, f"process memory {cells[3]!r} is not a number of MB")
    return _Process(line_no, int(first[0]), int(first[1]), int(pid), int(memory[0]))


def _device_indices(chips: list[_Chip]) -> list[int]:
    """The logical device id where npu-smi prints one, else the NPU id; by position when NPUs repeat.

    ASCEND_RT_VISIBLE_DEVICES counts logical devices; on a host with one chip per NPU that is the NPU id.
    """
    logical = [c.logical_id for c in chips if c.logical_id is not None]
    if len(logical) == len(chips):
        for n, chip in enumerate(chips):
            if chip.logical_id in logical[:n]:
                raise NpuSmiParseError(f"npu-smi info line {chip.line_no}: device id {chip.logical_id} appears twice")
        return logical
    indices = [c.npu_id for c in chips]
    if len(set(indices)) != len(indices):  # several chips per NPU and no logical id printed
        return list(range(len(chips)))
    return indices


def _uuid(chip: _Chip) -> str:
    """npu-smi info prints no serial; the PCI bus id (plus the chip) is stable and unique on the host."""
    if chip.bus_id != "NA":
        return f"ASCEND-{chip.bus_id}-{chip.chip_id}"
    return f"ASCEND-NPU{chip.npu_id}-{chip.chip_id}"


def _error(line_no: int, raw: str, what: str) -> NpuSmiParseError:
    return NpuSmiParseError(f"npu-smi info line {line_no}: {what}: {raw.strip()!r}")


class AscendBackend(DeviceBackend):
    """Runs ``npu-smi info`` (with a timeout) and reads its table; ``run`` replaces the tool in tests."""

    name = "ascend"
    visibility_variable = "ASCEND_RT_VISIBLE_DEVICES"

    def __init__(
        self,
        npu_smi: str = "npu-smi",
        *,
        run: Callable[[Sequence[str]], str] | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self._npu_smi = npu_smi
        self._run = run
        self._timeout_s = timeout_s

    def available(self) -> tuple[bool, str]:
        if self._run is not None or shutil.which(self._npu_smi):
            return True, ""
        return False, f"{self._npu_smi} not found on PATH"

    def _info(self) -> NpuSmiInfo:
        return parse_npu_smi(self._info_text())

    def _info_text(self) -> str:
        if self._run is not None:
            return self._run([self._npu_smi, "info"])
        path = shutil.which(self._npu_smi)
        if path is None:
            raise DiscoveryError(f"{self._npu_smi} not found on PATH")
        try:
            done = subprocess.run([path, "info"], capture_output=True, text=True, timeout=self._timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DiscoveryError(f"npu-smi info did not answer within {self._timeout_s:g} s") from exc
        except OSError as exc:
            raise DiscoveryError(f"npu-smi info could not run: {one_line(exc)}") from exc
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[:1]
            raise DiscoveryError(f"npu-smi info exited with code {done.returncode}: {said[0] if said else 'no output'}")
        return done.stdout

    def devices(self) -> list[DeviceInfo]:
        return self._info().devices

    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        index = index_of(device)
        info = self._info()
        if index not in info.process_memory_mib:
            known = ", ".join(str(d.index) for d in info.devices) or "none"
            raise DiscoveryError(f"ascend device {index} is not present (npu-smi lists {known})")
        return info.process_memory_mib[index]

    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        check_same_length(indices, uuids)
        return joined_visibility(self.visibility_variable, indices, "index")


register_backend("ascend", AscendBackend)
