"""Remote XPU through the embedded pool: `flexai serve --remote-listen ... --allow ...`, a lease requested with
the pool's token, its worker run as a job of kind `lease` in the granted slice, the slice back when the client
is gone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from flexai.remote import AuthError, LeaseRefusedError, NotAllowedError, connect, lease
from tests.pool_helpers import wait_for
from tests.test_remote_support import REPO, certs  # noqa: F401  (fixture)

TOKEN = "pool-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, certs):  # noqa: ANN201, F811
    """One daemon for the module (starting one costs seconds on a small machine)."""
    cert, key = certs
    tmp_path = tmp_path_factory.mktemp("pool")
    state = tmp_path / "state"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    api_port, remote_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLEXAI_LEASE_TTL_S": "1"}
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [sys.executable, "-m", "flexai", "serve", "--devices", "sim:1xA100-80GB", "--state", str(state),
         "--listen", f"127.0.0.1:{api_port}", "--token-file", str(token_file),
         "--remote-listen", f"127.0.0.1:{remote_port}", "--tls-cert", cert, "--tls-key", key,
         "--allow", "tests.test_remote_support:*"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
    )  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def answers() -> bool:
        try:
            return http.get("/api/v1/pool").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout_s=30)
        yield {"url": url, "token_file": str(token_file), "ca": cert, "http": http, "state": state}
    finally:
        http.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        for job in (state / "leases").glob("*.stats"):  # workers outlive a daemon by design: end them here
            import json

            pid = json.loads(job.read_text()).get("pid")
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_lease_through_the_pool_runs_as_a_job_and_frees_its_slice(pool, monkeypatch) -> None:
    http = pool["http"]
    monkeypatch.delenv("FLEXAI_STATE", raising=False)
    with lease(share="10%", memory="1GiB", url=pool["url"], token_file=pool["token_file"], ca=pool["ca"]) as xpu:
        assert xpu.info["tcp_port"] and xpu.session.sock.family.name == "AF_UNIX"  # co-located: unix socket
        net = xpu.create("tests.test_remote_support:build", scale=2.0)
        assert net(np.ones(3, np.float32)).tolist() == [2.0, 2.0, 2.0]
        with pytest.raises(NotAllowedError):
            xpu.create("os:system", "true")
        # Across the network: the pool's gateway hands the TLS connection to the lease's worker.
        remote = connect(f"tls://127.0.0.1:{xpu.info['tcp_port']}", xpu.id, xpu.info["token"], ca=pool["ca"])
        assert remote.create("tests.test_remote_support:build")(np.ones(2)).tolist() == [1.0, 1.0]
        remote.close()
        jobs = http.get("/api/v1/jobs").json()
        (job,) = [j for j in jobs if j["kind"] == "lease"]
        assert job["state"] == "running" and job["share_milli"] == 100 and job["memory_mib"] == 1024
        wait_for(lambda: http.get(f"/api/v1/leases/{xpu.id}").json()["calls"] >= 3, timeout_s=5)
        shown = http.get("/api/v1/jobs").json()
        assert any(j.get("lease", {}).get("calls", 0) >= 3 for j in shown)
        free = http.get("/api/v1/pool").json()["devices"][0]["free_share_milli"]
        assert free == 900
        # A re-issued token makes the old one stale.
        fresh = http.post(f"/api/v1/leases/{xpu.id}/token").json()
        assert fresh["epoch"] == 2
        with pytest.raises(AuthError, match="stale"):
            connect(f"tls://127.0.0.1:{xpu.info['tcp_port']}", xpu.id, xpu.info["token"], ca=pool["ca"])
    wait_for(lambda: http.get("/api/v1/pool").json()["devices"][0]["free_share_milli"] == 1000, timeout_s=15)
    events = [e["message"] for e in http.get("/api/v1/events").json() if e["kind"] == "lease"]
    assert any("requested by" in m for m in events) and any("ended" in m for m in events)


def test_the_pool_refuses_a_lease_without_its_token_or_of_a_bad_size(pool, tmp_path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-pool-token-at-all")
    with pytest.raises(LeaseRefusedError, match="401"):
        lease(url=pool["url"], token_file=str(wrong), ca=pool["ca"])
    with pytest.raises(LeaseRefusedError, match="share_milli"):
        lease(share="200%", url=pool["url"], token_file=pool["token_file"], ca=pool["ca"])
    answer = pool["http"].post("/api/v1/leases", json={"share_milli": 100, "memory_mib": 1 << 20})
    assert answer.status_code == 400 and "memory" in answer.json()["detail"]


def test_a_lease_whose_client_is_gone_is_freed(pool) -> None:
    http = pool["http"]
    info = http.post("/api/v1/leases", json={"share_milli": 300}).json()
    wait_for(lambda: http.get(f"/api/v1/leases/{info['id']}").json()["state"] == "ready", timeout_s=20)
    session = connect(f"tls://127.0.0.1:{info['tcp_port']}", info["id"], info["token"], ca=pool["ca"])
    session.create("tests.test_remote_support:build")
    session.sock.shutdown(socket.SHUT_RDWR)  # the client vanishes (its heartbeats stop)
    start = time.monotonic()
    wait_for(lambda: http.get(f"/api/v1/leases/{info['id']}").json()["state"] == "ended", timeout_s=20)
    assert time.monotonic() - start < 15
    assert http.get("/api/v1/pool").json()["devices"][0]["free_share_milli"] == 1000
