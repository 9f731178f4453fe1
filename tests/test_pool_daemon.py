"""End to end: `flexai serve` on sim devices, the client commands, and `kill -9` of the daemon mid-work."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pool_helpers import gated_command, wait_for

FLEXAI = [sys.executable, "-m", "flexai"]


def start_daemon(state: Path) -> subprocess.Popen[bytes]:
    log = open(state.parent / "daemon.log", "ab")  # noqa: SIM115  (kept open for the daemon's lifetime)
    daemon = subprocess.Popen(
        [*FLEXAI, "serve", "--devices", "sim:2xA100-80GB", "--state", str(state)], stdout=log, stderr=log
    )
    wait_for(lambda: (state / "flexai.sock").exists() and _answers(state), timeout_s=30)
    return daemon


def _answers(state: Path) -> bool:
    return flexai(state, "pool", "--json").returncode == 0


def flexai(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLEXAI_STATE"}
    return subprocess.run(
        [*FLEXAI, *args[:1], "--state", str(state), *args[1:]], capture_output=True, text=True, env=env
    )


def jobs(state: Path) -> list[dict[str, object]]:
    result = flexai(state, "ps", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
        for n in range(10):
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
        pool_view = json.loads(flexai(state, "pool", "--json").stdout)
        assert all(d["free_share_milli"] >= 0 for d in pool_view["devices"])

        for n in range(10):
            (tmp_path / f"release-{n}").touch()
        wait_for(lambda: all(j["state"] == "succeeded" for j in jobs(state)), timeout_s=60)
        assert sorted(j["id"] for j in jobs(state)) == sorted(ids)
        assert flexai(state, "logs", ids[0]).stdout.strip() == "done"

        waited = flexai(state, "run", "--share", "30%", "--wait", "--", "sh", "-c", "echo hello; exit 3")
        assert waited.returncode == 3 and "hello" in waited.stdout

        refused = flexai(state, "run", "--share", "35%", "--", "true")
        assert refused.returncode == 2
        assert "share=350m is not allowed" in " ".join(refused.stderr.split() + refused.stdout.split())
        events = json.loads(flexai(state, "events", "--json").stdout)
        assert any(e["kind"] == "adopted" for e in events)
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
