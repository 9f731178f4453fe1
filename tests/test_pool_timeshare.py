"""Time-sharing in the embedded pool: a ``low`` job runs as a guest on a device whose share is all granted to a
``normal`` job, while that device is idle by its (scripted) utilisation; it is paused (SIGSTOP, its whole
session) while the device is busy and resumed when idle; it yields (stopped, queued again) when the owner needs
the memory; owner and guest both survive a ``kill -9`` of the daemon. On ``sim:1xA100-80GB``, with the sim
backend's utilisation file (``FLEXAI_SIM_UTILISATION_FILE``) flipped by the test. The pause and resume times are
measured by ``benchmarks/pool_timeshare.py``, not here: the bounds below are only generous sanity checks."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexai.local.pool import JobSubmission, Pool, PoolConfig
from flexai.local.procfs import processes_of
from flexai.node.devices import discover
from tests.pool_helpers import wait_for
from tests.test_pool_daemon import api, flexai, jobs, start_daemon

SPEC = "sim:1xA100-80GB"


def script(path: Path, busy_pct: float, memory_used_mib: int = 0) -> None:
    """What the sim device reports: how busy it is and the memory in use on it (owners and guests together)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"0": {"utilisation_pct": busy_pct, "memory_used_mib": memory_used_mib}}))
    tmp.replace(path)  # atomic: the pool never reads half a file


def owner_command(release: Path) -> list[str]:
    code = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.02)"
    return [sys.executable, "-c", code]


def guest_command(release: Path) -> list[str]:
    """Writes 'start', then runs with a helper in a process group of its own (a pause must stop it too) until
    ``release`` exists."""
    helper = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.02)"
    code = (
        "import os, subprocess, sys, time\n"
        "print('start', flush=True)\n"
        f"helper = subprocess.Popen([sys.executable, '-c', {helper!r}], process_group=0)\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.02)\n"
        "helper.wait()\nprint('done', flush=True)"
    )
    return [sys.executable, "-c", code]


def command_processes(shim: int) -> list[tuple[int, str]]:
    """(pid, state) of the job's processes but its shim (the command, its helper)."""
    return [(pid, state) for pid, state in processes_of(shim) if pid != shim]


def all_stopped(shim: int) -> bool:
    found = command_processes(shim)
    return len(found) == 2 and all(state == "T" for _, state in found)


def none_stopped(shim: int) -> bool:
    found = command_processes(shim)
    return len(found) == 2 and all(state != "T" for _, state in found)


@pytest.fixture
def utilisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "utilisation.json"
    script(path, 0)
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(path))
    yield path
    for n in range(4):
        (tmp_path / f"release-{n}").touch()


def make_pool(tmp_path: Path, **config: object) -> Pool:
    backend, devices = discover(SPEC)
    # Utilisation read on every tick: the test decides when the device changes, the pool sees it at the next tick.
    return Pool(tmp_path / "state", backend, devices, PoolConfig(timeshare_observe_period_s=0.0, **config))  # type: ignore[arg-type]


def submit(pool: Pool, tmp_path: Path, n: int, cls: str, **extra: object) -> str:
    command = owner_command(tmp_path / f"release-{n}") if cls != "low" else guest_command(tmp_path / f"release-{n}")
    return pool.submit(JobSubmission(command, priority_class=cls, name=f"{cls}{n}", **extra)).id  # type: ignore[arg-type]


def view(pool: Pool, job_id: str) -> dict[str, object]:
    return pool.job_view(pool.store.job(job_id))  # type: ignore[arg-type]


def loop(pool: Pool) -> None:
    pool.tick()
    pool.timeslice()


def drain(pool: Pool, tmp_path: Path) -> None:
    for n in range(4):
        (tmp_path / f"release-{n}").touch()
    pool.resume_all()
    wait_for(lambda: not pool.store.jobs(("running", "queued", "preempted")), lambda: loop(pool), 20)


def test_a_low_job_runs_on_idle_owned_share_pauses_resumes_and_yields_for_memory(
    tmp_path: Path, utilisation: Path
) -> None:
    pool = make_pool(tmp_path)
    owner = submit(pool, tmp_path, 0, "normal")
    pool.tick()
    guest = submit(pool, tmp_path, 1, "low", share_milli=500, memory_mib=8192)
    try:
        pool.tick()
        # The device is all granted to the owner, and idle: the low job runs there as a guest, holding nothing.
        assert view(pool, guest)["state"] == "running" and view(pool, guest)["opportunistic"] is True
        assert view(pool, owner)["opportunistic"] is False and set(pool.state.grants) == {owner}
        assert set(pool.hi.guests) == {guest} and pool.queue_view()[0]["used_share_milli"] == 1000  # no quota
        shim = int(view(pool, guest)["pid"])  # type: ignore[call-overload]
        wait_for(lambda: none_stopped(shim), lambda: loop(pool), 10)
        slices = pool.pool_view()["devices"][0]["slices"]  # type: ignore[index]
        assert [(s["job"], s["opportunistic"]) for s in slices] == [(owner, False), (guest, True)]

        # The owner gets busy: the guest's whole session (its helper's group too) stops at the next tick.
        script(utilisation, 90)
        loop(pool)
        wait_for(lambda: all_stopped(shim), timeout_s=2)
        assert view(pool, guest)["paused"] is True and view(pool, guest)["state"] == "running"
        for _ in range(5):
            loop(pool)  # the time-slicer leaves a guest alone: it stays stopped
        assert all_stopped(shim)

        # Idle again: resumed.
        script(utilisation, 10)
        loop(pool)
        wait_for(lambda: none_stopped(shim), timeout_s=2)
        assert view(pool, guest)["paused"] is False

        # The owner's memory grows into the guest's room: it yields, stopped and queued again (not preempted).
        script(utilisation, 10, 80_000)
        wait_for(lambda: view(pool, guest)["state"] == "queued", lambda: loop(pool), 10)
        shown = view(pool, guest)
        assert shown["opportunistic"] is False and shown["pid"] is None
        assert str(shown["reason"]).startswith("yielded: its owners need the device memory on GPU 0")
        assert all(state == "Z" for _, state in processes_of(shim))  # stopped (zombies wait for their reaper)
        kinds = [e.kind for e in pool.store.events() if e.job_id == guest]
        assert kinds == ["submitted", "started", "paused", "resumed", "yielded", "requeued"]
        # Room again: it starts once more as a guest, its log goes on.
        script(utilisation, 10, 20_000)
        wait_for(lambda: view(pool, guest)["state"] == "running", lambda: loop(pool), 10)
        assert view(pool, guest)["opportunistic"] is True
        wait_for(lambda: pool.log_path(guest).read_text().split() == ["start", "start"])
    finally:
        drain(pool, tmp_path)
    assert pool.store.job(guest).state == "succeeded"  # type: ignore[union-attr]


def test_no_guest_where_the_device_cannot_tell_or_time_sharing_is_off(
    tmp_path: Path, utilisation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    utilisation.write_text("{}")  # the device cannot tell how busy it is
    pool = make_pool(tmp_path)
    owner = submit(pool, tmp_path, 0, "normal")
    pool.tick()
    low = submit(pool, tmp_path, 1, "low", share_milli=500)
    try:
        for _ in range(3):
            pool.tick()
        assert view(pool, low)["state"] == "queued" and not pool.hi.guests
        pool.shutdown()
        # A daemon with time-sharing off on an idle device: the low job waits for share of its own.
        script(utilisation, 0)
        pool = make_pool(tmp_path, timeshare=False)
        for _ in range(3):
            pool.tick()
        assert view(pool, low)["state"] == "queued" and view(pool, owner)["state"] == "running"
    finally:
        drain(pool, tmp_path)


def test_owner_and_guest_survive_kill_9_of_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    busy = tmp_path / "utilisation.json"
    script(busy, 0)
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(busy))
    daemon = start_daemon(state, SPEC)
    try:
        with api(state) as client:
            body = {"command": owner_command(tmp_path / "release-0"), "name": "owner", "cwd": str(tmp_path)}
            owner = client.post("/api/v1/jobs", json=body).json()["id"]
            wait_for(lambda: {j["id"]: j["state"] for j in jobs(state)}[owner] == "running", timeout_s=10)
            body = {
                "command": guest_command(tmp_path / "release-1"),
                "name": "guest",
                "share_milli": 500,
                "priority_class": "low",
                "cwd": str(tmp_path),
            }
            guest = client.post("/api/v1/jobs", json=body).json()["id"]

        def listed() -> dict[str, dict[str, object]]:
            return {str(j["id"]): j for j in jobs(state)}

        wait_for(lambda: listed()[guest]["state"] == "running", timeout_s=10)
        shown = {str(j["id"]): j for j in json.loads(flexai(state, "ps", "--json").stdout)}  # the CLI's JSON
        assert (shown[owner]["opportunistic"], shown[guest]["opportunistic"]) == (False, True)
        assert all(isinstance(j["opportunistic"], bool) for j in shown.values())
        pids = {owner: shown[owner]["pid"], guest: shown[guest]["pid"]}
        shim = int(pids[guest])  # type: ignore[call-overload]
        wait_for(lambda: none_stopped(shim), timeout_s=10)

        # Busy: the daemon pauses the guest (well within the 1 s bound; benchmarks/pool_timeshare.py measures it).
        script(busy, 95)
        wait_for(lambda: all_stopped(shim), timeout_s=3)
        assert listed()[guest]["paused"] is True
        table = flexai(state, "ps").stdout
        assert "paused (opportunistic)" in table and "running" in table

        # kill -9: the guest's shim resumes its whole session within 2 s; both jobs live on.
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        wait_for(lambda: none_stopped(shim), timeout_s=2)
        daemon = start_daemon(state, SPEC)
        after = listed()
        assert (after[owner]["state"], after[owner]["pid"], after[owner]["opportunistic"]) == (
            "running",
            pids[owner],
            False,
        )
        assert (after[guest]["state"], after[guest]["pid"], after[guest]["opportunistic"]) == (
            "running",
            pids[guest],
            True,
        )
        # Re-adopted as a guest: paused again while the device is busy, resumed when idle.
        wait_for(lambda: all_stopped(shim), timeout_s=3)
        script(busy, 0)
        wait_for(lambda: none_stopped(shim), timeout_s=3)
        with api(state) as client:
            kinds = [e["kind"] for e in client.get("/api/v1/events").json() if e["job_id"] == guest]
        assert (
            kinds[:3] == ["submitted", "started", "paused"]
            and "adopted" in kinds
            and kinds[-2:]
            == [
                "paused",
                "resumed",
            ]
        )
        (tmp_path / "release-1").touch()
        (tmp_path / "release-0").touch()
        wait_for(lambda: {j["state"] for j in jobs(state)} == {"succeeded"}, timeout_s=10)
    finally:
        for n in range(2):
            (tmp_path / f"release-{n}").touch()
        daemon.terminate()
        daemon.wait(timeout=20)
    wait_for(lambda: not processes_of(shim), timeout_s=10)


def test_the_sim_utilisation_file_scripts_memory_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "utilisation.json"
    path.write_text(json.dumps({"0": {"utilisation_pct": 40, "memory_used_mib": 1234}, "1": 7, "2": {}}))
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(path))
    backend, devices = discover("sim:3xA100-80GB")
    assert [(d.utilisation_pct, d.memory_used_mib) for d in devices] == [(40.0, 1234), (7.0, 0), (None, 0)]
    from flexai.node.devices import DiscoveryError

    path.write_text(json.dumps({"0": {"busy": 3}}))
    with pytest.raises(DiscoveryError, match="device 0 has unknown key 'busy'"):
        backend.devices()
    path.write_text(json.dumps({"0": {"memory_used_mib": -1}}))
    with pytest.raises(DiscoveryError, match="device 0 uses -1 MiB"):
        backend.devices()
