"""Device discovery: every vendor backend answers in the same terms, without the vendor's hardware.

NVIDIA and AMD are driven through small fake ``pynvml`` / ``amdsmi`` modules, Ascend through recorded
``npu-smi info`` outputs in ``tests/data/node/``, and ``sim`` through its SPEC and memory file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flexai.node import (
    AmdBackend,
    AscendBackend,
    DeviceInfo,
    DiscoveryError,
    NoDevicesError,
    NpuSmiParseError,
    NvidiaBackend,
    SimBackend,
    backend_names,
    discover,
    parse_devices_spec,
    parse_npu_smi,
    parse_npu_smi_info,
)

DATA = Path(__file__).parent / "data" / "node"
GIB = 1024**3
MIB = 1024**2


def recorded(name: str) -> str:
    return (DATA / name).read_text()


# -- NVIDIA: a fake pynvml ------------------------------------------------------------------------------------

NVML_NOT_SUPPORTED, NVML_DRIVER_NOT_LOADED, NVML_GPU_IS_LOST = 3, 9, 15


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code as ``value``."""

    MESSAGES = {NVML_NOT_SUPPORTED: "Not Supported", NVML_DRIVER_NOT_LOADED: "Driver Not Loaded", 15: "GPU is lost"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.MESSAGES.get(self.value, f"Unknown Error {self.value}")


@dataclass
class FakeGpu:
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    name: str = "NVIDIA A100-SXM4-80GB"
    total_bytes: int = 80 * GIB
    used_bytes: int = 1 * GIB
    util_pct: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes or None)
    fail: dict[str, int] = field(default_factory=dict)  # NVML function name -> error code it raises


@dataclass
class Memory:
    total: int
    used: int


@dataclass
class Utilization:
    gpu: int


@dataclass
class Process:
    pid: int
    usedGpuMemory: int | None  # noqa: N815  (pynvml's spelling)


class FakeNVML:
    """Just enough of pynvml; a handle is the device index."""

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_NOT_SUPPORTED

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802  (pynvml's names)
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        if not 0 <= handle < len(self.gpus):
            raise FakeNVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        gpu = self.gpus[handle]
        if call in gpu.fail:
            raise FakeNVMLError(gpu.fail[call])
        return gpu

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802  (old nvidia-ml-py returned bytes)
        return self._gpu(handle, "nvmlDeviceGetName").name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Memory:  # noqa: N802
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return Memory(gpu.total_bytes, gpu.used_bytes)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Utilization:  # noqa: N802
        return Utilization(self._gpu(handle, "nvmlDeviceGetUtilizationRates").util_pct)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Process]:  # noqa: N802
        return [Process(pid, used) for pid, used in self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses").processes]


A100 = FakeGpu("GPU-a100-0", "NVIDIA A100-SXM4-80GB", 80 * GIB, 10 * GIB + 1, 37)
H100 = FakeGpu("GPU-h100-1", "NVIDIA H100 80GB HBM3", 80 * GIB, 0, 0)
T4 = FakeGpu("GPU-t4-2", "Tesla T4", 15 * GIB, 0, 0)
LOST = FakeGpu("GPU-lost-3", "NVIDIA A100-SXM4-80GB", fail={"nvmlDeviceGetMemoryInfo": NVML_GPU_IS_LOST})
GONE = FakeGpu(fail={"nvmlDeviceGetHandleByIndex": NVML_GPU_IS_LOST})
NO_UTIL = FakeGpu("GPU-mig-5", "NVIDIA A30", 24 * GIB, 0, 0, fail={"nvmlDeviceGetUtilizationRates": NVML_NOT_SUPPORTED})


def seen(
    vendor: str, uuid: str, model: str, memory_mib: int, util: float | None, used: int | None, why: str = ""
) -> DeviceInfo:
    """The DeviceInfo of device 0 as a row of a table: healthy unless ``why`` says what failed."""
    return DeviceInfo(vendor, 0, uuid, model, memory_mib, not why, util, used, why)  # type: ignore[arg-type]


LOST_WHY = "nvmlDeviceGetMemoryInfo failed: GPU is lost"
GONE_WHY = "nvmlDeviceGetHandleByIndex failed: GPU is lost"
# (fake GPU, expected DeviceInfo at index 0)
NVIDIA_DEVICES = [
    (A100, seen("nvidia", "GPU-a100-0", "A100-SXM4-80GB", 81920, 37.0, 10241)),
    (H100, seen("nvidia", "GPU-h100-1", "H100-80GB-HBM3", 81920, 0.0, 0)),
    (T4, seen("nvidia", "GPU-t4-2", "T4", 15360, 0.0, 0)),
    # A query that raises marks the device unhealthy with the reason; what was read before it stays.
    (LOST, seen("nvidia", "GPU-lost-3", "A100-SXM4-80GB", 0, None, None, LOST_WHY)),
    (GONE, seen("nvidia", "nvidia-index-0", "unknown", 0, None, None, GONE_WHY)),
    # "Not supported" (MIG, some boards) is unknown, not a fault.
    (NO_UTIL, seen("nvidia", "GPU-mig-5", "A30", 24576, None, 0)),
]


@pytest.mark.parametrize(("gpu", "expected"), NVIDIA_DEVICES, ids=lambda v: getattr(v, "uuid", ""))
def test_nvidia_reads_each_device(gpu: FakeGpu, expected: DeviceInfo) -> None:
    backend = NvidiaBackend(nvml=FakeNVML([gpu]))
    assert backend.available() == (True, "")
    assert backend.devices() == [expected]


def test_nvidia_one_failing_device_does_not_hide_the_others() -> None:
    backend = NvidiaBackend(nvml=FakeNVML([A100, LOST, T4]))
    found = backend.devices()
    assert [(d.index, d.healthy) for d in found] == [(0, True), (1, False), (2, True)]


def test_nvidia_process_memory_in_mib() -> None:
    gpu = FakeGpu(processes=[(101, 2 * GIB), (102, MIB + 1), (103, None), (101, 512 * MIB)])
    backend = NvidiaBackend(nvml=FakeNVML([gpu]))
    # Rounded up to whole MiB; a process NVML cannot measure is left out; a pid listed twice is summed.
    assert backend.process_memory_mib(0) == {101: 2560, 102: 2}
    assert backend.process_memory_mib(backend.devices()[0]) == {101: 2560, 102: 2}


def test_nvidia_process_memory_unknown_or_failing() -> None:
    unsupported = FakeGpu(fail={"nvmlDeviceGetComputeRunningProcesses": NVML_NOT_SUPPORTED})
    lost = FakeGpu(fail={"nvmlDeviceGetComputeRunningProcesses": NVML_GPU_IS_LOST})
    backend = NvidiaBackend(nvml=FakeNVML([unsupported, lost]))
    assert backend.process_memory_mib(0) == {}
    with pytest.raises(DiscoveryError, match="processes of GPU 1: GPU is lost"):
        backend.process_memory_mib(1)


def test_nvidia_steps_aside_when_nvml_cannot_start() -> None:
    backend = NvidiaBackend(nvml=FakeNVML([A100], init_error=NVML_DRIVER_NOT_LOADED))
    assert backend.available() == (False, "NVML could not start: Driver Not Loaded")
    with pytest.raises(DiscoveryError, match="Driver Not Loaded"):
        backend.devices()


def test_nvidia_steps_aside_when_nvidia_ml_py_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    ok, why = NvidiaBackend().available()
    assert not ok and why.startswith("nvidia-ml-py is not installed")


def test_nvidia_starts_nvml_once_and_shuts_it_down_on_close() -> None:
    nvml = FakeNVML([A100])
    with NvidiaBackend(nvml=nvml) as backend:
        backend.available()
        backend.devices()
        backend.process_memory_mib(0)
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


# -- Ascend: recorded npu-smi info outputs --------------------------------------------------------------------


def test_ascend_910b_x8() -> None:
    found = parse_npu_smi_info(recorded("npu_smi_info_910b_x8.txt"))
    assert [d.index for d in found] == list(range(8))
    assert {(d.vendor, d.model, d.memory_mib, d.healthy) for d in found} == {("ascend", "Ascend910B3", 65536, True)}
    # The HBM pair is the device memory (the DDR pair "0 / 0" before it is not); AICore % is the utilisation.
    assert [d.memory_used_mib for d in found] == [59481, 58454, 58456, 58453, 3161, 3159, 3162, 3160]
    assert [d.utilisation_pct for d in found] == [37.0, 41.0, 39.0, 36.0, 0.0, 0.0, 0.0, 0.0]
    assert found[0].uuid == "ASCEND-0000:C1:00.0-0" and len({d.uuid for d in found}) == 8


def test_ascend_910b_x8_processes() -> None:
    used = parse_npu_smi(recorded("npu_smi_info_910b_x8.txt")).process_memory_mib
    assert used[0] == {215487: 55296, 216012: 1024}
    assert used[3] == {215490: 55296}
    assert used[4] == used[7] == {}


def test_ascend_310p_x2_without_hbm() -> None:
    info = parse_npu_smi(recorded("npu_smi_info_310p_x2.txt"))
    assert [(d.index, d.model, d.memory_mib, d.memory_used_mib, d.utilisation_pct) for d in info.devices] == [
        (0, "Ascend310P3", 21534, 1074, 0.0),
        (1, "Ascend310P3", 21534, 13362, 23.0),
    ]
    assert info.process_memory_mib == {0: {}, 1: {48213: 12288}}


DUO_310P = """\
| npu-smi 24.1.0.1                                 Version: 24.1.0.1                                     |
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
| 1       310P3                 | OK              | NA           62                7210  / 7210          |
| 0       0                     | 0000:01:00.0    | 0            16302/ 44280                            |
| 1       310P3                 | OK              | NA           62                7210  / 7210          |
| 1       1                     | 0000:01:00.0    | NA           15543/ 43693                            |
| NPU     Chip                  | Process id      | Process name             | Process memory(MB)        |
| 1       1                     | 3277565         | mindie_llm_back          | 14513                     |
"""


def test_ascend_duo_card_each_chip_is_a_device_numbered_by_its_device_column() -> None:
    info = parse_npu_smi(DUO_310P)
    assert [(d.index, d.uuid, d.memory_mib, d.utilisation_pct) for d in info.devices] == [
        (0, "ASCEND-0000:01:00.0-0", 44280, 0.0),
        (1, "ASCEND-0000:01:00.0-1", 43693, None),
    ]
    assert info.process_memory_mib == {0: {}, 1: {3277565: 14513}}


A3_TWO_CHIPS_PER_NPU = """\
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
| 0     Ascend910           | OK            | 162.8       37                0    / 0             |
| 0     0                   | 0000:9C:00.0  | 0           0    / 0          3133 / 65536         |
| 0     Ascend910           | OK            | -           37                0    / 0             |
| 1     1                   | 0000:9E:00.0  | 0           0    / 0          2876 / 65536         |
| 1     Ascend910           | OK            | 167.1       38                0    / 0             |
| 0     2                   | 0000:37:00.0  | 0           0    / 0          3116 / 65536         |
"""


def test_ascend_several_chips_per_npu_without_device_column_are_numbered_in_order() -> None:
    found = parse_npu_smi_info(A3_TWO_CHIPS_PER_NPU)
    assert [(d.index, d.uuid, d.model, d.memory_used_mib) for d in found] == [
        (0, "ASCEND-0000:9C:00.0-0", "Ascend910", 3133),
        (1, "ASCEND-0000:9E:00.0-1", "Ascend910", 2876),
        (2, "ASCEND-0000:37:00.0-0", "Ascend910", 3116),
    ]


def with_health(health: str) -> str:
    return recorded("npu_smi_info_910b_x8.txt").replace("| OK      ", f"| {health:<8}", 1)


@pytest.mark.parametrize(
    ("health", "healthy"), [("OK", True), ("Warning", True), ("Alarm", False), ("Critical", False), ("NA", False)]
)
def test_ascend_health(health: str, healthy: bool) -> None:
    first = parse_npu_smi_info(with_health(health))[0]
    assert first.healthy is healthy
    assert first.health_detail == ("" if healthy else f"npu-smi reports health {health!r}")


HEADER = """\
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
"""
NPU0 = "| 0     910B3               | OK            | 93.5        38                0    / 0             |\n"
CHIP0 = "| 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 65536         |\n"
PROCESS_HEADER = "| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |\n"

# (what npu-smi printed, what the error must say: a regex)
MALFORMED = [
    ("", "no device table .*got empty output"),
    ("dcmi module initialize failed. ret is -8005\n", "no device table .*'dcmi module initialize failed"),
    (HEADER + NPU0.replace("| 0 ", "| x ", 1) + CHIP0, "line 3: NPU id 'x' is not a number"),
    (HEADER + NPU0 + NPU0.replace("| 0 ", "| 1 ", 1) + CHIP0, "line 3: NPU 0 has no chip row after it"),
    (HEADER + NPU0, "line 3: NPU 0 has no chip row after it \\(output cut short\\?\\)"),
    (HEADER + CHIP0, "line 3: a chip row comes before any NPU row"),
    (HEADER + NPU0 + CHIP0.replace("0000:C1:00.0", "C1:00.0     "), "'C1:00.0' where a PCI bus id belongs"),
    (HEADER + NPU0 + CHIP0.replace("3161 / 65536", "3161         "), "1 'USED / TOTAL' pairs, expected 2"),
    (HEADER + "| 0     910B3               | OK |\n" + CHIP0, "line 3: an NPU row needs 3 cells"),
    (HEADER + NPU0 + "| 0 | 0000:C1:00.0 |\n", "line 4: the chip row of NPU 0 needs 3 cells"),
    (HEADER + NPU0 + CHIP0 + PROCESS_HEADER + "| 0 0 | 4242 | python3 | lots |\n", "process memory 'lots' is not"),
    (HEADER + NPU0 + CHIP0 + PROCESS_HEADER + "| 0 0 | pid | python3 | 10 |\n", "process id 'pid' is not a number"),
    (HEADER + NPU0 + CHIP0 + PROCESS_HEADER + "| 9 0 | 4242 | python3 | 10 |\n", "NPU 9 chip 0, which the device"),
    (HEADER + NPU0 + CHIP0 + PROCESS_HEADER + "| 0 | 4242 |\n", "line 6: a process row needs 4 cells"),
    (DUO_310P.replace("| 1       1        ", "| 1       0        ", 1), "line 7: device id 0 appears twice"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_ascend_malformed_output_names_what_could_not_be_parsed(text: str, message: str) -> None:
    with pytest.raises(NpuSmiParseError, match=message):
        parse_npu_smi_info(text)


def test_ascend_truncated_recording() -> None:
    with pytest.raises(NpuSmiParseError) as caught:
        parse_npu_smi_info(recorded("npu_smi_info_910b_truncated.txt"))
    assert str(caught.value).startswith(
        "npu-smi info line 14: the chip row of NPU 2 has 1 'USED / TOTAL' pairs, expected 2 (Memory-Usage and "
        "HBM-Usage): '| 0 "
    )
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, DiscoveryError)


@pytest.mark.parametrize("name", ["npu_smi_info_910b_x8.txt", "npu_smi_info_310p_x2.txt"])
def test_ascend_output_cut_anywhere_parses_or_names_the_problem(name: str) -> None:
    """Whatever prefix of the output arrives, the parser answers devices or an NpuSmiParseError, never crashes."""
    text = recorded(name)
    for end in range(len(text) + 1):
        try:
            parse_npu_smi(text[:end])
        except NpuSmiParseError:
            pass


def test_ascend_header_without_npus_is_no_devices() -> None:
    assert parse_npu_smi_info(HEADER) == []


def fake_npu_smi(tmp_path: Path, body: str) -> str:
    """A stand-in ``npu-smi`` executable; returns the PATH that finds it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "npu-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def test_ascend_backend_runs_the_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = DATA / "npu_smi_info_310p_x2.txt"
    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, f'[ "$1" = info ] || exit 2\ncat "{recording}"'))
    backend = AscendBackend()
    assert backend.available() == (True, "")
    assert [d.index for d in backend.devices()] == [0, 1]
    assert backend.process_memory_mib(1) == {48213: 12288}
    with pytest.raises(DiscoveryError, match="ascend device 5 is not present \\(npu-smi lists 0, 1\\)"):
        backend.process_memory_mib(5)


def test_ascend_backend_reports_a_failing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = 'echo "dcmi module initialize failed. ret is -8005" >&2\nexit 1'
    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, body))
    with pytest.raises(DiscoveryError, match="^npu-smi info exited with code 1: dcmi module initialize failed"):
        AscendBackend().devices()


def test_ascend_backend_gives_up_after_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hung(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert kwargs["timeout"] == 2.5
        raise subprocess.TimeoutExpired(list(args), 2.5)

    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, "exit 0"))
    monkeypatch.setattr("flexai.node.ascend.subprocess.run", hung)
    with pytest.raises(DiscoveryError, match="did not answer within 2.5 s"):
        AscendBackend(timeout_s=2.5).devices()


def test_ascend_steps_aside_without_npu_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert AscendBackend().available() == (False, "npu-smi not found on PATH")


# -- AMD: a fake amdsmi ---------------------------------------------------------------------------------------


class FakeAmdSmiException(Exception):
    pass


@dataclass
class FakeAmdGpu:
    uuid: str = "amd-uuid-0"
    market_name: str = "AMD Instinct MI300X"
    vram_total_mib: int = 196592
    vram_used_mib: int = 283
    activity: object = 0  # a number, or "N/A" as AMD SMI answers
    processes: list[dict] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)  # amdsmi function names that raise


class FakeAmdSmi:
    """Just enough of amdsmi; a handle is the device index. ``legacy`` lists process handles (ROCm < 6.1)."""

    AmdSmiException = FakeAmdSmiException

    def __init__(self, gpus: list[FakeAmdGpu], init_error: str = "", legacy: bool = False) -> None:
        self.gpus, self.init_error, self.legacy = gpus, init_error, legacy
        self.inits = self.shutdowns = 0

    def _gpu(self, handle: int, call: str) -> FakeAmdGpu:
        if call in self.gpus[handle].fail:
            raise FakeAmdSmiException(f"{call}: AMDSMI_STATUS_NOT_SUPPORTED")
        return self.gpus[handle]

    def amdsmi_init(self) -> None:
        if self.init_error:
            raise FakeAmdSmiException(self.init_error)
        self.inits += 1

    def amdsmi_shut_down(self) -> None:
        self.shutdowns += 1

    def amdsmi_get_processor_handles(self) -> list[int]:
        return list(range(len(self.gpus)))

    def amdsmi_get_gpu_device_uuid(self, handle: int) -> str:
        return self._gpu(handle, "amdsmi_get_gpu_device_uuid").uuid

    def amdsmi_get_gpu_asic_info(self, handle: int) -> dict:
        return {"market_name": self._gpu(handle, "amdsmi_get_gpu_asic_info").market_name, "device_id": "0x74a1"}

    def amdsmi_get_gpu_vram_usage(self, handle: int) -> dict:
        gpu = self._gpu(handle, "amdsmi_get_gpu_vram_usage")
        return {"vram_total": gpu.vram_total_mib, "vram_used": gpu.vram_used_mib}

    def amdsmi_get_gpu_activity(self, handle: int) -> dict:
        return {"gfx_activity": self._gpu(handle, "amdsmi_get_gpu_activity").activity, "umc_activity": 0}

    def amdsmi_get_gpu_process_list(self, handle: int) -> list:
        processes = self._gpu(handle, "amdsmi_get_gpu_process_list").processes
        return list(range(len(processes))) if self.legacy else processes

    def amdsmi_get_gpu_process_info(self, handle: int, process: int) -> dict:
        return self.gpus[handle].processes[process]


MI300X = FakeAmdGpu("amd-uuid-0", "AMD Instinct MI300X", 196592, 283, 12)
RADEON = FakeAmdGpu("amd-uuid-1", "AMD Radeon RX 7900 XTX", 24560, 0, "N/A")
NO_VRAM = FakeAmdGpu("amd-uuid-2", fail={"amdsmi_get_gpu_vram_usage"})
NO_ACTIVITY = FakeAmdGpu("amd-uuid-3", activity=5, fail={"amdsmi_get_gpu_activity"})

NOT_SUPPORTED = "amdsmi_get_gpu_vram_usage failed: amdsmi_get_gpu_vram_usage: AMDSMI_STATUS_NOT_SUPPORTED"
AMD_DEVICES = [
    (MI300X, seen("amd", "amd-uuid-0", "MI300X", 196592, 12.0, 283)),
    (RADEON, seen("amd", "amd-uuid-1", "Radeon-RX-7900-XTX", 24560, None, 0)),  # activity "N/A": unknown
    (NO_VRAM, seen("amd", "amd-uuid-2", "MI300X", 0, None, None, NOT_SUPPORTED)),
    (NO_ACTIVITY, seen("amd", "amd-uuid-3", "MI300X", 196592, None, 283)),  # activity unsupported: unknown, healthy
]


@pytest.mark.parametrize(("gpu", "expected"), AMD_DEVICES, ids=lambda v: getattr(v, "uuid", ""))
def test_amd_reads_each_device(gpu: FakeAmdGpu, expected: DeviceInfo) -> None:
    assert AmdBackend(amdsmi=FakeAmdSmi([gpu])).devices() == [expected]


@pytest.mark.parametrize("legacy", [False, True], ids=["process-dicts", "process-handles"])
def test_amd_process_memory_in_mib(legacy: bool) -> None:
    processes = [
        {"pid": 301, "name": "python3", "memory_usage": {"vram_mem": 3 * GIB, "gtt_mem": 0}},
        {"pid": 302, "name": "N/A", "memory_usage": {"vram_mem": "N/A"}},
        {"pid": 303, "name": "rocm-smi", "memory_usage": {"vram_mem": 1}},
    ]
    backend = AmdBackend(amdsmi=FakeAmdSmi([FakeAmdGpu(processes=processes)], legacy=legacy))
    assert backend.process_memory_mib(0) == {301: 3072, 303: 1}
    with pytest.raises(DiscoveryError, match="amd device 4 is not present \\(AMD SMI sees 1 GPUs\\)"):
        backend.process_memory_mib(4)


def test_amd_steps_aside_when_amd_smi_cannot_start() -> None:
    backend = AmdBackend(amdsmi=FakeAmdSmi([MI300X], init_error="AMDSMI_STATUS_DRIVER_NOT_LOADED"))
    assert backend.available() == (False, "AMD SMI could not start: AMDSMI_STATUS_DRIVER_NOT_LOADED")


def test_amd_steps_aside_when_amdsmi_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    ok, why = AmdBackend().available()
    assert not ok and why.startswith("amdsmi is not installed")


# -- sim: devices from a SPEC ---------------------------------------------------------------------------------

SPECS = [
    ("1xT4-16GB", [("T4", 16384)]),
    ("2xA100-80GB,1xAscend910B-64GB", [("A100", 81920), ("A100", 81920), ("Ascend910B", 65536)]),
    (" 1xA100-SXM4-80GB , 1xMI300X-192GB ", [("A100-SXM4", 81920), ("MI300X", 196608)]),
]


@pytest.mark.parametrize(("spec", "expected"), SPECS)
def test_sim_spec(spec: str, expected: list[tuple[str, int]]) -> None:
    assert parse_devices_spec(spec) == expected


FORM = "use COUNTxMODEL-MEMORY like 2xA100-80GB,1xAscend910B-64GB"
BAD_SPECS = [
    ("2xA100", f"devices spec '2xA100' is not allowed: {FORM}"),
    ("", f"devices spec '' is not allowed: {FORM}"),
    ("A100-80GB", f"devices spec 'A100-80GB' is not allowed: {FORM}"),
    ("0xA100-80GB", f"devices spec '0xA100-80GB' is not allowed: {FORM}"),
    ("2xA100-80MB", f"devices spec '2xA100-80MB' is not allowed: {FORM}"),
    ("2xA100-80GB,", f"devices spec '2xA100-80GB,' is not allowed (part ''): {FORM}"),
    ("2xA100-80GB,1xT4", f"devices spec '2xA100-80GB,1xT4' is not allowed (part '1xT4'): {FORM}"),
    ("5000xT4-16GB", "devices spec '5000xT4-16GB' is not allowed: at most 1024 devices in all"),
    (
        "99999999999999999999xT4-16GB",
        "devices spec '99999999999999999999xT4-16GB' is not allowed: at most 1024 devices in all",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_sim_bad_spec_is_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_devices_spec(spec)
    assert str(caught.value) == message


def test_sim_devices_are_deterministic_healthy_and_cannot_tell_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXAI_SIM_MEMORY_FILE", raising=False)
    found = SimBackend("2xA100-80GB,1xAscend910B-64GB").devices()
    assert found == [
        DeviceInfo("sim", 0, "SIM-A100-0", "A100", 81920, True, None, 0),
        DeviceInfo("sim", 1, "SIM-A100-1", "A100", 81920, True, None, 0),
        DeviceInfo("sim", 2, "SIM-Ascend910B-2", "Ascend910B", 65536, True, None, 0),
    ]
    assert SimBackend("2xA100-80GB,1xAscend910B-64GB").devices() == found


def test_sim_process_memory_from_the_memory_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory_file = tmp_path / "memory.json"
    monkeypatch.setenv("FLEXAI_SIM_MEMORY_FILE", str(memory_file))
    backend = SimBackend("2xT4-16GB")

    memory_file.write_text(json.dumps({"4242": 1024}))  # flat: on every device
    assert [backend.process_memory_mib(i) for i in (0, 1)] == [{4242: 1024}, {4242: 1024}]

    memory_file.write_text(json.dumps({"1": {"4242": 1024, "4343": 512}}))  # per device, re-read on each call
    assert [backend.process_memory_mib(i) for i in (0, 1)] == [{}, {4242: 1024, 4343: 512}]
    assert [d.memory_used_mib for d in backend.devices()] == [0, 1536]


BAD_MEMORY_FILES = [
    ("not json", "cannot be read"),
    ("[1, 2]", "holds list, not an object"),
    ('{"abc": 10}', "pid 'abc' is not a number"),
    ('{"4242": -1}', "pid 4242 uses -1, not a whole number of MiB"),
    ('{"4242": 1.5}', "pid 4242 uses 1.5, not a whole number of MiB"),
    ('{"7": {"4242": 10}}', "names device 7, but spec '2xT4-16GB' has 2"),
]


@pytest.mark.parametrize(("content", "message"), BAD_MEMORY_FILES)
def test_sim_bad_memory_file(tmp_path: Path, content: str, message: str) -> None:
    memory_file = tmp_path / "memory.json"
    memory_file.write_text(content)
    with pytest.raises(DiscoveryError, match=f"^FLEXAI_SIM_MEMORY_FILE='{memory_file}'.*{message}"):
        SimBackend("2xT4-16GB", memory_file=memory_file).process_memory_mib(0)


def test_sim_missing_memory_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="cannot be read: .*No such file"):
        SimBackend("1xT4-16GB", memory_file=tmp_path / "absent.json").devices()


# -- visibility -----------------------------------------------------------------------------------------------

VISIBILITY = [
    (NvidiaBackend(nvml=FakeNVML([])), {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-c"}),
    (AscendBackend(run=lambda args: ""), {"ASCEND_RT_VISIBLE_DEVICES": "0,2"}),
    (AmdBackend(amdsmi=FakeAmdSmi([])), {"HIP_VISIBLE_DEVICES": "0,2"}),
    (SimBackend("3xT4-16GB"), {"FLEXAI_SIM_VISIBLE_DEVICES": "0,2"}),
]


@pytest.mark.parametrize(("backend", "expected"), VISIBILITY, ids=lambda v: getattr(v, "name", ""))
def test_visibility_env(backend: NvidiaBackend, expected: dict[str, str]) -> None:
    assert backend.visibility_env([0, 2], ["GPU-a", "GPU-c"]) == expected
    assert backend.visibility_env([], []) == {next(iter(expected)): ""}  # "" hides every device
    with pytest.raises(ValueError, match="got 2 indices and 1 uuids"):
        backend.visibility_env([0, 2], ["GPU-a"])


def test_visibility_env_for_devices() -> None:
    backend = SimBackend("3xT4-16GB", memory_file="")
    assert backend.visibility_env_for(backend.devices()[1:]) == {"FLEXAI_SIM_VISIBLE_DEVICES": "1,2"}


# -- discover -------------------------------------------------------------------------------------------------


def test_discover_sim() -> None:
    backend, found = discover("sim:2xA100-80GB,1xAscend910B-64GB")
    assert isinstance(backend, SimBackend)
    assert [d.uuid for d in found] == ["SIM-A100-0", "SIM-A100-1", "SIM-Ascend910B-2"]


def test_discover_sim_bad_spec() -> None:
    with pytest.raises(ValueError, match=f"^devices spec '2xA100' is not allowed: {FORM}$"):
        discover("sim:2xA100")


def test_discover_auto_takes_the_first_available_backend_with_devices() -> None:
    amd = FakeAmdSmi([MI300X])
    candidates = [
        NvidiaBackend(nvml=FakeNVML([A100], init_error=NVML_DRIVER_NOT_LOADED)),
        AscendBackend(run=lambda args: recorded("npu_smi_info_910b_x8.txt")),
        AmdBackend(amdsmi=amd),
    ]
    backend, found = discover("auto", candidates=candidates)
    assert backend is candidates[1] and len(found) == 8
    assert amd.inits == 0  # later vendors are not touched


def test_discover_auto_skips_a_backend_that_sees_no_devices_or_fails() -> None:
    nvml = FakeNVML([])
    candidates = [
        NvidiaBackend(nvml=nvml),
        AscendBackend(run=lambda args: recorded("npu_smi_info_910b_truncated.txt")),
        AmdBackend(amdsmi=FakeAmdSmi([MI300X])),
    ]
    backend, found = discover(candidates=candidates)
    assert backend is candidates[2] and [d.model for d in found] == ["MI300X"]
    assert nvml.shutdowns == 1  # the skipped backend released NVML


def test_discover_auto_says_why_each_backend_stepped_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NoDevicesError) as caught:
        discover("auto")
    assert str(caught.value) == (
        "no accelerator found: "
        "nvidia: nvidia-ml-py is not installed (pip install 'flexai[nvidia]'); "
        "ascend: npu-smi not found on PATH; "
        "amd: amdsmi is not installed (it ships with ROCm 6 or newer). "
        "To run without one, fake devices with --devices sim:SPEC, e.g. --devices sim:2xA100-80GB,1xAscend910B-64GB"
    )


def test_discover_auto_reports_failures_and_empty_backends() -> None:
    candidates = [
        NvidiaBackend(nvml=FakeNVML([])),
        AscendBackend(run=lambda args: recorded("npu_smi_info_910b_truncated.txt")),
    ]
    with pytest.raises(
        NoDevicesError, match="nvidia: the tool works but sees no devices; ascend: npu-smi info line 14"
    ):
        discover(candidates=candidates)


def test_discover_one_vendor_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NoDevicesError, match="^no accelerator found: nvidia: nvidia-ml-py is not installed"):
        discover("nvidia")


def test_discover_rejects_an_unknown_value() -> None:
    with pytest.raises(ValueError) as caught:
        discover("gpu")
    assert str(caught.value) == (
        "devices='gpu' is not allowed: use auto, nvidia, ascend, amd, sim:SPEC "
        "(SPEC like 2xA100-80GB,1xAscend910B-64GB)"
    )


def test_backend_names_in_auto_order() -> None:
    assert backend_names() == ["nvidia", "ascend", "amd"]


def test_device_info_rejects_an_unknown_vendor() -> None:
    with pytest.raises(ValueError, match="vendor='intel' is not allowed: use one of nvidia, ascend, amd, sim"):
        DeviceInfo("intel", 0, "x", "Gaudi2", 98304, True)  # type: ignore[arg-type]


def test_the_package_imports_no_network_code_nor_vendor_libraries() -> None:
    code = (
        "import sys, flexai.node; "
        "bad = {'http', 'urllib', 'socket', 'requests', 'httpx', 'grpc', 'kubernetes', 'fastapi', 'pynvml', 'amdsmi'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"
