"""The pool's client commands in-process (the API through a test client, no daemon, no job process): data on
stdout, every error on stderr in one line, exit 2 for bad input and 1 for an unreachable or failing daemon,
dynamic text printed verbatim, the whole log, the newest events."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import flexai.cli.pool_cmds as pool_cmds
from flexai.cli.main import app
from flexai.local.api import create_app
from flexai.local.pool import Pool
from flexai.local.store import JobRecord
from tests.pool_helpers import no_process_pool

TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return no_process_pool(tmp_path)


@pytest.fixture
def connect(pool: Pool, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Point the CLI's client at the pool's API in this process; ``connect(token=..., sent=...)`` to choose the
    daemon's token and the one the client sends."""

    def use(token: str | None = None, sent: str | None = None) -> TestClient:
        headers = {"Authorization": f"Bearer {sent}"} if sent else {}
        client = TestClient(create_app(pool, threading.RLock(), token), raise_server_exceptions=False, headers=headers)

        def init(self: pool_cmds.PoolClient, state: Path) -> None:
            self.where = "http://testserver"
            self.http = client

        monkeypatch.setattr(pool_cmds.PoolClient, "__init__", init)
        return client

    use()
    return use


def flexai(*args: str):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def add_job(pool: Pool, name: str = "train", state: str = "succeeded", reason: str = "") -> JobRecord:
    job = JobRecord(
        id=f"{pool.store.job_count():012x}",
        name=name,
        command=["true"],
        cwd="/",
        env={},
        device_count=1,
        share_milli=300,
        memory_mib=0,
        model="",
        priority=0,
    )
    pool.store.insert_job(job, "queued")
    pool.store.update_job(job.id, state=state, reason=reason)
    return job


def one_error_line(result, code: int, *parts: str) -> None:  # noqa: ANN001
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""  # `id=$(flexai run ...)` never captures an error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- errors
def test_no_daemon_is_exit_1_on_stderr(tmp_path: Path) -> None:
    one_error_line(flexai("run", "--state", str(tmp_path), "--", "true"), 1, "no pool daemon at")
    one_error_line(flexai("ps", "--state", str(tmp_path)), 1, "no pool daemon at")


def test_unreachable_daemon_is_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flexai.sock").touch()  # a socket file nobody listens on
    one_error_line(flexai("ps", "--state", str(tmp_path)), 1, "cannot reach the pool daemon")


def test_a_refused_request_is_exit_2(connect) -> None:  # noqa: ANN001
    one_error_line(flexai("run", "--share", "35%", "--", "true"), 2, "share=350m is not allowed")
    one_error_line(flexai("run", "--priority", str(2**63), "--", "true"), 2, "priority=", "less than or equal to")
    one_error_line(flexai("logs", "nope"), 2, "job 'nope' not found")
    one_error_line(flexai("cancel", "nope"), 2, "job 'nope' not found")


def test_a_wrong_token_is_exit_2(connect) -> None:  # noqa: ANN001
    connect(token=TOKEN, sent="wrong-token-0123456789")
    one_error_line(flexai("ps"), 2, "refused the token", "FLEXAI_TOKEN_FILE")
    connect(token=TOKEN, sent=TOKEN)
    assert flexai("ps").exit_code == 0


def test_a_server_error_is_exit_1(connect, pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    def broken() -> dict[str, object]:
        raise RuntimeError("the device library crashed")

    monkeypatch.setattr(pool, "pool_view", broken)
    one_error_line(flexai("pool"), 1, "the pool daemon at http://testserver failed (500)")


def test_bad_input_is_refused_before_submitting(connect, pool: Pool) -> None:  # noqa: ANN001
    one_error_line(flexai("run"), 2, "command=[] is not allowed")
    one_error_line(flexai("run", "--"), 2, "command=[] is not allowed")
    one_error_line(flexai("run", "--", ""), 2, "command=[] is not allowed")
    one_error_line(flexai("run", "--", "echo", "caf\udce9"), 2, "command[1]=", "valid UTF-8")
    one_error_line(flexai("run", "--share", "[bold]30%", "--", "true"), 2, "--share='[bold]30%' is not allowed")
    one_error_line(flexai("events", "--since", "yesterday"), 2, "--since='yesterday' is not allowed")
    one_error_line(flexai("events", "--limit", "0"), 2, "--limit=0 is not allowed: 1..10000")
    assert pool.store.job_count() == 0


def test_run_prints_only_the_job_id(connect, pool: Pool) -> None:  # noqa: ANN001
    result = flexai("run", "--share", "30%", "--name", "x[nvidia]", "--", "true")
    assert result.exit_code == 0 and result.stderr == ""
    job = pool.store.job(result.stdout.strip())
    assert job is not None and job.name == "x[nvidia]" and job.command == ["true"]


# ---------------------------------------------------------------------------------------------- verbatim text
def test_dynamic_text_is_printed_verbatim(connect, pool: Pool) -> None:  # noqa: ANN001
    job = add_job(pool, "pip install 'flexai[nvidia]'", "failed", "csv line 100 :100: [red]bad[/red]")
    pool.store.event(job.id, "note", "look at :smile: and [bold]this[/bold]")
    listing = flexai("ps").stdout
    assert "pip install 'flexai[nvidia]'" in listing and ":100:" in listing and "[red]bad[/red]" in listing
    events = flexai("events").stdout
    assert ":smile:" in events and "[bold]this[/bold]" in events
    assert f"{job.id} failed" in flexai("cancel", job.id).stdout


# ---------------------------------------------------------------------------------------------- logs
def test_logs_returns_the_whole_log(connect, pool: Pool) -> None:  # noqa: ANN001
    job = add_job(pool)
    lines = b"".join(b"step %07d loss 0.%06d\n" % (n, n) for n in range(160_000))
    assert len(lines) > 3 * 1024 * 1024
    pool.log_path(job.id).write_bytes(lines)
    result = flexai("logs", job.id)
    assert result.exit_code == 0 and result.stdout_bytes == lines


def test_logs_follow_prints_what_comes_until_the_job_ends(
    connect,
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    job = add_job(pool, state="running")
    log = pool.log_path(job.id)
    log.write_bytes(b"first\n")
    polls = []

    def next_poll(seconds: float) -> None:  # the job goes on between two polls (no wall-clock wait)
        polls.append(seconds)
        with log.open("ab") as fh:
            fh.write(b"more %d\n" % len(polls) + b"x" * 700_000 + b"\n")
        if len(polls) == 3:
            pool.store.update_job(job.id, state="succeeded", exit_code=0)

    monkeypatch.setattr(pool_cmds.time, "sleep", next_poll)
    result = flexai("logs", "-f", job.id)
    assert result.exit_code == 0 and len(polls) == 3
    assert result.stdout_bytes == log.read_bytes() and result.stdout_bytes.startswith(b"first\nmore 1\n")


# ---------------------------------------------------------------------------------------------- events
def test_events_shows_the_newest_and_takes_since_and_limit(connect, pool: Pool) -> None:  # noqa: ANN001
    with pool.store.tx() as db:  # one transaction: 1,200 fsyncs would take seconds
        for n in range(1200):
            pool.store._event(db, None, "note", f"event {n}")
    with pool.store.tx() as db:  # the first 600 happened two hours ago
        db.execute("UPDATE events SET ts = ts - 7200 WHERE id < (SELECT MIN(id) FROM events) + 600")
    newest = json.loads(flexai("events", "--json").stdout)
    assert len(newest) == 100 and newest[-1]["message"] == "event 1199" and newest[0]["message"] == "event 1100"
    assert [e["message"] for e in json.loads(flexai("events", "--json", "--limit", "2").stdout)] == [
        "event 1198",
        "event 1199",
    ]
    recent = json.loads(flexai("events", "--json", "--since", "10m", "--limit", "10000").stdout)
    assert len(recent) == 600 and recent[0]["message"] == "event 600"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 600))
    assert json.loads(flexai("events", "--json", "--since", iso, "--limit", "10000").stdout) == recent
    assert "event 1199" in flexai("events", "--limit", "1").stdout


@pytest.mark.parametrize(
    ("value", "seconds_ago"), [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5h", 5400)]
)
def test_since_takes_a_duration(value: str, seconds_ago: int) -> None:
    assert pool_cmds.parse_since(value, now=1_000_000.0) == 1_000_000.0 - seconds_ago


def test_since_takes_an_iso_time() -> None:
    assert pool_cmds.parse_since("2025-06-01T12:00:00+00:00") == 1748779200.0


# ---------------------------------------------------------------------------------------------- leases in ps
def test_ps_shows_a_lease_and_its_client_beside_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {
        "device_count": 1,
        "share_milli": 500,
        "memory_mib": 0,
        "priority": 0,
        "priority_class": "normal",
        "queue": "default",
        "state": "running",
        "slices": [{"device": 0}],
        "reason": "",
    }
    listed = [
        {**base, "id": "a" * 12, "name": "train", "kind": "job"},
        {
            **base,
            "id": "b" * 12,
            "name": "lease@10.0.0.7",
            "kind": "lease",
            "lease": {
                "id": "L1",
                "state": "ready",
                "client": "10.0.0.7:51234",
                "calls": 12,
                "bytes_in": 1,
                "bytes_out": 2,
            },
        },
        {**base, "id": "c" * 12, "name": "lease@local", "kind": "lease", "lease": {"client": "", "calls": 0}},
        {**base, "id": "d" * 12, "name": "old"},  # a daemon without leases: no kind
    ]
    monkeypatch.setattr(pool_cmds.PoolClient, "__init__", lambda self, state: None)
    monkeypatch.setattr(pool_cmds.PoolClient, "call", lambda self, method, path, *a, **k: listed)
    monkeypatch.setattr(pool_cmds.out, "width", 250)  # one line per row
    result = CliRunner().invoke(app, ["ps"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines() if "│" in line
    }
    assert rows["a" * 12] == "train" and rows["d" * 12] == "old"
    assert rows["b" * 12] == "lease@10.0.0.7 (lease, client 10.0.0.7:51234, 12 calls)"
    assert rows["c" * 12] == "lease@local (lease, no client yet)"
