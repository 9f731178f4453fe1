"""The pool daemon on TCP with a bearer token, and its dashboard rendered by headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.pool_helpers import gated_command, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=4000",
    "--window-size=1100,760",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path: Path):  # noqa: ANN201
    token = "t0ken-for-tests-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    port = free_port()
    state = tmp_path / "state"
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flexai",
            "serve",
            "--devices",
            "sim:2xA100-80GB",
            "--state",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token_file),
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout_s=30)
    yield url, token
    for n in range(10):
        (tmp_path / f"release-{n}").touch()
    process.terminate()
    process.wait(timeout=20)


def test_tcp_needs_the_bearer_token(daemon: tuple[str, str]) -> None:
    url, token = daemon
    assert httpx.get(f"{url}/api/v1/pool").status_code == 401
    assert httpx.get(f"{url}/api/v1/pool", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/api/v1/pool", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/api/v1/jobs" in spec["paths"] and "/api/v1/pool" in spec["paths"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_shows_every_slice(daemon: tuple[str, str], tmp_path: Path) -> None:
    url, token = daemon
    headers = {"Authorization": f"Bearer {token}"}
    for n in range(8):
        body = {
            "command": gated_command(tmp_path / f"release-{n}"),
            "share_milli": 300,
            "memory_mib": 10240,
            "name": f"train-{n}",
            "cwd": str(tmp_path),
        }
        assert httpx.post(f"{url}/api/v1/jobs", json=body, headers=headers).status_code == 201
    wait_for(lambda: httpx.get(f"{url}/api/v1/pool", headers=headers).json()["running"] == 6)
    page = f"{url}/#token={token}"
    env = {**os.environ, "HOME": str(tmp_path)}
    profile = ["--user-data-dir=" + str(tmp_path / "chromium")]
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *profile, "--dump-dom", page], capture_output=True, text=True, timeout=120, env=env
    ).stdout
    assert len(re.findall(r'class="slice" data-job="[0-9a-f]{12}"', dom)) == 6
    assert dom.count("30 %") >= 6 and "2 queued" in dom
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", page], capture_output=True, timeout=120, env=env
    )
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("FLEXAI_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_bad_environment_is_refused_with_the_key(daemon: tuple[str, str]) -> None:
    url, token = daemon
    body = {"command": ["true"], "env": {"A=B": "x"}}
    answer = httpx.post(f"{url}/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 422 and "env key 'A=B'" in answer.text
