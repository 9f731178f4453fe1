"""The embedded pool: one machine's devices, a job queue placed by the engine, processes held to their slices.

`Pool` has no HTTP in it: the daemon (`flexai serve`) calls `tick()` and `timeslice()` from its loop and the
API calls `submit`, `cancel` and the views. Devices are grouped by (model, memory); each group is a node of
the engine's ClusterState, so a job's devices are always of one model, and the `flex` policy places it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flexai.local.procfs import process_group_and_session, process_start_ticks, process_state, processes_of
from flexai.local.shim import write_private
from flexai.local.store import ACTIVE_STATES, JobRecord, Store, make_private_tree
from flexai.model import ClusterState, LedgerError, Node, Placement, Request, RequestError
from flexai.model.workload import WorkloadProfile
from flexai.node.devices import DeviceBackend, DeviceInfo
from flexai.node.environment import slice_environment
from flexai.scheduler import PolicyContext, Scheduler, Status, create_policy

MIB_PER_GIB = 1024


class SubmitError(ValueError):
    """A request refused at submit: the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class PoolConfig:
    share_step_milli: int = 100
    """Slices are multiples of this share (100 = 10 % steps)."""
    memory_grace_s: float = 5.0
    """How long a job may stay over its device-memory quota before it is stopped."""
    lending: bool = True
    """Share left idle on a device is lent to the jobs running there; off = strict isolation."""
    timeslice_period_s: float = 0.5
    """One time-slicing cycle; each contending job runs for its share of it."""
    starvation_limit_s: float = 30.0
    """After the first job in queue order has waited this long, nothing starts ahead of it."""
    contention_utilisation_pct: float = 90.0
    """Jobs sharing a device are time-sliced only while the device is this busy (or cannot tell)."""
    policy: str = "flex"
    job_umask: int | None = None
    """The umask jobs run with; None = the umask of the process that creates the pool. The pool's own files are
    private (0600 in a 0700 folder) whatever the umask."""


@dataclass
class JobSubmission:
    command: list[str]
    share_milli: int = 1000
    memory_mib: int = 0
    count: int = 1
    model: str = ""
    priority: int = 0
    name: str = ""
    cwd: str = "/"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    record: JobRecord
    process: subprocess.Popen[bytes] | None
    over_quota_since: float | None = None
    stopped_by_slicer: bool = False
    job_group: int | None = None
    """Process group of the command (inside the shim's session); the slicer pauses this group, never the shim."""


class Pool:
    def __init__(
        self,
        state_dir: Path,
        backend: DeviceBackend,
        devices: list[DeviceInfo],
        config: PoolConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not devices:
            raise ValueError("a pool needs at least one device")
        self.config = config or PoolConfig()
        if not 1 <= self.config.share_step_milli <= 1000 or 1000 % self.config.share_step_milli:
            raise ValueError(f"share step {self.config.share_step_milli}m is not allowed: a divisor of 1000m")
        self.state_dir = state_dir
        self.logs_dir = state_dir / "logs"
        make_private_tree(state_dir, self.logs_dir)
        if self.config.job_umask is not None:
            self._job_umask = self.config.job_umask
        else:
            self._job_umask = os.umask(0o077)
            os.umask(self._job_umask)
        # Every shim watches this file and resumes its job when the process named here is gone.
        self.owner_file = state_dir / "pool.owner"
        write_private(str(self.owner_file), f"{os.getpid()} {process_start_ticks(os.getpid())}\n")
        self.backend = backend
        self.devices = devices
        self.clock = clock
        self.store = Store(state_dir / "state.db")
        groups: dict[tuple[str, int], list[DeviceInfo]] = {}
        for device in devices:
            groups.setdefault((device.model, device.memory_mib), []).append(device)
        self.group_devices: list[list[DeviceInfo]] = list(groups.values())
        nodes = [
            Node(
                name=f"local/{model}-{memory}MiB",
                cpu_milli=1 << 40,
                host_memory_mib=1 << 40,
                device_count=len(members),
                device_model=model,
                device_memory_mib=memory,
            )
            for (model, memory), members in groups.items()
        ]
        self.state = ClusterState(nodes)
        self._running: dict[str, _Running] = {}
        self._utilisation_pct: dict[int, float | None] = {}
        self._device_memory_used_mib: dict[int, int | None] = {}
        self._job_memory_mib: dict[str, dict[int, int]] = {}
        """Device memory each running job uses (job id -> device index -> MiB), from the watchdog's last reading."""
        self._memory_read: set[int] = set()
        """Devices whose per-process memory the last reading could tell."""
        self._utilisation_read_at = float("-inf")
        self._head_waiting_since: dict[str, float] = {}
        self._profile_jobs = -1
        self._scheduler = self._new_scheduler()
        self.utilisation_history: list[dict[str, object]] = []
        self.store.put_meta("devices", [_device_dict(d) for d in devices])
        self.recover()

    # ------------------------------------------------------------------ engine
    def _profile(self) -> WorkloadProfile:
        """Shapes of the jobs this pool has seen (online statistics); a grid of slices until there are some."""
        history = [self._request(j) for j in self.store.recent_jobs(1000) if j.state != "rejected"]
        if len(history) < 10:
            step = self.config.share_step_milli
            history += [Request(device_count=1, share_milli=s) for s in range(step, 1001, step)]
        return WorkloadProfile.from_requests(history, coverage=1.0)

    def _new_scheduler(self) -> Scheduler:
        self._profile_jobs = self.store.job_count()
        policy = create_policy(self.config.policy, PolicyContext(profile=self._profile()))
        return Scheduler(self.state, policy)

    def _request(self, job: JobRecord | JobSubmission) -> Request:
        return Request(
            device_count=job.device_count if isinstance(job, JobRecord) else job.count,
            share_milli=job.share_milli,
            device_memory_mib=job.memory_mib,
            allowed_models=frozenset({job.model}) if job.model else frozenset(),
            priority=job.priority,
        )

    # ------------------------------------------------------------------ submit
    def validate(self, sub: JobSubmission) -> Request:
        step = self.config.share_step_milli
        if not sub.command:
            raise SubmitError("command=[] is not allowed: give the command to run after --")
        if not 1 <= sub.share_milli <= 1000 or sub.share_milli % step:
            raise SubmitError(
                f"share={sub.share_milli}m is not allowed: a multiple of {step}m ({step // 10} %) "
                f"from {step}m to 1000m (100 %)"
            )
        models = sorted({d.model for d in self.devices})
        if sub.model and sub.model not in models:
            raise SubmitError(f"model={sub.model!r} is not allowed: this pool has {', '.join(models)}")
        candidates = [g for g in self.group_devices if not sub.model or g[0].model == sub.model]
        most = max(len(g) for g in candidates)
        if not 1 <= sub.count <= most:
            raise SubmitError(f"count={sub.count} is not allowed: 1..{most} devices of one model on this machine")
        largest = max(g[0].memory_mib for g in candidates)
        if sub.memory_mib < 0 or sub.memory_mib > largest:
            raise SubmitError(f"memory={sub.memory_mib}MiB is not allowed: 0..{largest}MiB (the largest device here)")
        if sub.count > 1 and sub.share_milli < 1000:
            raise SubmitError(f"share={sub.share_milli}m is not allowed with count={sub.count}: 1000m per device")
        try:
            request = self._request(sub)
        except RequestError as exc:
            raise SubmitError(str(exc)) from None
        if not self._scheduler.ever_fits(request):
            raise SubmitError(
                f"count={sub.count} share={sub.share_milli}m memory={sub.memory_mib}MiB can never fit on this machine"
            )
        return request

    def submit(self, sub: JobSubmission) -> JobRecord:
        self.validate(sub)
        job = JobRecord(
            id=uuidlib.uuid4().hex[:12],
            name=sub.name or Path(sub.command[0]).name,
            command=list(sub.command),
            cwd=sub.cwd,
            env=dict(sub.env),
            device_count=sub.count,
            share_milli=sub.share_milli,
            memory_mib=sub.memory_mib,
            model=sub.model,
            priority=sub.priority,
        )
        return self.store.insert_job(job, f"queued {job.name}: {sub.count} x {sub.share_milli}m, {sub.memory_mib} MiB")

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.job(job_id)
        if job is None:
            raise KeyError(f"job {job_id!r} not found")
        if job.state == "queued":
            self.store.update_job(
                job.id, "cancelled", "cancelled while queued", state="cancelled", ended_at=time.time()
            )
        elif job.state == "running":
            self._kill(job.id, "cancelled", "cancelled by request")
        return self.store.job(job.id)  # type: ignore[return-value]

    # ------------------------------------------------------------------ loop
    def tick(self) -> None:
        """Reap finished jobs, enforce memory quotas, start what fits. Called often by the daemon."""
        self._read_utilisation()
        self._reap()
        self._watch_memory()
        self._schedule()
        self.state.compact_journal()

    def _schedule(self) -> None:
        # Every tick: a COUNT, not a read of the whole job history.
        if self.store.job_count() - self._profile_jobs >= 50:
            self._scheduler = self._new_scheduler()
        queued = sorted(self.store.jobs(("queued",)), key=lambda j: (-j.priority, j.seq))
        head_blocked: JobRecord | None = None
        now = self.clock()
        for job in queued:
            if head_blocked is not None:
                waited = now - self._head_waiting_since.setdefault(head_blocked.id, now)
                if waited >= self.config.starvation_limit_s:
                    break  # drain: nothing more starts ahead of the long-waiting head
            result = self._scheduler.schedule(self._request(job), job.id)
            if result.status is Status.SCHEDULED and result.placement is not None:
                self._head_waiting_since.pop(job.id, None)
                self._start(job, result.placement)
            elif head_blocked is None:
                head_blocked = job

    def _slices(self, placement: Placement) -> list[dict[str, object]]:
        group = self.group_devices[placement.node_index]
        return [
            {
                "device": group[d].index,
                "uuid": group[d].uuid,
                "model": group[d].model,
                "share_milli": placement.share_milli,
                "memory_mib": placement.device_memory_mib,
            }
            for d in placement.device_indices
        ]

    def job_environment(self, job: JobRecord, slices: list[dict[str, object]]) -> dict[str, str]:
        """The job's own environment plus what every slice holder gets (``flexai.node.environment``)."""
        return {**job.env, **slice_environment(self.backend, job.id, slices)}

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        return self.logs_dir / f"{job_id}.log", self.logs_dir / f"{job_id}.exit"

    def _pid_file(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.pid"

    def _group_file(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.group"

    def job_group(self, job_id: str) -> int | None:
        """Process group of a running job's command (what the slicer pauses); None until the shim has started it."""
        running = self._running.get(job_id)
        if running is None or running.record.pid is None:
            return None
        if running.job_group is None:
            try:
                group = int(self._group_file(job_id).read_text().strip())
            except (OSError, ValueError):
                return None
            # Only a group of this job's own session (the shim's): never signal a stranger's reused pid.
            if process_group_and_session(group) == (group, running.record.pid):
                running.job_group = group
        return running.job_group

    def log_path(self, job_id: str) -> Path:
        return self._paths(job_id)[0]

    def _start(self, job: JobRecord, placement: Placement) -> None:
        slices = self._slices(placement)
        log, exit_file = self._paths(job.id)
        exit_file.unlink(missing_ok=True)
        self._pid_file(job.id).unlink(missing_ok=True)
        self._group_file(job.id).unlink(missing_ok=True)
        # Recorded before the process exists: a daemon killed right after Popen finds the job "running"
        # with its slices and adopts it through the shim's pid file instead of starting it twice.
        self.store.update_job(job.id, state="running", slices=slices, pid=None)
        try:
            env = self.job_environment(job, slices)
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flexai.local.shim",
                    str(exit_file),
                    str(log),
                    "--watch",
                    str(self.owner_file),
                    "--umask",
                    f"{self._job_umask:o}",
                    "--",
                    *job.command,
                ],
                cwd=job.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except Exception as exc:  # noqa: BLE001  (OSError, or ValueError for a NUL byte: the job fails, the pool goes on)
            self.state.unreserve(job.id)
            self.store.update_job(
                job.id,
                "failed",
                f"could not start: {exc}",
                state="failed",
                reason=f"could not start: {exc}",
                slices=None,
                ended_at=time.time(),
            )
            return
        job.pid = process.pid
        job.state = "running"
        job.slices = slices
        self.store.update_job(
            job.id,
            "started",
            "started on " + ", ".join(f"device {s['device']} ({s['share_milli']}m)" for s in slices),
            state="running",
            pid=process.pid,
            pid_start_ticks=process_start_ticks(process.pid),
            slices=slices,
            started_at=time.time(),
        )
        self._running[job.id] = _Running(job, process)

    def _finish(self, job_id: str, state: str, reason: str, exit_code: int | None) -> None:
        running = self._running.pop(job_id, None)
        self._job_memory_mib.pop(job_id, None)
        if running and running.process is not None:
            running.process.poll()
        self.state.unreserve(job_id)
        self.store.update_job(
            job_id, state, reason or state, state=state, reason=reason, exit_code=exit_code, ended_at=time.time()
        )

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            _, exit_file = self._paths(job_id)
            if running.process is not None:
                running.process.poll()
            alive = _alive(running.record.pid, running.record.pid_start_ticks)
            if exit_file.exists():
                code = int(exit_file.read_text().strip() or 1)
                if alive and running.process is not None and running.process.returncode is None:
                    continue  # the shim is still writing out
                self._finish(job_id, "succeeded" if code == 0 else "failed", f"exit code {code}", code)
            elif not alive:
                self._finish(job_id, "lost", "the job's process ended without recording an exit status", None)

    def _kill(self, job_id: str, state: str, reason: str) -> None:
        running = self._running.get(job_id)
        if running is None or running.record.pid is None:
            return
        shim = running.record.pid
        if _alive(shim, running.record.pid_start_ticks):  # never signal a group whose leader pid was reused
            # The shim's session holds the whole job: the shim's group, the command's group and any group the
            # command made. The shim goes first so that it records nothing.
            groups = [shim, self.job_group(job_id) or shim]
            groups += sorted({g for pid, _ in processes_of(shim) for g in [_process_group(pid)] if g is not None})
            for group in dict.fromkeys(groups):
                for sig in (signal.SIGKILL,) if group == shim else (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(group, sig)
                    except (ProcessLookupError, PermissionError):
                        break
        if running.process is not None:
            try:
                running.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel (e.g. a device call): the slice is released all the same
        self._finish(job_id, state, reason, None)

    # ------------------------------------------------------------------ memory
    def _watch_memory(self) -> None:
        if not self._running:
            return
        now = self.clock()
        usage: dict[str, dict[int, int]] = {}
        devices_in_use = {int(s["device"]) for r in self._running.values() for s in (r.record.slices or [])}
        # A job is its shim's session (the shim's pid is the session id).
        session_of = {r.record.pid: job_id for job_id, r in self._running.items() if r.record.pid}
        read: set[int] = set()
        for device in devices_in_use:
            try:
                per_process = self.backend.process_memory_mib(device)
            except Exception:  # noqa: BLE001  (a failed reading skips this round; the next tick tries again)
                continue
            read.add(device)
            for pid, mib in per_process.items():
                ids = process_group_and_session(pid)
                job_id = session_of.get(ids[1]) if ids else None
                if job_id is not None:
                    usage.setdefault(job_id, {}).setdefault(device, 0)
                    usage[job_id][device] += mib
        self._memory_read = read
        self._job_memory_mib = usage
        for job_id, running in list(self._running.items()):
            quota = running.record.memory_mib
            worst = max(usage.get(job_id, {}).items(), key=lambda kv: kv[1], default=None)
            if not quota or worst is None or worst[1] <= quota:
                running.over_quota_since = None
                continue
            if running.over_quota_since is None:
                running.over_quota_since = now
                self.store.event(job_id, "memory", f"device {worst[0]}: {worst[1]} MiB over the quota of {quota} MiB")
            elif now - running.over_quota_since >= self.config.memory_grace_s:
                self._kill(
                    job_id,
                    "stopped",
                    f"device memory {worst[1]} MiB on device {worst[0]} over the quota of {quota} MiB "
                    f"for {self.config.memory_grace_s:g} s",
                )

    # ------------------------------------------------------------------ compute
    def _read_utilisation(self) -> None:
        now = self.clock()
        if now - self._utilisation_read_at < 1.0:
            return
        self._utilisation_read_at = now
        try:
            found = self.backend.devices()
        except Exception:  # noqa: BLE001  (a failed reading means "cannot tell", which gates conservatively)
            found = []
        self._utilisation_pct = {d.index: d.utilisation_pct for d in found}
        self._device_memory_used_mib = {d.index: d.memory_used_mib for d in found}

    def contended(self, device_index: int) -> bool:
        """Busy enough that co-located jobs compete for it; a device that cannot tell counts as contended.

        While jobs are gated the device shows one job's load: heavy jobs keep it busy (gating stays on),
        light ones leave it idle (gating goes off and they overlap, which is the utilisation gain)."""
        utilisation = self._utilisation_pct.get(device_index)
        return utilisation is None or utilisation >= self.config.contention_utilisation_pct

    def timeslice(self) -> None:
        """Gate jobs that share a device so that each gets its share of device time.

        Per device, a cycle of ``timeslice_period_s`` is cut into one turn per job, proportional to its share;
        with lending on, the turns fill the whole cycle (idle share goes to those running), and a lone job
        is never paused; with lending off, the cycle's unallocated rest is idle time for everybody.
        """
        now = self.clock()
        period = self.config.timeslice_period_s
        want_running: dict[str, bool] = {job_id: True for job_id in self._running}
        by_device: dict[int, list[_Running]] = {}
        for running in self._running.values():
            if running.record.share_milli < 1000:
                for s in running.record.slices or []:
                    by_device.setdefault(int(s["device"]), []).append(running)  # type: ignore[call-overload]
        for device_index, members in by_device.items():
            if self.config.lending and not self.contended(device_index):
                continue
            members.sort(key=lambda r: r.record.seq)
            shares = [r.record.share_milli for r in members]
            if self.config.lending and len(members) == 1:
                continue
            total = sum(shares) if self.config.lending else 1000
            phase = (now % period) / period * total
            start = 0.0
            for running, share in zip(members, shares, strict=True):
                inside = start <= phase < start + share
                want_running[running.record.id] = want_running[running.record.id] and inside
                start += share
        for job_id, run in want_running.items():
            self._gate(self._running[job_id], run)

    def resume_all(self) -> None:
        """Let every paused job run (after an error in the loop, nobody may stay stopped)."""
        for running in self._running.values():
            try:
                self._gate(running, True)
            except OSError:
                continue

    def _gate(self, running: _Running, run: bool) -> None:
        """Pause or resume the job's command group (never its shim, which must stay free to resume it when the
        pool dies)."""
        if running.record.pid is None or run == (not running.stopped_by_slicer):
            return
        group = self.job_group(running.record.id)
        if group is None:
            return
        try:
            os.killpg(group, signal.SIGCONT if run else signal.SIGSTOP)
        except ProcessLookupError:
            return
        running.stopped_by_slicer = not run

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """After a restart: re-adopt running jobs whose process lives, finish those that ended, mark the rest
        lost; rebuild the ledger so that no slice is granted twice."""
        for job in self.store.jobs(("running",)):
            _, exit_file = self._paths(job.id)
            if job.pid is None:
                job = self._adopt_unrecorded_start(job, exit_file)
                if job is None:
                    continue
            placement = self._placement_of(job)
            if placement is None:
                self.store.update_job(
                    job.id, "lost", "its devices are no longer in the pool", state="lost", ended_at=time.time()
                )
                continue
            try:
                self.state.reserve(job.id, placement)
            except LedgerError as exc:
                self.store.update_job(
                    job.id, "lost", f"cannot hold its slices again: {exc}", state="lost", ended_at=time.time()
                )
                continue
            self._running[job.id] = _Running(job, None)
            if _alive(job.pid, job.pid_start_ticks):
                for group in (job.pid, self.job_group(job.id)):  # a restart must not leave a job paused
                    try:
                        if group is not None:
                            os.killpg(group, signal.SIGCONT)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.store.event(job.id, "adopted", f"re-adopted running job (pid {job.pid})")
        self._reap()

    def _adopt_unrecorded_start(self, job: JobRecord, exit_file: Path) -> JobRecord | None:
        """The daemon died between recording a start and recording its pid: find the shim by its pid file,
        or put the job back in the queue if it never started."""
        pid_file = self._pid_file(job.id)
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            ticks = process_start_ticks(pid) if pid else None
            self.store.update_job(job.id, pid=pid, pid_start_ticks=ticks)
            job.pid, job.pid_start_ticks = pid, ticks
            return job
        if exit_file.exists():
            return job
        self.store.update_job(
            job.id, "requeued", "the daemon stopped before the job started", state="queued", slices=None
        )
        return None

    def _placement_of(self, job: JobRecord) -> Placement | None:
        # By UUID: indices may move when devices are re-enumerated; UUIDs do not.
        wanted = [str(s["uuid"]) for s in job.slices or []]
        for node_index, group in enumerate(self.group_devices):
            local = {d.uuid: i for i, d in enumerate(group)}
            if wanted and all(w in local for w in wanted):
                return Placement(node_index, tuple(local[w] for w in wanted), job.share_milli, job.memory_mib, 0, 0)
        return None

    def shutdown(self) -> None:
        """Stop the daemon's side only: jobs keep running and are re-adopted on the next start."""
        for running in self._running.values():
            self._gate(running, True)
        self.store.close()

    # ------------------------------------------------------------------ views
    def used_memory_mib(self, job_id: str, device_index: int) -> int | None:
        """Device memory a running job really uses on one device (its processes, as the backend reads them);
        None when the backend cannot tell."""
        if device_index not in self._memory_read:
            return None
        return self._job_memory_mib.get(job_id, {}).get(device_index, 0)

    def pool_view(self) -> dict[str, object]:
        devices = []
        for node_index, group in enumerate(self.group_devices):
            for local_index, device in enumerate(group):
                slices = [
                    {
                        "job": job_id,
                        "name": self._running[job_id].record.name if job_id in self._running else job_id,
                        "share_milli": p.share_milli,
                        "memory_mib": p.device_memory_mib,
                        "used_memory_mib": self.used_memory_mib(job_id, device.index),
                        "paused": bool(job_id in self._running and self._running[job_id].stopped_by_slicer),
                    }
                    for job_id, p in self.state.grants.items()
                    if p.node_index == node_index and local_index in p.device_indices
                ]
                devices.append(
                    {
                        "index": device.index,
                        "uuid": device.uuid,
                        "model": device.model,
                        "memory_mib": device.memory_mib,
                        "free_share_milli": int(self.state.free_share_milli[node_index, local_index]),
                        "free_memory_mib": int(self.state.free_device_memory_mib[node_index, local_index]),
                        "utilisation_pct": self._utilisation_pct.get(device.index),
                        "used_memory_mib": self._device_memory_used_mib.get(device.index),
                        "slices": slices,
                    }
                )
        queued = len(self.store.jobs(("queued",)))
        return {
            "backend": self.backend.name,
            "share_step_milli": self.config.share_step_milli,
            "lending": self.config.lending,
            "devices": devices,
            "running": len(self._running),
            "queued": queued,
        }

    def record_utilisation(self) -> None:
        """One point per device for the dashboard's history: allocated share, and the device's own utilisation
        (None when the backend cannot tell)."""
        allocated: dict[str, int] = {}
        busy: dict[str, float | None] = {}
        for node_index, group in enumerate(self.group_devices):
            for local_index, device in enumerate(group):
                allocated[str(device.index)] = 1000 - int(self.state.free_share_milli[node_index, local_index])
                busy[str(device.index)] = self._utilisation_pct.get(device.index)
        point = {"ts": time.time(), "allocated_share_milli": allocated, "utilisation_pct": busy}
        self.utilisation_history.append(point)
        del self.utilisation_history[:-600]


def _alive(pid: int | None, start_ticks: int | None) -> bool:
    if pid is None:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None:
        return False
    if start_ticks is not None and ticks != start_ticks:
        return False  # the pid was reused by another process
    return process_state(pid) not in (None, "Z")


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _device_dict(device: DeviceInfo) -> dict[str, object]:
    return dataclasses.asdict(device)


__all__ = ["ACTIVE_STATES", "JobSubmission", "Pool", "PoolConfig", "SubmitError", "MIB_PER_GIB"]
