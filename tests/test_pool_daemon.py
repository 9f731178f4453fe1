"""End to end: `flexai serve` on sim devices, the client commands, and the daemon dying mid-work (`kill -9`,
SIGTERM, SIGHUP) with jobs paused by the time-slicer."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flexai.local.procfs import processes_of
from tests.pool_helpers import gated_command, wait_for

FLEXAI = [sys.executable, "-m", "flexai"]


def api(state: Path) -> httpx.Client:
    """The daemon's API over its unix socket (faster than a CLI process per question)."""
    transport = httpx.HTTPTransport(uds=str(state / "flexai.sock"), verify=False)  # no TLS: skip loading CAs
    return httpx.Client(transport=transport, base_url="http://flexai", timeout=10)


def start_daemon(state: Path, devices: str = "sim:2xA100-80GB", *extra: str) -> subprocess.Popen[bytes]:
    log = open(state.parent / "daemon.log", "ab")  # noqa: SIM115  (kept open for the daemon's lifetime)
    daemon = subprocess.Popen(
        [*FLEXAI, "serve", "--devices", devices, "--state", str(state), *extra], stdout=log, stderr=log
    )
    wait_for(lambda: (state / "flexai.sock").exists() and _answers(state), timeout_s=30)
    return daemon


def _answers(state: Path) -> bool:
    try:
        with api(state) as client:
            return client.get("/api/v1/pool").status_code == 200
    except httpx.HTTPError:
        return False


def flexai(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLEXAI_STATE"}
    return subprocess.run(
        [*FLEXAI, *args[:1], "--state", str(state), *args[1:]], capture_output=True, text=True, env=env
    )


def jobs(state: Path) -> list[dict[str, object]]:
    with api(state) as client:
        return client.get("/api/v1/jobs").json()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    directory.mkdir()
    yield directory
    for n in range(12):
        (tmp_path / f"release-{n}").touch()


def test_serve_run_and_kill_9_lose_nothing(state: Path, tmp_path: Path) -> None:
    daemon = start_daemon(state)
    try:
        assert stat.S_IMODE((state / "flexai.sock").stat().st_mode) == 0o600
        ids = []
        for n in range(3):  # through the CLI; the other seven through the API (a CLI process costs ~1 s here)
            result = flexai(
                state,
                "run",
                "--share",
                "50%",
                "--memory",
                "8GiB",
                "--name",
                f"j{n}",
                "--",
                *gated_command(tmp_path / f"release-{n}"),
            )
            assert result.returncode == 0, result.stderr
            ids.append(result.stdout.strip())
        with api(state) as client:
            for n in range(3, 10):
                body = {
                    "command": gated_command(tmp_path / f"release-{n}"),
                    "share_milli": 500,
                    "memory_mib": 8192,
                    "name": f"j{n}",
                    "cwd": str(tmp_path),
                }
                ids.append(client.post("/api/v1/jobs", json=body).json()["id"])
        wait_for(lambda: sum(j["state"] == "running" for j in jobs(state)) == 4)
        before = {j["id"]: (j["state"], json.dumps(j["slices"])) for j in jobs(state)}
        pool_view = json.loads(flexai(state, "pool", "--json").stdout)
        granted = sorted(s["job"] for d in pool_view["devices"] for s in d["slices"])
        assert granted == sorted(i for i, (st, _) in before.items() if st == "running")

        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        daemon = start_daemon(state)
        after = {j["id"]: (j["state"], json.dumps(j["slices"])) for j in jobs(state)}
        assert after == before  # nothing lost, nothing moved, nothing granted twice
        with api(state) as client:
            assert all(d["free_share_milli"] >= 0 for d in client.get("/api/v1/pool").json()["devices"])

        for n in range(10):
            (tmp_path / f"release-{n}").touch()
        wait_for(lambda: all(j["state"] == "succeeded" for j in jobs(state)), timeout_s=60)
        assert sorted(j["id"] for j in jobs(state)) == sorted(ids)
        assert flexai(state, "logs", ids[0]).stdout.strip() == "done"

        waited = flexai(state, "run", "--share", "30%", "--wait", "--", "sh", "-c", "echo hello; exit 3")
        assert waited.returncode == 3 and "hello" in waited.stdout

        refused = flexai(state, "run", "--share", "35%", "--", "true")
        assert refused.returncode == 2 and refused.stdout == ""
        assert "share=350m is not allowed" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        events = json.loads(flexai(state, "events", "--json").stdout)
        assert any(e["kind"] == "adopted" for e in events)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)


def _paused(shims: list[int]) -> list[int]:
    """Processes of these jobs (the sessions their shims lead) that are stopped."""
    return [pid for shim in shims for pid, st in processes_of(shim) if st == "T"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=["kill-9", "SIGTERM", "SIGHUP"])
def test_no_job_stays_paused_after_the_daemon_dies(state: Path, tmp_path: Path, how: signal.Signals) -> None:
    daemon = start_daemon(state, "sim:1xA100-80GB")  # a sim device cannot tell how busy it is: always sliced
    try:
        with api(state) as client:
            for n in range(2):
                body = {"command": gated_command(tmp_path / f"release-{n}"), "share_milli": 500, "cwd": str(tmp_path)}
                assert client.post("/api/v1/jobs", json=body).status_code == 201
        wait_for(lambda: [j["state"] for j in jobs(state)] == ["running", "running"])
        shims = [int(j["pid"]) for j in jobs(state)]  # type: ignore[call-overload]
        wait_for(lambda: bool(_paused(shims)), timeout_s=10)  # the slicer is at work
        daemon.send_signal(how)
        died = time.monotonic()
        wait_for(lambda: not _paused(shims), timeout_s=2.0)
        assert time.monotonic() - died < 2.0
        assert daemon.wait(timeout=10) == (-signal.SIGKILL if how == signal.SIGKILL else 0)
        assert not _paused(shims)  # and nobody pauses them again
        assert all(processes_of(shim) for shim in shims)  # the jobs go on: the next daemon adopts them
        if how == signal.SIGKILL:
            # A new daemon adopts the jobs and slices them again; a graceful stop resumes them once more.
            daemon = start_daemon(state, "sim:1xA100-80GB")
            wait_for(lambda: bool(_paused(shims)), timeout_s=10)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=10) == 0
            assert not _paused(shims)
    finally:
        for n in range(2):
            (tmp_path / f"release-{n}").touch()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    wait_for(lambda: not any(processes_of(shim) for shim in shims), timeout_s=10)


# ---------------------------------------------------------------------------------------------- Hi Scheduler
def logged_command(release_file: Path) -> list[str]:
    """Writes 'start' each time it starts, then runs until ``release_file`` exists."""
    code = f"import os, time\nprint('start', flush=True)\nwhile not os.path.exists({str(release_file)!r}):\n"
    return [sys.executable, "-c", code + "    time.sleep(0.02)\nprint('done', flush=True)"]


def by_id(state: Path) -> dict[str, dict[str, object]]:
    return {str(j["id"]): j for j in jobs(state)}


def log_of(state: Path, job_id: str) -> list[str]:
    path = state / "logs" / f"{job_id}.log"
    return path.read_text().split() if path.exists() else []


def test_high_preempts_low_which_comes_back_even_after_kill_9(state: Path, tmp_path: Path) -> None:
    daemon = start_daemon(state, "sim:1xA100-80GB")
    try:
        run = flexai(state, "run", "--priority", "low", "--name", "low", "--", *logged_command(tmp_path / "release-0"))
        assert run.returncode == 0, run.stderr
        low = run.stdout.strip()
        wait_for(lambda: log_of(state, low) == ["start"])
        with api(state) as client:
            body = {
                "command": logged_command(tmp_path / "release-1"),
                "share_milli": 600,
                "priority_class": "high",
                "name": "high",
                "cwd": str(tmp_path),
            }
            asked = time.monotonic()
            high = client.post("/api/v1/jobs", json=body).json()["id"]
        wait_for(lambda: by_id(state)[low]["state"] == "preempted", timeout_s=5)
        preempted_after = time.monotonic() - asked
        wait_for(lambda: by_id(state)[high]["state"] == "running", timeout_s=5)
        running_after = time.monotonic() - asked
        print(f"low preempted {preempted_after:.3f} s, high running {running_after:.3f} s after the high job came")
        assert running_after < 5.0
        listed = {j["id"]: j for j in json.loads(flexai(state, "ps", "--json").stdout)}
        assert (listed[low]["state"], listed[low]["priority_class"]) == ("preempted", "low")
        assert listed[low]["reason"].startswith(f"preempted by high ({high}) to free 100 % of GPU 0")
        assert (listed[high]["state"], listed[high]["priority_class"]) == ("running", "high")
        high_pid = listed[high]["pid"]

        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        daemon = start_daemon(state, "sim:1xA100-80GB")
        after = by_id(state)
        assert (after[high]["state"], after[high]["pid"]) == ("running", high_pid)  # re-adopted, not restarted
        assert after[low]["state"] == "preempted" and after[low]["reason"].startswith(f"preempted by high ({high})")

        (tmp_path / "release-1").touch()  # the high job ends: the low one starts again by itself
        wait_for(lambda: by_id(state)[low]["state"] == "running", timeout_s=10)
        wait_for(lambda: log_of(state, low) == ["start", "start"])
        (tmp_path / "release-0").touch()
        wait_for(lambda: by_id(state)[low]["state"] == "succeeded", timeout_s=10)
        with api(state) as client:
            kinds = [e["kind"] for e in client.get("/api/v1/events").json() if e["job_id"] == low]
        assert kinds == ["submitted", "started", "preempted", "requeued", "restarted", "succeeded"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)


def test_a_queue_borrows_an_idle_device_and_gives_it_back(state: Path, tmp_path: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(
        "[hi]\nnormal_min_runtime_s = 0\n\n"
        "[queues.a]\nguarantee = { devices = 1 }\n\n"
        "[queues.b]\nguarantee = { devices = 1 }\n"
    )
    daemon = start_daemon(state, "sim:2xA100-80GB", "--config", str(config))
    try:
        with api(state) as client:

            def submit(n: int, queue: str) -> str:
                body = {"command": logged_command(tmp_path / f"release-{n}"), "queue": queue, "cwd": str(tmp_path)}
                return client.post("/api/v1/jobs", json=body).json()["id"]

            a = [submit(0, "a"), submit(1, "a")]
            wait_for(lambda: [by_id(state)[j]["state"] for j in a] == ["running", "running"])  # b's device lent
            queues = {q["queue"]: q for q in client.get("/api/v1/queues").json()}
            assert (queues["a"]["used_share_milli"], queues["a"]["borrowed_share_milli"]) == (2000, 1000)
            b = submit(2, "b")
            wait_for(lambda: by_id(state)[b]["state"] == "running", timeout_s=5)
            states = sorted(by_id(state)[j]["state"] for j in a)
            assert states == ["preempted", "running"]
        rows = {q["queue"]: q for q in json.loads(flexai(state, "queues", "--json").stdout)}
        assert (rows["a"]["used_share_milli"], rows["a"]["borrowed_share_milli"], rows["a"]["pending"]) == (1000, 0, 1)
        assert (rows["b"]["used_share_milli"], rows["b"]["pending"]) == (1000, 0)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
