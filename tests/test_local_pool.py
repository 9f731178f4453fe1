"""The embedded pool: placement of slices, the queue, refusals at submit, memory watchdog, time-slicing and
recovery after the daemon dies."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from flexai.local.daemon import lock_state
from flexai.local.pool import JobSubmission, Pool, PoolConfig, SubmitError
from flexai.local.procfs import process_state
from flexai.node.devices import discover
from tests.pool_helpers import busy_command, gated_command, group_cpu_seconds, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(tmp_path: Path, spec: str = "2xA100-80GB", **config: object) -> Pool:
    backend, devices = discover(f"sim:{spec}")
    return Pool(tmp_path / "state", backend, devices, PoolConfig(**config))  # type: ignore[arg-type]


def states(pool: Pool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in pool.store.jobs():
        counts[job.state] = counts.get(job.state, 0) + 1
    return counts


def release_all(tmp_path: Path) -> None:
    for n in range(20):
        (tmp_path / f"release-{n}").touch()


def test_eight_30pct_jobs_run_three_per_device_and_the_queue_moves(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    jobs = [
        pool.submit(JobSubmission(gated_command(tmp_path / f"release-{n}"), share_milli=300, memory_mib=10 * 1024))
        for n in range(8)
    ]
    try:
        pool.tick()
        assert states(pool) == {"running": 6, "queued": 2}
        view = pool.pool_view()
        assert [len(d["slices"]) for d in view["devices"]] == [3, 3]
        assert [d["free_share_milli"] for d in view["devices"]] == [100, 100]
        granted = {s["job"] for d in view["devices"] for s in d["slices"]}
        assert granted == {j.id for j in pool.store.jobs(("running",))}
        # One running job ends: the first queued job takes its slice.
        first_running = pool.store.jobs(("running",))[0]
        index = [j.id for j in jobs].index(first_running.id)
        (tmp_path / f"release-{index}").touch()
        wait_for(lambda: states(pool) == {"running": 6, "queued": 1, "succeeded": 1}, pool.tick)
        assert pool.store.job(jobs[6].id).state == "running"  # arrival order among equal priorities
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)
    assert pool.log_path(jobs[0].id).read_text().strip() == "done"


@pytest.mark.parametrize(
    ("submission", "message"),
    [
        ({"share_milli": 1100}, "share=1100m is not allowed: a multiple of 100m (10 %) from 100m to 1000m (100 %)"),
        ({"share_milli": 350}, "share=350m is not allowed: a multiple of 100m"),
        ({"memory_mib": 90 * 1024}, "memory=92160MiB is not allowed: 0..81920MiB"),
        ({"model": "H100"}, "model='H100' is not allowed: this pool has A100"),
        ({"count": 3}, "count=3 is not allowed: 1..2 devices of one model"),
        ({"count": 2, "share_milli": 500}, "share=500m is not allowed with count=2: 1000m per device"),
    ],
)
def test_bad_requests_are_refused_at_submit(tmp_path: Path, submission: dict[str, int | str], message: str) -> None:
    pool = make_pool(tmp_path)
    with pytest.raises(SubmitError) as info:
        pool.submit(JobSubmission(["true"], **submission))  # type: ignore[arg-type]
    assert message in str(info.value)
    assert pool.store.jobs() == []  # nothing half-accepted


def test_job_environment_carries_slices_visibility_and_limits(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    job = pool.submit(JobSubmission(["python3", "-c", code], share_milli=300, memory_mib=8192, env={"KEEP": "1"}))
    pool.tick()
    wait_for(lambda: pool.store.job(job.id).state == "succeeded", pool.tick)
    env = json.loads(out.read_text())
    slices = json.loads(env["FLEXAI_SLICES"])
    assert env["FLEXAI_JOB_ID"] == job.id and env["KEEP"] == "1"
    assert slices == [
        {"device": 0, "uuid": slices[0]["uuid"], "model": slices[0]["model"], "share_milli": 300, "memory_mib": 8192}
    ]
    assert env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "8192m" and env["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30" and env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"


def test_memory_watchdog_stops_only_the_job_over_its_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage_file = tmp_path / "usage.json"
    usage_file.write_text("{}")
    monkeypatch.setenv("FLEXAI_SIM_MEMORY_FILE", str(usage_file))
    clock = FakeClock()
    backend, devices = discover("sim:1xA100-80GB")
    pool = Pool(tmp_path / "state", backend, devices, PoolConfig(memory_grace_s=5), clock=clock)
    greedy = pool.submit(JobSubmission(gated_command(tmp_path / "release-0"), share_milli=500, memory_mib=1024))
    neighbour = pool.submit(JobSubmission(gated_command(tmp_path / "release-1"), share_milli=500, memory_mib=1024))
    try:
        pool.tick()
        pids = {j.id: j.pid for j in pool.store.jobs(("running",))}
        usage_file.write_text(json.dumps({str(pids[greedy.id]): 4096, str(pids[neighbour.id]): 512}))
        pool.tick()
        assert pool.store.job(greedy.id).state == "running"  # within its grace
        clock.now += 6
        pool.tick()
        stopped = pool.store.job(greedy.id)
        assert stopped.state == "stopped"
        assert "4096 MiB on device 0 over the quota of 1024 MiB" in stopped.reason
        assert pool.store.job(neighbour.id).state == "running"
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)


def test_time_slicing_gives_each_job_its_share_and_lends_idle_share(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "1xA100-80GB", timeslice_period_s=0.2)
    small = pool.submit(JobSubmission(busy_command(30), share_milli=300))
    large = pool.submit(JobSubmission(busy_command(30), share_milli=700))
    try:
        pool.tick()
        pids = {j.id: j.pid for j in pool.store.jobs(("running",))}
        start = {k: group_cpu_seconds(p) for k, p in pids.items()}
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            pool.timeslice()
            time.sleep(0.005)
        used = {k: group_cpu_seconds(p) - start[k] for k, p in pids.items()}
        fraction = used[small.id] / (used[small.id] + used[large.id])
        assert 0.25 <= fraction <= 0.35, used
    finally:
        pool.cancel(small.id)
        pool.cancel(large.id)
    # Alone on the device with lending on, a 30 % job is never paused.
    lone = pool.submit(JobSubmission(busy_command(30), share_milli=300))
    pool.tick()
    wait_for(lambda: pool.job_group(lone.id) is not None)
    group = pool.job_group(lone.id)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # (what it gets then depends on the machine's load, not on the pool)
        pool.timeslice()
        assert not pool._running[lone.id].stopped_by_slicer and process_state(group) != "T"
        time.sleep(0.005)
    pool.cancel(lone.id)


def test_restart_re_adopts_running_jobs_and_keeps_the_queue(tmp_path: Path) -> None:
    first = make_pool(tmp_path)
    jobs = [first.submit(JobSubmission(gated_command(tmp_path / f"release-{n}"), share_milli=500)) for n in range(10)]
    first.tick()
    assert states(first) == {"running": 4, "queued": 6}
    running = {j.id: j.slices for j in first.store.jobs(("running",))}
    # The daemon dies without a word (as with kill -9): a new one starts on the same state.
    second = make_pool(tmp_path)
    try:
        assert states(second) == {"running": 4, "queued": 6}
        assert {j.id: j.slices for j in second.store.jobs(("running",))} == running
        assert (second.state.free_share_milli >= 0).all()
        assert set(second.state.grants) == set(running)
        second.tick()
        assert states(second) == {"running": 4, "queued": 6}  # nothing granted twice
    finally:
        release_all(tmp_path)
        wait_for(lambda: not second.store.jobs(("running", "queued")), second.tick, 60)
    assert {second.store.job(j.id).state for j in jobs} == {"succeeded"}


def test_the_first_blocked_job_holds_its_devices_and_smaller_work_backfills_elsewhere(tmp_path: Path) -> None:
    clock = FakeClock()
    backend, devices = discover("sim:1xA100-80GB,1xT4-16GB")
    pool = Pool(tmp_path / "state", backend, devices, PoolConfig(), clock=clock)

    def job(n: int, share: int, model: str = "", name: str = "") -> str:
        command = gated_command(tmp_path / f"release-{n}")
        return pool.submit(JobSubmission(command, share_milli=share, model=model, name=name)).id

    running = job(0, 500, "A100")
    try:
        pool.tick()
        large, small, late = job(1, 1000, "A100", "large"), job(2, 300, "", "small"), job(3, 300, "A100", "late")
        pool.tick()
        # The large job cannot fit yet: it is first in line and holds the A100 (nothing starts there ahead of it,
        # however long it waits); the small job may run on the T4 meanwhile (backfill).
        assert [pool.store.job(j).state for j in (running, large, small, late)] == [
            "running",
            "queued",
            "running",
            "queued",
        ]
        assert pool.store.job(small).slices[0]["model"] == "T4"
        reasons = {j["id"]: j["reason"] for j in map(pool.job_view, pool.store.jobs())}
        assert reasons[large].startswith("needs 1 whole A100 on one node; at most 0 free")
        clock.now += 34
        pool.tick()
        assert pool.reason(pool.store.job(late)) == f"held behind large ({large}), first in line for 34 s"
        (tmp_path / "release-0").touch()
        wait_for(lambda: pool.store.job(large).state == "running", pool.tick)
        assert pool.store.job(late).state == "queued"
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)


def test_without_reservation_smaller_work_starts_ahead_of_a_blocked_job(tmp_path: Path) -> None:
    from flexai.hi import HiConfig

    backend, devices = discover("sim:1xA100-80GB")
    pool = Pool(tmp_path / "state", backend, devices, PoolConfig(hi=HiConfig(reservation=False)), clock=FakeClock())
    jobs = [
        pool.submit(JobSubmission(gated_command(tmp_path / f"release-{n}"), share_milli=share))
        for n, share in enumerate((500, 1000, 300))
    ]
    try:
        pool.tick()
        assert [pool.store.job(j.id).state for j in jobs] == ["running", "queued", "running"]
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)


def test_higher_priority_starts_first(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "1xA100-80GB")
    blocker = pool.submit(JobSubmission(gated_command(tmp_path / "release-0"), share_milli=1000))
    pool.tick()
    low = pool.submit(JobSubmission(gated_command(tmp_path / "release-1"), share_milli=1000, priority=0))
    high = pool.submit(JobSubmission(gated_command(tmp_path / "release-2"), share_milli=1000, priority=5))
    try:
        pool.tick()
        (tmp_path / "release-0").touch()
        wait_for(lambda: pool.store.job(blocker.id).state == "succeeded", pool.tick)
        assert pool.store.job(high.id).state == "running" and pool.store.job(low.id).state == "queued"
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)


@pytest.mark.parametrize(("utilisation_pct", "gated"), [(20.0, False), (95.0, True), (None, True)])
def test_jobs_are_time_sliced_only_while_the_device_is_contended(
    tmp_path: Path, utilisation_pct: float | None, gated: bool
) -> None:
    from dataclasses import replace

    from flexai.node.sim import SimBackend

    class Reporting(SimBackend):
        def devices(self):  # noqa: ANN202
            return [replace(d, utilisation_pct=utilisation_pct) for d in super().devices()]

    backend = Reporting("1xA100-80GB")
    pool = Pool(tmp_path / "state", backend, backend.devices(), PoolConfig(timeslice_period_s=0.2))
    jobs = [pool.submit(JobSubmission(busy_command(30), share_milli=s)) for s in (300, 700)]
    try:
        pool.tick()
        wait_for(lambda: all(pool.job_group(j.id) for j in jobs))
        shims = [pool.store.job(j.id).pid for j in jobs]
        paused = set()
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            pool.timeslice()
            paused |= {job_id for job_id, r in pool._running.items() if r.stopped_by_slicer}
            # The slicer pauses the command's group only: the shim stays free to resume it if the pool dies.
            assert {process_state(shim) for shim in shims} <= {"S", "R"}
            time.sleep(0.005)
        assert bool(paused) is gated
    finally:
        for job in jobs:
            pool.cancel(job.id)


def test_a_job_that_cannot_start_fails_alone_and_frees_its_slice(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "1xA100-80GB")
    broken = pool.submit(JobSubmission(["python3", "-c", "print(1)\x00"], share_milli=1000))
    nowhere = pool.submit(JobSubmission(["true"], share_milli=1000, cwd=str(tmp_path / "missing")))
    fine = pool.submit(JobSubmission(["true"], share_milli=1000))
    wait_for(lambda: pool.store.job(fine.id).state == "succeeded", pool.tick)
    for job in (broken, nowhere):
        record = pool.store.job(job.id)
        assert record.state == "failed" and record.reason.startswith("could not start:")
    assert pool.state.grants == {}


def test_recovery_requeues_a_start_that_never_happened_and_adopts_one_that_did(tmp_path: Path) -> None:
    first = make_pool(tmp_path, "1xA100-80GB")
    never = first.submit(JobSubmission(["true"], share_milli=500))
    started = first.submit(JobSubmission(gated_command(tmp_path / "release-0"), share_milli=500))
    slices = [{"device": 0, "uuid": first.devices[0].uuid, "model": "A100", "share_milli": 500, "memory_mib": 0}]
    # The daemon recorded both starts, then died: one before Popen, one after Popen but before the pid.
    first.store.update_job(never.id, state="running", slices=slices, pid=None)
    import subprocess
    import sys

    log, exit_file = first.runner.paths(started.id)
    shim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flexai.local.shim",
            str(exit_file),
            str(log),
            "--",
            *gated_command(tmp_path / "release-0"),
        ],
        start_new_session=True,
    )
    wait_for(lambda: first.runner.pid_file(started.id).exists())
    first.store.update_job(started.id, state="running", slices=slices, pid=None)
    second = make_pool(tmp_path, "1xA100-80GB")
    try:
        assert second.store.job(never.id).state == "queued"
        adopted = second.store.job(started.id)
        assert adopted.state == "running" and adopted.pid == shim.pid
        assert set(second.state.grants) == {started.id}
    finally:
        (tmp_path / "release-0").touch()
        shim.wait(timeout=20)
        wait_for(lambda: not second.store.jobs(("running", "queued")), second.tick, 30)
    assert second.store.job(started.id).state == "succeeded"


def test_one_state_folder_serves_one_daemon(tmp_path: Path) -> None:
    from flexai.local.daemon import StateInUseError, lock_state

    fd = lock_state(tmp_path / "state")
    with pytest.raises(StateInUseError, match="another flexai serve is running on state"):
        lock_state(tmp_path / "state")
    import os

    os.close(fd)
    os.close(lock_state(tmp_path / "state"))


def test_strict_isolation_gates_even_an_idle_device(tmp_path: Path) -> None:
    from dataclasses import replace

    from flexai.node.sim import SimBackend

    class Quiet(SimBackend):
        def devices(self):  # noqa: ANN202
            return [replace(d, utilisation_pct=5.0) for d in super().devices()]

    backend = Quiet("1xA100-80GB")
    pool = Pool(tmp_path / "state", backend, backend.devices(), PoolConfig(lending=False, timeslice_period_s=0.2))
    job = pool.submit(JobSubmission(busy_command(30), share_milli=300))
    try:
        pool.tick()
        paused = False
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            pool.timeslice()
            paused |= pool._running[job.id].stopped_by_slicer
            time.sleep(0.005)
        assert paused
    finally:
        pool.cancel(job.id)


def test_the_event_log_keeps_only_the_newest_events(tmp_path: Path) -> None:
    from flexai.local.store import Store

    store = Store(tmp_path / "state.db", keep_events=50)
    for n in range(500):
        store.event(None, "note", f"event {n}")
    kept = store.events(limit=10_000)
    assert 50 <= len(kept) <= 55 and kept[-1].message == "event 499"


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_state_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    os.chmod(state, 0o755)
    (state / "logs" / "left-by-an-older-version.log").write_text("secret")
    os.chmod(state / "logs" / "left-by-an-older-version.log", 0o644)
    made_by_job = tmp_path / "made-by-the-job"
    old = os.umask(umask)
    try:
        os.close(lock_state(state))
        pool = make_pool(tmp_path)
        job = pool.submit(JobSubmission(["sh", "-c", f"echo hi; touch {made_by_job}"], env={"TOKEN": "s3cret"}))
        wait_for(lambda: pool.store.job(job.id).state == "succeeded", pool.tick)
    finally:
        os.umask(old)
    found = {p.relative_to(state).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*")]}
    for name in ("state.db", "state.db-wal", "state.db-shm", "daemon.lock", "pool.owner", f"logs/{job.id}.log"):
        assert name in found
    for suffix in (".exit", ".pid", ".group"):
        assert f"logs/{job.id}{suffix}" in found
    assert {name: mode for name, mode in found.items() if mode != (0o700 if (state / name).is_dir() else 0o600)} == {}
    assert stat.S_IMODE(made_by_job.stat().st_mode) == 0o666 & ~umask  # the job keeps the user's own umask


def test_the_pool_view_shows_what_each_slice_really_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory, busy = tmp_path / "memory.json", tmp_path / "busy.json"
    memory.write_text("{}")
    busy.write_text(json.dumps({"0": 75}))
    monkeypatch.setenv("FLEXAI_SIM_MEMORY_FILE", str(memory))
    monkeypatch.setenv("FLEXAI_SIM_UTILISATION_FILE", str(busy))
    pool = make_pool(tmp_path, "1xA100-80GB")
    jobs = [
        pool.submit(JobSubmission(gated_command(tmp_path / f"release-{n}"), share_milli=500, memory_mib=8192))
        for n in range(2)
    ]
    try:
        pool.tick()
        wait_for(lambda: all(pool.job_group(j.id) for j in jobs))
        # The first job's memory is held by its command, the second's by its shim: both count (one session each).
        memory.write_text(
            json.dumps({str(pool.job_group(jobs[0].id)): 3000, str(pool.store.job(jobs[1].id).pid): 1000})
        )
        pool._utilisation_read_at = float("-inf")
        pool.tick()
        device = pool.pool_view()["devices"][0]
        assert device["utilisation_pct"] == 75.0 and device["used_memory_mib"] == 4000
        assert {s["job"]: s["used_memory_mib"] for s in device["slices"]} == {jobs[0].id: 3000, jobs[1].id: 1000}
        assert {s["memory_mib"] for s in device["slices"]} == {8192}
        pool.record_utilisation()
        assert pool.utilisation_history[-1]["utilisation_pct"] == {"0": 75.0}
    finally:
        release_all(tmp_path)
        wait_for(lambda: not pool.store.jobs(("running", "queued")), pool.tick, 30)
