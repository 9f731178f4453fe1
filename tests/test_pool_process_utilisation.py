"""Per-process utilisation: NVML's ``nvmlDeviceGetProcessUtilization`` read by the nvidia backend (a fake pynvml,
no GPU), the sim backend's scripted figure, and the pool subtracting its running guests' own load from the device's
utilisation, so that a time-sharing guest that keeps its device busy does not count as its owners' busy time and
pause itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flexai.node.devices import DiscoveryError
from flexai.node.nvidia import NvidiaBackend
from flexai.node.sim import SimBackend
from tests.pool_helpers import wait_for
from tests.test_node_discovery import FakeGpu, FakeNVML, FakeNVMLError
from tests.test_pool_timeshare import all_stopped, command_processes, loop, make_pool, submit, view

NOW_S = 1_700_000_000.0
NOW_US = int(NOW_S * 1_000_000)


@dataclass
class Sample:
    """Like pynvml's c_nvmlProcessUtilizationSample_t."""

    pid: int
    timeStamp: int  # noqa: N815  (pynvml's spelling)
    smUtil: int  # noqa: N815
    memUtil: int = 0  # noqa: N815
    encUtil: int = 0  # noqa: N815
    decUtil: int = 0  # noqa: N815


@dataclass
class UtilGpu(FakeGpu):
    samples: list[Sample] = field(default_factory=list)


class UtilNVML(FakeNVML):
    asked: list[int]

    def nvmlDeviceGetProcessUtilization(self, handle: int, last_seen_us: int) -> list[Sample]:  # noqa: N802
        self.asked = [*getattr(self, "asked", []), last_seen_us]
        gpu = self._gpu(handle, "nvmlDeviceGetProcessUtilization")
        newer = [s for s in gpu.samples if s.timeStamp > last_seen_us]  # type: ignore[attr-defined]
        if not newer:
            raise FakeNVMLError(6)  # NVML_ERROR_NOT_FOUND: no sample since the time asked
        return newer


def backend(*gpus: FakeGpu) -> NvidiaBackend:
    return NvidiaBackend(UtilNVML(list(gpus)), clock=lambda: NOW_S)


def test_nvml_per_process_utilisation_is_each_process_latest_sample_of_the_last_second() -> None:
    gpu = UtilGpu(
        samples=[
            Sample(100, NOW_US - 2_000_000, 99),  # older than the window: not asked for
            Sample(100, NOW_US - 800_000, 30),
            Sample(100, NOW_US - 100_000, 40),  # its latest
            Sample(200, NOW_US - 500_000, 5),
            Sample(300, NOW_US - 50_000, 0xFFFFFFFF),  # not supported for this process: left out
        ]
    )
    nvml_backend = backend(gpu)
    assert nvml_backend.process_utilisation_pct(0) == {100: 40.0, 200: 5.0}
    assert nvml_backend._nvml.asked == [NOW_US - 1_000_000]  # type: ignore[union-attr]
    assert nvml_backend.process_utilisation_pct(0, window_s=0.3) == {100: 40.0}


def test_nvml_per_process_utilisation_without_samples_or_support() -> None:
    assert backend(UtilGpu()).process_utilisation_pct(0) == {}  # nobody used the GPU lately
    unsupported = UtilGpu(fail={"nvmlDeviceGetProcessUtilization": 3})
    assert backend(unsupported).process_utilisation_pct(0) is None  # cannot tell
    assert backend(UtilGpu(fail={"nvmlDeviceGetProcessUtilization": 4})).process_utilisation_pct(0) is None
    with pytest.raises(DiscoveryError, match="NVML could not read per-process utilisation of GPU 0: GPU is lost"):
        backend(UtilGpu(fail={"nvmlDeviceGetProcessUtilization": 15})).process_utilisation_pct(0)
    old = NvidiaBackend(FakeNVML([FakeGpu()]))  # an nvidia-ml-py without the call
    assert old.process_utilisation_pct(0) is None


def test_the_sim_backend_scripts_per_process_utilisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "utilisation.json"
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(path))
    sim = SimBackend("2xA100-80GB")
    path.write_text(json.dumps({"0": {"utilisation_pct": 60, "process_utilisation_pct": {"42": 55}}, "1": 10}))
    assert sim.process_utilisation_pct(0) == {42: 55.0}
    assert sim.process_utilisation_pct(1) is None  # not scripted: cannot tell
    assert sim.devices()[0].utilisation_pct == 60
    path.write_text(json.dumps({"0": {"process_utilisation_pct": {"42": 101}}}))
    with pytest.raises(DiscoveryError, match="device 0 pid 42 is 101 busy"):
        sim.process_utilisation_pct(0)


def script(path: Path, busy_pct: float, guest_pcts: dict[int, float] | None = None) -> None:
    device: dict[str, object] = {"utilisation_pct": busy_pct, "memory_used_mib": 0}
    if guest_pcts is not None:
        device["process_utilisation_pct"] = {str(pid): pct for pid, pct in guest_pcts.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"0": device}))
    tmp.replace(path)


def test_a_guest_that_loads_its_device_does_not_pause_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "utilisation.json"
    script(path, 0)
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(path))
    pool = make_pool(tmp_path)
    owner = submit(pool, tmp_path, 0, "normal")
    pool.tick()
    guest = submit(pool, tmp_path, 1, "low", share_milli=500, memory_mib=8192)
    try:
        pool.tick()
        assert view(pool, guest)["opportunistic"] is True
        shim = int(view(pool, guest)["pid"])  # type: ignore[call-overload]
        wait_for(lambda: len(command_processes(shim)) == 2)
        pids = [pid for pid, _ in command_processes(shim)]
        # 70 % busy, 65 % of it the guest's own processes: the owners use 5 %, the guest runs on.
        script(path, 70, {pids[0]: 50, pids[1]: 15, 999_999: 80})
        for _ in range(5):
            loop(pool)
        assert view(pool, guest)["paused"] is False and not all_stopped(shim)
        # The owner gets busy beside it: 95 % in all, the guest's 65 %: owners 30 % (under 50 %), still runs.
        script(path, 95, {pids[0]: 50, pids[1]: 15})
        loop(pool)
        assert view(pool, guest)["paused"] is False
        # Owners at 60 %: paused (and, paused, its old figures count for nothing).
        script(path, 90, {pids[0]: 25, pids[1]: 5})
        loop(pool)
        wait_for(lambda: all_stopped(shim), timeout_s=2)
        assert view(pool, guest)["paused"] is True
        # Where the device cannot tell per process, its whole utilisation counts as the owners'.
        script(path, 40)
        loop(pool)
        assert view(pool, guest)["paused"] is False  # 40 % < 50 %: idle enough, resumed
        script(path, 70)
        loop(pool)
        assert view(pool, guest)["paused"] is True
    finally:
        script(path, 0)
        for n in range(4):
            (tmp_path / f"release-{n}").touch()
        pool.resume_all()
        wait_for(lambda: not pool.store.jobs(("running", "queued", "preempted")), lambda: loop(pool), 20)
    assert view(pool, owner)["state"] == "succeeded"
