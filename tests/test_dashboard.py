"""The pool daemon on TCP with a bearer token, and its dashboard: no script from data (escaping, a strict
Content-Security-Policy, the token out of the URL), live use per slice; rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from flexai.local.api import CONTENT_SECURITY_POLICY, create_app
from flexai.local.pool import Pool
from flexai.local.store import JobRecord
from flexai.node.devices import discover
from tests.pool_helpers import gated_command, wait_for

HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">"

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
    "--window-size=1100,700",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One daemon for this module's tests (only the dashboard test submits jobs); its folder holds the jobs'
    release files."""
    tmp_path = tmp_path_factory.mktemp("daemon")
    token = "t0ken-for-tests-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    port = free_port()
    state = tmp_path / "state"
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115
    # What the sim devices report as used: written by the test once it knows its jobs' pids.
    (tmp_path / "memory.json").write_text("{}")
    (tmp_path / "busy.json").write_text(json.dumps({"0": 96, "1": 58}))
    env = {
        **os.environ,
        "FLEXAI_SIM_MEMORY_FILE": str(tmp_path / "memory.json"),
        "FLEXAI_SIM_UTILISATION_FILE": str(tmp_path / "busy.json"),
    }
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
        env=env,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout_s=30)
    yield url, token, tmp_path
    for n in range(10):
        (tmp_path / f"release-{n}").touch()
    process.terminate()
    process.wait(timeout=20)


def test_tcp_needs_the_bearer_token(daemon: tuple[str, str, Path]) -> None:
    url, token, _ = daemon
    assert httpx.get(f"{url}/api/v1/pool").status_code == 401
    assert httpx.get(f"{url}/api/v1/pool", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/api/v1/pool", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/api/v1/jobs" in spec["paths"] and "/api/v1/pool" in spec["paths"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_shows_every_slice(daemon: tuple[str, str, Path], tmp_path: Path) -> None:
    url, token, work = daemon
    headers = {"Authorization": f"Bearer {token}"}
    names = [HOSTILE_NAME, "train-[nvidia]", *(f"train-{n}" for n in range(2, 7)), "<b>queued-too</b>"]
    for n, name in enumerate(names):
        body = {
            "command": gated_command(work / f"release-{n}"),
            "share_milli": 300,
            "memory_mib": 10240,
            "name": name,
            "cwd": str(tmp_path),
        }
        assert httpx.post(f"{url}/api/v1/jobs", json=body, headers=headers).status_code == 201
    wait_for(lambda: httpx.get(f"{url}/api/v1/pool", headers=headers).json()["running"] == 6)
    # Each running job "uses" some device memory (the sim backend reads it from this file by pid).
    running = [j for j in httpx.get(f"{url}/api/v1/jobs", headers=headers).json() if j["state"] == "running"]
    usage = {str(j["pid"]): 2048 + 1024 * n for n, j in enumerate(running)}
    per_device: dict[str, dict[str, int]] = {"0": {}, "1": {}}
    for j in running:
        per_device[str(j["slices"][0]["device"])][str(j["pid"])] = usage[str(j["pid"])]
    (work / "memory.json").write_text(json.dumps(per_device))

    def use_shown() -> bool:
        view = httpx.get(f"{url}/api/v1/pool", headers=headers).json()
        return all(s["used_memory_mib"] for d in view["devices"] for s in d["slices"])

    wait_for(use_shown)
    view = httpx.get(f"{url}/api/v1/pool", headers=headers).json()
    assert [d["utilisation_pct"] for d in view["devices"]] == [96.0, 58.0]
    assert sorted(s["used_memory_mib"] for d in view["devices"] for s in d["slices"]) == sorted(usage.values())
    if os.environ.get("FLEXAI_DASHBOARD_SCREENSHOT"):
        time.sleep(4)  # a few points of history for the chart in the published picture
    page = f"{url}/#token={token}"
    env = {**os.environ, "HOME": str(tmp_path)}
    profile = ["--user-data-dir=" + str(tmp_path / "chromium")]
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *profile, "--dump-dom", page], capture_output=True, text=True, timeout=120, env=env
    ).stdout
    assert len(re.findall(r'class="slice(?: paused)?" data-job="[0-9a-f]{12}"', dom)) == 6
    assert dom.count("30 %") >= 6 and "2 queued" in dom
    assert dom.count("needs 30 % on one device; the most free on any device is 10 %") == 2  # why each waits
    assert "busy 96 %" in dom and "busy 58 %" in dom and "2.0 GiB / 10.0 GiB" in dom
    assert "allocated share" in dom and "50 %" in dom and "time (this machine" in dom  # legend and axes
    # The hostile names are shown as text: no element came from them and their script did not run.
    assert "<img" not in dom and "<b>queued" not in dom
    assert "&lt;img src=x onerror=" in dom and "&lt;b&gt;queued-too&lt;/b&gt;" in dom
    assert "train-[nvidia]" in dom and "pwned" not in dom.split("<body", 1)[0]
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", page], capture_output=True, timeout=120, env=env
    )
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("FLEXAI_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_bad_environment_is_refused_with_the_key(daemon: tuple[str, str, Path]) -> None:
    url, token, _ = daemon
    body = {"command": ["true"], "env": {"A=B": "x"}}
    answer = httpx.post(f"{url}/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 422 and "env key 'A=B'" in answer.text


def test_tcp_errors_reach_the_cli_on_stderr_with_exit_codes(daemon: tuple[str, str, Path], tmp_path: Path) -> None:
    url, token, _ = daemon
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-0123456789")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEXAI_")}

    def flexai(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "flexai", *args]
        return subprocess.run(command, capture_output=True, text=True, env={**base, **env}, timeout=60)

    refused = flexai("ps", FLEXAI_URL=url, FLEXAI_TOKEN_FILE=str(wrong))
    assert refused.returncode == 2 and refused.stdout == ""
    assert "refused the token" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    unreachable = flexai("run", "--", "true", FLEXAI_URL=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and unreachable.stdout == "" and "cannot reach" in unreachable.stderr


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.inline_handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.inline_handlers += [name for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    backend, devices = discover("sim:1xA100-80GB")
    pool = Pool(tmp_path / "state", backend, devices)
    hostile = JobRecord(
        id="0123456789ab",
        name=HOSTILE_NAME,
        command=["true"],
        cwd="/",
        env={},
        device_count=1,
        share_milli=300,
        memory_mib=0,
        model="",
        priority=0,
    )
    pool.store.insert_job(hostile, "queued")  # queued only: nothing runs in this test
    return TestClient(create_app(pool, threading.RLock(), "t0ken-for-tests-0123456789"))


def test_every_response_carries_the_content_security_policy(client: TestClient) -> None:
    auth = {"Authorization": "Bearer t0ken-for-tests-0123456789"}
    for path, headers in [("/", {}), ("/dashboard.js", {}), ("/api/v1/jobs", auth), ("/api/v1/pool", {}), ("/x", {})]:
        answer = client.get(path, headers=headers)
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert client.get("/dashboard.js").headers["content-type"].startswith("text/javascript")
    # The API gives the hostile name back as data (JSON); the page is what must not run it.
    assert client.get("/api/v1/jobs", headers=auth).json()[0]["name"] == HOSTILE_NAME


def test_the_page_has_no_inline_script_and_builds_no_markup_from_data(client: TestClient) -> None:
    page = _Scripts()
    page.feed(client.get("/").text)
    assert page.scripts == [({"src": "/dashboard.js", "defer": None}, "")]
    assert page.inline_handlers == []
    script = (resources.files("flexai.local") / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    # The token is read from the fragment once, then removed from the address bar and the history.
    assert "history.replaceState" in script and "localStorage" not in script and "sessionStorage" not in script
