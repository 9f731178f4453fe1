"""The pool carries out the Hi Scheduler's decisions: preemption (SIGTERM, grace, SIGKILL; the victim back in its
queue and restarted when it fits), the preemptor started only once its victims are gone, queues with guarantees
and borrowing, the reasons a waiting job shows, and recovery of all of it after the daemon dies. In-process, on
sim devices, with a fake clock for every wait the pool measures (the grace before SIGKILL)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from flexai.hi import HiConfig, QueueSpec, Quota
from flexai.local.pool import JobSubmission, Pool, PoolConfig, SubmitError
from flexai.local.procfs import process_state, processes_of
from flexai.node.devices import discover
from tests.pool_helpers import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(tmp_path: Path, spec: str = "1xA100-80GB", clock: FakeClock | None = None, **config: object) -> Pool:
    backend, devices = discover(f"sim:{spec}")
    return Pool(tmp_path / "state", backend, devices, PoolConfig(**config), clock=clock or FakeClock())  # type: ignore[arg-type]


def logged_command(release_file: Path, ignore_sigterm: bool = False) -> list[str]:
    """A job that writes 'start' each time it starts and runs until ``release_file`` exists (then 'done')."""
    code = "import os, signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += (
        "print('start', flush=True)\n"
        f"while not os.path.exists({str(release_file)!r}):\n    time.sleep(0.02)\nprint('done', flush=True)"
    )
    return [sys.executable, "-c", code]


def submit(pool: Pool, tmp_path: Path, n: int, share: int, cls: str, **extra: object) -> str:
    command = logged_command(tmp_path / f"release-{n}", bool(extra.pop("ignore_sigterm", False)))
    sub = JobSubmission(command, share_milli=share, priority_class=cls, name=f"{cls}{n}", **extra)  # type: ignore[arg-type]
    return pool.submit(sub).id


def state(pool: Pool, job_id: str) -> str:
    return pool.store.job(job_id).state  # type: ignore[union-attr]


def view(pool: Pool, job_id: str) -> dict[str, object]:
    return pool.job_view(pool.store.job(job_id))  # type: ignore[arg-type]


def log_lines(pool: Pool, job_id: str) -> list[str]:
    path = pool.log_path(job_id)
    return path.read_text().split() if path.exists() else []


def release_all(tmp_path: Path) -> None:
    for n in range(12):
        (tmp_path / f"release-{n}").touch()


def drain(pool: Pool, tmp_path: Path) -> None:
    pool.resume_all()
    release_all(tmp_path)
    wait_for(lambda: not pool.store.jobs(("running", "queued", "preempted")), pool.tick, 30)


def test_a_high_job_preempts_a_low_one_which_restarts_after_it(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    low = submit(pool, tmp_path, 0, 1000, "low")
    try:
        pool.tick()
        wait_for(lambda: log_lines(pool, low) == ["start"])
        high = submit(pool, tmp_path, 1, 600, "high")
        asked = time.monotonic()
        pool.tick()
        # Hi decided: the low job gets SIGTERM now; the high job's slice is held for it until the low job is gone.
        assert state(pool, low) == "preempted"
        assert view(pool, low)["reason"].startswith(f"preempted by high1 ({high}) to free 100 % of GPU 0 on local/A100")
        assert state(pool, high) == "queued" and view(pool, high)["reason"].startswith(f"starting once {low} stopped")
        assert set(pool.state.grants) == {high}
        wait_for(lambda: state(pool, high) == "running", pool.tick)
        latency = time.monotonic() - asked
        assert latency < 2.0, latency
        low_view = view(pool, low)
        assert low_view["state"] == "preempted" and low_view["pid"] is None and low_view["slices"] is None
        assert low_view["reason"].endswith("; now needs 1 whole device on one node; at most 0 free on any node")
        kinds = [e.kind for e in pool.store.events() if e.job_id == low]
        assert kinds == ["submitted", "started", "preempted", "requeued"]
        assert pool.queue_view()[0]["pending"] == 1
        # The high job ends: the low job starts again by itself, its log goes on.
        (tmp_path / "release-1").touch()
        wait_for(lambda: state(pool, low) == "running", pool.tick)
        assert view(pool, low)["reason"] == "restarted after preemption"
        wait_for(lambda: log_lines(pool, low) == ["start", "start"])
        (tmp_path / "release-0").touch()
        wait_for(lambda: state(pool, low) == "succeeded", pool.tick)
        assert log_lines(pool, low) == ["start", "start", "done"]
        assert [e.kind for e in pool.store.events() if e.job_id == low][-2:] == ["restarted", "succeeded"]
    finally:
        drain(pool, tmp_path)


def test_a_victim_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = make_pool(tmp_path, clock=clock, preemption_grace_s=10)
    stubborn = submit(pool, tmp_path, 0, 1000, "low", ignore_sigterm=True)
    try:
        pool.tick()
        wait_for(lambda: log_lines(pool, stubborn) == ["start"])
        shim = pool.store.job(stubborn).pid
        high = submit(pool, tmp_path, 1, 1000, "high")
        for _ in range(10):  # SIGTERM changes nothing: the high job waits, its slice held
            pool.tick()
            time.sleep(0.02)
        assert processes_of(shim) and state(pool, high) == "queued"
        assert view(pool, stubborn)["reason"].endswith("; stopping")
        clock.now += 10
        wait_for(lambda: state(pool, high) == "running", pool.tick)
        assert any(e.kind == "killed" and e.job_id == stubborn for e in pool.store.events())
        assert not [p for p, st in processes_of(shim) if st != "Z"]
    finally:
        drain(pool, tmp_path)


def test_a_paused_victim_is_resumed_to_stop(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, timeslice_period_s=0.2)  # a sim device cannot tell how busy it is: sliced
    lows = [submit(pool, tmp_path, n, 500, "low") for n in range(2)]
    try:
        pool.tick()
        wait_for(lambda: all(pool.job_group(j) for j in lows))
        groups = [pool.job_group(j) for j in lows]
        wait_for(lambda: "T" in {process_state(g) for g in groups}, pool.timeslice)  # the slicer is at work
        high = submit(pool, tmp_path, 2, 1000, "high")
        wait_for(lambda: state(pool, high) == "running", pool.tick, 5)  # well within the grace: SIGTERM did it
        assert {state(pool, j) for j in lows} == {"preempted"}
        assert not any(e.kind == "killed" for e in pool.store.events())
    finally:
        drain(pool, tmp_path)


def test_kill_9_after_the_preemption_loses_nothing(tmp_path: Path) -> None:
    first = make_pool(tmp_path)
    low = submit(first, tmp_path, 0, 1000, "low")
    first.tick()
    wait_for(lambda: log_lines(first, low) == ["start"])
    high = submit(first, tmp_path, 1, 600, "high")
    wait_for(lambda: state(first, high) == "running", first.tick)
    high_pid = first.store.job(high).pid
    # The daemon dies without a word (as with kill -9): a new one starts on the same state.
    second = make_pool(tmp_path)
    try:
        assert state(second, high) == "running" and second.store.job(high).pid == high_pid  # re-adopted
        assert state(second, low) == "preempted" and low in second.hi.pending  # waits again, in its old place
        assert set(second.state.grants) == {high}
        second.tick()
        assert state(second, low) == "preempted"  # nothing granted twice
        assert view(second, low)["reason"].startswith(f"preempted by high1 ({high})")
        (tmp_path / "release-1").touch()
        wait_for(lambda: state(second, low) == "running", second.tick)
    finally:
        drain(second, tmp_path)
    assert log_lines(second, low) == ["start", "start", "done"]


def test_kill_9_while_the_victim_is_stopping_holds_its_slice_until_it_is_gone(tmp_path: Path) -> None:
    first = make_pool(tmp_path)
    stubborn = submit(first, tmp_path, 0, 1000, "low", ignore_sigterm=True)
    first.tick()
    wait_for(lambda: log_lines(first, stubborn) == ["start"])
    high = submit(first, tmp_path, 1, 1000, "high")
    first.tick()
    assert state(first, stubborn) == "preempted" and state(first, high) == "queued"
    clock = FakeClock()
    second = make_pool(tmp_path, clock=clock, preemption_grace_s=5)
    try:
        # The victim still runs: it keeps its slice and is stopped again; the high job waits for it.
        assert set(second.state.grants) == {stubborn}
        for _ in range(5):
            second.tick()
        assert state(second, high) == "queued" and set(second.state.grants) == {high}
        assert view(second, high)["reason"].startswith(f"starting once {stubborn} stopped")
        clock.now += 5
        wait_for(lambda: state(second, high) == "running", second.tick)
        assert state(second, stubborn) == "preempted" and stubborn in second.hi.pending
    finally:
        drain(second, tmp_path)
    assert state(second, stubborn) == "succeeded"


def test_cancel_a_preempted_job_and_a_preemptor_waiting_for_its_victim(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = make_pool(tmp_path, clock=clock)
    stubborn = submit(pool, tmp_path, 0, 1000, "low", ignore_sigterm=True)
    try:
        pool.tick()
        wait_for(lambda: log_lines(pool, stubborn) == ["start"])
        high = submit(pool, tmp_path, 1, 1000, "high")
        pool.tick()
        assert pool.cancel(high).state == "cancelled"  # its held slice goes back
        assert pool.state.grants == {}
        assert pool.cancel(stubborn).state == "cancelled"  # no grace left to wait for
        pool.tick()
        assert pool.state.grants == {} and not pool.hi.pending and not pool.hi.stopping
    finally:
        drain(pool, tmp_path)


def test_borrowed_devices_go_back_to_their_queue(tmp_path: Path) -> None:
    queues = (
        QueueSpec("a", guarantee=Quota(share_milli={"*": 1000}), borrowing_limit=Quota(share_milli={"*": 1000})),
        QueueSpec("b", guarantee=Quota(share_milli={"*": 1000})),
    )
    pool = make_pool(tmp_path, "2xA100-80GB", hi=HiConfig(normal_min_runtime_s=0), queues=queues)
    try:
        a = [submit(pool, tmp_path, n, 1000, "normal", queue="a") for n in range(3)]
        pool.tick()
        assert [state(pool, j) for j in a] == ["running", "running", "queued"]  # b's idle device is borrowed
        assert view(pool, a[2])["reason"] == (
            "waits for queue a's quota: 2.0 devices in use, 1.0 guaranteed, limit 2.0"
        )
        b = submit(pool, tmp_path, 3, 1000, "normal", queue="b")
        wait_for(lambda: state(pool, b) == "running", pool.tick)
        preempted = [j for j in a if state(pool, j) == "preempted"]
        assert len(preempted) == 1 and view(pool, preempted[0])["reason"].startswith(f"preempted by normal3 ({b})")
        rows = {q["queue"]: q for q in pool.queue_view()}
        assert rows["a"]["used_share_milli"] == 1000 and rows["a"]["pending"] == 2
        assert rows["b"]["used_share_milli"] == 1000 and rows["b"]["borrowed_share_milli"] == 0
        with pytest.raises(SubmitError, match=r"queue='c' is not allowed: a, b, default"):
            submit(pool, tmp_path, 4, 1000, "normal", queue="c")
    finally:
        drain(pool, tmp_path)


def test_normal_work_is_protected_for_its_minimum_runtime(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = make_pool(tmp_path, clock=clock, hi=HiConfig(normal_min_runtime_s=60))
    normal = submit(pool, tmp_path, 0, 1000, "normal")
    try:
        pool.tick()
        high = submit(pool, tmp_path, 1, 500, "high")
        pool.tick()
        assert state(pool, normal) == "running" and state(pool, high) == "queued"
        assert view(pool, high)["reason"] == (
            "needs 50 % on one device; the most free on any device is 0 %; no lower-class work that may be "
            "preempted opens a hole for it"
        )
        clock.now += 61
        wait_for(lambda: state(pool, high) == "running", pool.tick)
        assert state(pool, normal) == "preempted"
    finally:
        drain(pool, tmp_path)


def test_a_state_of_schema_1_is_read_with_every_job_normal_in_the_default_queue(tmp_path: Path) -> None:
    import sqlite3

    from flexai.local.store import Store

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, name TEXT NOT NULL,"
        " command TEXT NOT NULL, cwd TEXT NOT NULL, env TEXT NOT NULL, device_count INTEGER NOT NULL,"
        " share_milli INTEGER NOT NULL, memory_mib INTEGER NOT NULL, model TEXT NOT NULL, priority INTEGER NOT NULL,"
        " state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', exit_code INTEGER, pid INTEGER, pid_start_ticks"
        " INTEGER, slices TEXT, submitted_at REAL NOT NULL, started_at REAL, ended_at REAL);"
        "INSERT INTO jobs (id, name, command, cwd, env, device_count, share_milli, memory_mib, model, priority, state,"
        " submitted_at) VALUES ('0123456789ab', 'old', '[\"true\"]', '/', '{}', 1, 300, 0, '', 3, 'queued', 1.0);"
    )
    db.commit()
    db.close()
    job = Store(path).job("0123456789ab")
    assert job is not None and (job.priority_class, job.queue, job.priority) == ("normal", "default", 3)
