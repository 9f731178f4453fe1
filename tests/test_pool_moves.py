"""The pool carries out the Hi Scheduler's moves (defragmentation by bounded migration): a moved job is stopped as a
victim is (SIGTERM, grace, SIGKILL) and started again on its target slice with the target's environment, keeping
its id; the job that waited for the hole starts once the moved job is gone. Never a ``high`` job; nothing with
``defrag_max_moves = 0``; a daemon killed mid-move starts the job on its target. In-process, on sim devices.

The fragmented layout: two 50 % jobs on different devices of ``sim:2xA100-80GB``, made by packing a filler beside
the first one (best fit), placing the second on the other device, and cancelling the filler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flexai.hi import HiConfig
from flexai.local.config import ConfigError, parse_config
from flexai.local.pool import JobSubmission, Pool, PoolConfig
from flexai.local.procfs import processes_of
from flexai.node.devices import discover
from tests.pool_helpers import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(tmp_path: Path, moves: int, clock: FakeClock | None = None, **config: object) -> Pool:
    backend, devices = discover("sim:2xA100-80GB")
    hi = HiConfig(normal_min_runtime_s=0, defrag_max_moves=moves, defrag_retry_s=0)
    pool_config = PoolConfig(policy="bestfit", hi=hi, timeshare=False, **config)  # type: ignore[arg-type]
    return Pool(tmp_path / "state", backend, devices, pool_config, clock=clock or FakeClock())


def command(tmp_path: Path, n: int, ignore_sigterm: bool = False) -> list[str]:
    """Writes its devices (the sim visibility variable) each time it starts; runs until ``release-N`` exists."""
    release = tmp_path / f"release-{n}"
    code = "import os, signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += (
        "print('start', os.environ.get('FLEXAI_SIM_VISIBLE_DEVICES'), os.environ.get('FLEXAI_JOB_ID'), flush=True)\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.02)\n"
    )
    return [sys.executable, "-c", code]


def submit(pool: Pool, tmp_path: Path, n: int, share: int, cls: str = "normal", **extra: object) -> str:
    ignore = bool(extra.pop("ignore_sigterm", False))
    sub = JobSubmission(command(tmp_path, n, ignore), share_milli=share, priority_class=cls, name=f"job{n}", **extra)  # type: ignore[arg-type]
    return pool.submit(sub).id


def state(pool: Pool, job_id: str) -> str:
    return pool.store.job(job_id).state  # type: ignore[union-attr]


def device(pool: Pool, job_id: str) -> int:
    return int(pool.store.job(job_id).slices[0]["device"])  # type: ignore[index,union-attr]


def starts(pool: Pool, job_id: str) -> list[str]:
    path = pool.log_path(job_id)
    return [line for line in path.read_text().splitlines() if line.startswith("start")] if path.exists() else []


def fragment(pool: Pool, tmp_path: Path, cls: tuple[str, str] = ("normal", "normal")) -> tuple[str, str]:
    """Two 50 % jobs alone on the two devices."""
    first = submit(pool, tmp_path, 0, 500, cls[0])
    filler = submit(pool, tmp_path, 9, 500, "normal")
    pool.tick()
    second = submit(pool, tmp_path, 1, 500, cls[1])
    pool.tick()
    assert device(pool, first) == device(pool, filler) != device(pool, second)
    pool.cancel(filler)
    wait_for(lambda: all(len(starts(pool, j)) == 1 for j in (first, second)))
    return first, second


def drain(pool: Pool, tmp_path: Path) -> None:
    pool.resume_all()
    for n in range(10):
        (tmp_path / f"release-{n}").touch()
    wait_for(lambda: not pool.store.jobs(("running", "queued", "preempted")), pool.tick, 30)


def test_one_job_moves_and_the_whole_device_job_starts(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, moves=1)
    try:
        a, b = fragment(pool, tmp_path)
        where = {a: device(pool, a), b: device(pool, b)}
        big = submit(pool, tmp_path, 2, 1000)
        pool.tick()
        moved = [j for j in (a, b) if any(e.kind == "moved" and e.job_id == j for e in pool.store.events())]
        assert len(moved) == 1
        job = moved[0]
        stayed = b if job == a else a
        reason = pool.job_view(pool.store.job(job))["reason"]  # type: ignore[arg-type]
        assert reason.startswith(
            f"moved from device {where[job]} to device {where[stayed]} to open a hole for job2 ({big}); stopping"
        ), reason
        assert pool.store.job(job).moving_from[0]["device"] == where[job]  # type: ignore[index,union-attr]
        wait_for(lambda: state(pool, big) == "running" and len(starts(pool, job)) == 2, pool.tick, 5)
        # Same id, started again on the other device with that device's environment; the big job on the hole.
        assert device(pool, job) == where[stayed] and device(pool, big) == where[job]
        assert starts(pool, job) == [f"start {where[job]} {job}", f"start {where[stayed]} {job}"]
        assert starts(pool, stayed) == [f"start {where[stayed]} {stayed}"]
        record = pool.store.job(job)
        assert record.state == "running" and record.moving_from is None  # type: ignore[union-attr]
        assert record.reason.startswith(f"moved from device {where[job]} to device {where[stayed]}")  # type: ignore[union-attr]
        kinds = [e.kind for e in pool.store.events() if e.job_id == job]
        assert kinds == ["submitted", "started", "moved", "restarted"]
        assert pool.state.grants[job].device_indices == pool.state.grants[stayed].device_indices
        assert not any(e.kind == "killed" for e in pool.store.events())
    finally:
        drain(pool, tmp_path)


def test_without_moves_the_whole_device_job_waits(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, moves=0)
    try:
        a, b = fragment(pool, tmp_path)
        big = submit(pool, tmp_path, 2, 1000)
        for _ in range(3):
            pool.tick()
        assert state(pool, big) == "queued" and not any(e.kind == "moved" for e in pool.store.events())
        assert len(starts(pool, a)) == len(starts(pool, b)) == 1
    finally:
        drain(pool, tmp_path)


def test_a_high_job_is_never_moved(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, moves=1)
    try:
        a, b = fragment(pool, tmp_path, ("high", "high"))
        big = submit(pool, tmp_path, 2, 1000)
        for _ in range(3):
            pool.tick()
        assert state(pool, big) == "queued" and not any(e.kind == "moved" for e in pool.store.events())
        assert len(starts(pool, a)) == len(starts(pool, b)) == 1
    finally:
        drain(pool, tmp_path)


def test_kill_9_mid_move_starts_the_job_on_its_target(tmp_path: Path) -> None:
    first = make_pool(tmp_path, moves=1)
    a = submit(first, tmp_path, 0, 500, ignore_sigterm=True)  # the moved one will be a or b; both are stubborn
    filler = submit(first, tmp_path, 9, 500)
    first.tick()
    b = submit(first, tmp_path, 1, 500, ignore_sigterm=True)
    first.tick()
    first.cancel(filler)
    wait_for(lambda: all(len(starts(first, j)) == 1 for j in (a, b)))
    big = submit(first, tmp_path, 2, 1000)
    first.tick()
    job = next(j for j in (a, b) if first.store.job(j).moving_from is not None)  # type: ignore[union-attr]
    old = first.store.job(job)
    assert old is not None and old.moving_from is not None and old.slices is not None
    source, target = old.moving_from[0]["device"], old.slices[0]["device"]
    # The daemon dies mid-move (its SIGTERM ignored): a new one must stop the old run and start it on its target.
    clock = FakeClock()
    second = make_pool(tmp_path, moves=1, clock=clock, preemption_grace_s=5)
    try:
        assert second.state.grants[job].device_indices == (target,)
        second.tick()
        assert state(second, big) == "queued"  # the old run still holds its slice: the big job waits for it
        assert processes_of(old.pid)  # type: ignore[arg-type]
        clock.now += 5  # the grace ends: SIGKILL
        wait_for(lambda: len(starts(second, job)) == 2 and state(second, big) == "running", second.tick, 5)
        assert starts(second, job)[1] == f"start {target} {job}"
        assert device(second, big) == source
        assert second.store.job(job).moving_from is None  # type: ignore[union-attr]
        assert not [p for p, st in processes_of(old.pid) if st != "Z"]  # type: ignore[arg-type]
        assert "~leaving" not in "".join(second.state.grants)
    finally:
        drain(second, tmp_path)


def test_kill_9_after_the_old_run_stopped_starts_it_on_its_target(tmp_path: Path) -> None:
    first = make_pool(tmp_path, moves=1)
    a, b = fragment(first, tmp_path)
    submit(first, tmp_path, 2, 1000)
    first.tick()
    job = next(j for j in (a, b) if first.store.job(j).moving_from is not None)  # type: ignore[union-attr]
    target = first.store.job(job).slices[0]["device"]  # type: ignore[index,union-attr]
    pid = first.store.job(job).pid  # type: ignore[union-attr]
    wait_for(lambda: not [p for p, st in processes_of(pid) if st != "Z"])  # type: ignore[arg-type]
    # Dies before it noticed: the store still says "moving" with the old (dead) pid.
    second = make_pool(tmp_path, moves=1)
    try:
        wait_for(lambda: len(starts(second, job)) == 2, second.tick, 5)
        assert starts(second, job)[1] == f"start {target} {job}"
        assert [e.kind for e in second.store.events() if e.job_id == job][-1] == "restarted"
    finally:
        drain(second, tmp_path)


def test_cancel_a_moving_job(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = make_pool(tmp_path, moves=1, clock=clock)
    try:
        a = submit(pool, tmp_path, 0, 500, ignore_sigterm=True)
        filler = submit(pool, tmp_path, 9, 500)
        pool.tick()
        b = submit(pool, tmp_path, 1, 500, ignore_sigterm=True)
        pool.tick()
        pool.cancel(filler)
        wait_for(lambda: all(len(starts(pool, j)) == 1 for j in (a, b)))
        big = submit(pool, tmp_path, 2, 1000)
        pool.tick()
        job = next(j for j in (a, b) if pool.store.job(j).moving_from is not None)  # type: ignore[union-attr]
        assert pool.cancel(job).state == "cancelled"
        wait_for(lambda: state(pool, big) == "running", pool.tick, 5)
        assert set(pool.state.grants) == {big, b if job == a else a}
    finally:
        drain(pool, tmp_path)


def test_the_config_file_sets_moves() -> None:
    settings = parse_config("[hi]\ndefrag_max_moves = 2\nconsolidation_interval_s = 300\ndefrag_retry_s = 5\n")
    hi = settings.hi
    assert (hi.defrag_max_moves, hi.consolidation_interval_s, hi.defrag_retry_s) == (2, 300, 5)
    assert parse_config("").hi.defrag_max_moves == 0
    with pytest.raises(ConfigError, match=r"^hi.defrag_max_moves=1001 is not allowed: a number of moves in 0..1000"):
        parse_config("[hi]\ndefrag_max_moves = 1001\n")
    with pytest.raises(ConfigError, match=r"^hi.consolidation_interval_s=-1 is not allowed: seconds in 0..1e9$"):
        parse_config("[hi]\nconsolidation_interval_s = -1\n")
