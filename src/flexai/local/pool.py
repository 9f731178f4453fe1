"""The embedded pool: one machine's devices, jobs decided by the Hi Scheduler, processes held to their slices.

`Pool` is the coordinator and has no HTTP in it: the daemon (`flexai serve`) calls `tick()` and `timeslice()`
from its loop and the API calls `submit`, `cancel` and the views. Devices are grouped by (model, memory); each
group is a node of the engine's ClusterState, so a job's devices are always of one model. What starts, in
which order, what backfills, what is preempted and what each queue may use is decided by ``flexai.hi``
(``HiScheduler``, whose engine owns the one ledger); the pool carries the decisions out:

- ``Start``: start the job's process (``flexai.local.runner``) once the victims named in ``after`` are gone;
- ``Preempt``: SIGCONT + SIGTERM to the victim's command, SIGKILL after ``preemption_grace_s``; once it has
  stopped, ``hi.requeue`` puts it back in its queue (state ``preempted``) and it starts again when it fits.
- ``Move`` (defragmentation, ``hi.defrag_max_moves``; Hi already holds the target for it): stopped as a victim
  is, then started again on its target slice with the target's environment, keeping its id (event ``moved``,
  then ``restarted``). Until then the store keeps the slices it leaves in ``moving_from`` and its target in
  ``slices``, so a daemon killed mid-move stops what may still run on the old slice and starts the job on its
  target. The work that waited for the hole starts once the moved jobs are gone, as after a preemption.

Time-sharing (``flexai.hi.timeshare``, on unless ``PoolConfig.timeshare`` is off): each tick the pool tells Hi
how busy each device is and how much memory its owners hold (``observe_devices``: the backend's utilisation and
used memory, less what the guests use: their per-process utilisation where the backend tells it, NVML's
``nvmlDeviceGetProcessUtilization``, so that a guest's own load does not pause it); a device that cannot tell
how busy it is counts as busy and never takes guests. Hi's decisions for guests (``low`` jobs on share granted
to others but idle) are carried out as:

- ``Start(opportunistic=True)``: the job starts on the guest placement (its memory quota is the placement's),
  recorded ``opportunistic`` so that a restarted daemon adopts it again as a guest (``hi.adopt_guest``);
- ``pauses`` / ``resumes``: SIGSTOP / SIGCONT to every group of the guest's session but its shim's (whose guard
  resumes them if the daemon dies); while guests may act, utilisation is read every
  ``timeshare_observe_period_s``, so a guest stops that long (plus one loop tick) after its device got busy;
- ``Preempt(kind="yield")`` (its owners need the memory): stopped like a victim, then queued again (state
  ``queued``, the reason says it yielded).

Time-slicing lives in ``flexai.local.slicer``, the durable state in ``flexai.local.store``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexai.hi import HiConfig, HiError, HiScheduler, Move, Preempt, PriorityClass, QueueSpec, Start, WorkItem
from flexai.local.procfs import process_group_and_session, process_start_ticks, processes_of
from flexai.local.runner import Handle, Runner
from flexai.local.shim import write_private
from flexai.local.slicer import TimeSlicer
from flexai.local.store import ACTIVE_STATES, WAITING_STATES, JobRecord, Store, make_private_tree
from flexai.model import ClusterState, LedgerError, Node, Placement, Request, RequestError
from flexai.model.workload import WorkloadProfile
from flexai.node.devices import DeviceBackend, DeviceInfo
from flexai.node.environment import slice_environment
from flexai.scheduler import PolicyContext, Scheduler, create_policy

MIB_PER_GIB = 1024
DEFAULT_QUEUE = "default"
PRIORITY_CLASSES = tuple(c.label for c in sorted(PriorityClass, reverse=True))
"""('high', 'normal', 'low')"""


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
    contention_utilisation_pct: float = 90.0
    """Jobs sharing a device are time-sliced only while the device is this busy (or cannot tell)."""
    policy: str = "flex"
    job_umask: int | None = None
    """The umask jobs run with; None = the umask of the process that creates the pool. The pool's own files are
    private (0600 in a 0700 folder) whatever the umask."""
    hi: HiConfig = field(default_factory=HiConfig)
    """Order, backfill with reservation, preemption and its protections (``flexai.hi``)."""
    queues: tuple[QueueSpec, ...] = ()
    """Queues with guarantees and borrowing limits; ``default`` exists always."""
    preemption_grace_s: float = 10.0
    """A preempted job gets SIGTERM, then SIGKILL this long after if it has not ended."""
    timeshare: bool = True
    """``low`` jobs may run as guests on idle share granted to others (paused while the owners are busy, stopped
    and queued again when they need the memory); only devices whose backend tells how busy they are take guests.
    Sets ``hi.timeshare``; the thresholds are ``hi.timeshare_*``."""
    timeshare_observe_period_s: float = 0.2
    """How often utilisation and memory are read while time-sharing may act (a guest runs or ``low`` work
    waits); otherwise once a second."""


@dataclass
class JobSubmission:
    command: list[str]
    share_milli: int = 1000
    memory_mib: int = 0
    count: int = 1
    model: str = ""
    priority: int = 0
    priority_class: str = "normal"
    queue: str = DEFAULT_QUEUE
    name: str = ""
    cwd: str = "/"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Stop:
    """A job being stopped: preempted (Hi holds it as stopping) or found stopping after a restart."""

    handle: Handle
    kill_at: float
    then: str
    """What to tell Hi once it is gone: ``requeue`` (Hi's victim), ``release`` (adopted as running after a
    restart: release, then submit again), ``submit`` (Hi does not know it) or ``move`` (start it again on
    ``target``; Hi holds it as running there)."""
    killed: bool = False
    cancel: bool = False
    yielded: bool = False
    """A time-sharing guest whose owners need the memory: once stopped it is ``queued`` again, not ``preempted``."""
    target: Placement | None = None
    """With ``then == "move"``: where it starts again once stopped (Hi holds it there already)."""
    reason: str = ""
    """Why it moves (its reason once restarted)."""
    hold: str | None = None
    """An id under which its old slice is held in Hi until it has stopped (a move found by a restarted daemon)."""


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
            job_umask = self.config.job_umask
        else:
            job_umask = os.umask(0o077)
            os.umask(job_umask)
        # Every shim watches this file and resumes its job when the process named here is gone.
        self.owner_file = state_dir / "pool.owner"
        write_private(str(self.owner_file), f"{os.getpid()} {process_start_ticks(os.getpid())}\n")
        self.runner = Runner(self.logs_dir, self.owner_file, job_umask)
        self.slicer = TimeSlicer(
            self.runner, self.config.timeslice_period_s, self.config.lending, self.config.contention_utilisation_pct
        )
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
        self._profile_jobs = self.store.job_count()
        engine = Scheduler(self.state, create_policy(self.config.policy, PolicyContext(profile=self._profile())))
        hi_config = dataclasses.replace(self.config.hi, timeshare=self.config.timeshare)
        self.hi = HiScheduler(engine, hi_config, self.config.queues)
        """Decides everything; its engine owns the pool's one ledger (``self.state``)."""
        self.hi.queues.ensure(DEFAULT_QUEUE)
        self.queue_names = sorted({DEFAULT_QUEUE, *(q.name for q in self.config.queues)})
        self._running: dict[str, Handle] = {}
        self._stopping: dict[str, _Stop] = {}
        self._starting: dict[str, Start] = {}
        """Started by Hi (slices reserved), waiting for the victims in ``after`` to be gone."""
        self._utilisation_pct: dict[int, float | None] = {}
        self._device_memory_used_mib: dict[int, int | None] = {}
        self._job_memory_mib: dict[str, dict[int, int]] = {}
        """Device memory each running job uses (job id -> device index -> MiB), from the watchdog's last reading."""
        self._memory_read: set[int] = set()
        """Devices whose per-process memory the last reading could tell."""
        self._utilisation_read_at = float("-inf")
        self._guest_busy_pct: dict[int, float] = {}
        """Per device: the running guests' own utilisation (where the backend tells per process), not the owners'."""
        self._owner_memory_fallback_mib: dict[int, int] = {}
        """Per device: the owners' memory as last read (kept while a reading cannot tell; the device's whole memory
        until one could, so that no guest starts where memory is unknown)."""
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

    def _refresh_policy(self) -> None:
        """A policy that knows the shapes seen lately, on the same engine and ledger."""
        self._profile_jobs = self.store.job_count()
        policy = create_policy(self.config.policy, PolicyContext(profile=self._profile()))
        policy.bind_state(self.state)
        self.hi.engine.policy = policy

    def _request(self, job: JobRecord | JobSubmission) -> Request:
        return Request(
            device_count=job.device_count if isinstance(job, JobRecord) else job.count,
            share_milli=job.share_milli,
            device_memory_mib=job.memory_mib,
            allowed_models=frozenset({job.model}) if job.model else frozenset(),
            priority=job.priority,
        )

    def _item(self, job: JobRecord, submit_time_s: float | None = None) -> WorkItem:
        """The job as Hi sees it; its submit time (which orders it) in this pool's clock."""
        return WorkItem(
            id=job.id,
            request=self._request(job),
            priority_class=PriorityClass.parse(job.priority_class),
            priority=job.priority,
            queue=job.queue,
            submit_time_s=self._since(job.submitted_at) if submit_time_s is None else submit_time_s,
            name=f"{job.name} ({job.id})",
        )

    def _since(self, wall_ts: float | None) -> float:
        """A wall-clock time (as the store keeps it) in this pool's clock."""
        now = self.clock()
        return now if wall_ts is None else now - max(0.0, time.time() - wall_ts)

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
        if sub.priority_class not in PRIORITY_CLASSES:
            raise SubmitError(f"priority_class={sub.priority_class!r} is not allowed: {', '.join(PRIORITY_CLASSES)}")
        if sub.queue not in self.queue_names:
            raise SubmitError(
                f"queue={sub.queue!r} is not allowed: {', '.join(self.queue_names)} "
                "(queues come from `flexai serve --config`)"
            )
        try:
            request = self._request(sub)
        except RequestError as exc:
            raise SubmitError(str(exc)) from None
        if not self.hi.engine.ever_fits(request):
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
            priority_class=sub.priority_class,
            queue=sub.queue,
        )
        now = self.clock()
        try:
            item = self._item(job, submit_time_s=now)
        except HiError as exc:
            raise SubmitError(str(exc)) from None
        shown = f"{sub.priority_class}" + (f":{sub.priority}" if sub.priority else "")
        job = self.store.insert_job(
            job,
            f"queued {job.name} in queue {job.queue} ({shown}): {sub.count} x {sub.share_milli}m, {sub.memory_mib} MiB",
        )
        self.hi.submit(item, now)
        return job

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.job(job_id)
        if job is None:
            raise KeyError(f"job {job_id!r} not found")
        if job.id in self._stopping:  # preempted, still stopping: no grace left to wait for
            stop = self._stopping[job.id]
            stop.cancel = True
            self._kill_session(stop.handle)
            self.runner.wait(stop.handle, 10)
            deadline = time.monotonic() + 2.0  # SIGKILL reaches the command's group a moment after its shim
            while not self._gone(stop.handle) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not self._gone(stop.handle):
                return self.store.job(job.id)  # type: ignore[return-value]  # a later tick finishes it
            self._stopped(job.id)
        elif job.id in self._starting:
            del self._starting[job.id]
            self.hi.release(job.id)
            self._cancelled(job)
        elif job.state in WAITING_STATES:
            self.hi.withdraw(job.id)
            self._cancelled(job)
        elif job.state == "running":
            self._kill(job.id, "cancelled", "cancelled by request")
        return self.store.job(job.id)  # type: ignore[return-value]

    def _cancelled(self, job: JobRecord) -> None:
        self.store.update_job(
            job.id,
            "cancelled",
            f"cancelled while {job.state}",
            state="cancelled",
            reason=f"cancelled while {job.state}",
            pid=None,
            slices=None,
            moving_from=None,
            ended_at=time.time(),
        )

    # ------------------------------------------------------------------ loop
    def tick(self) -> None:
        """Reap finished and stopped jobs, enforce memory quotas, carry out Hi's decisions. Called often."""
        self._read_utilisation()
        self._reap()
        self._watch_memory()
        self._schedule()
        self.state.compact_journal()

    def _schedule(self) -> None:
        # Every tick: a COUNT, not a read of the whole job history.
        if self.store.job_count() - self._profile_jobs >= 50:
            self._refresh_policy()
        now = self.clock()
        if self.hi.config.timeshare:
            self._observe_devices()
        result = self.hi.cycle(now)
        for job_id in result.pauses:
            self._pause_guest(job_id, True)
        for job_id in result.resumes:
            self._pause_guest(job_id, False)
        for preempt in result.preemptions:
            self._preempt(preempt, now)
        for move in result.moves:
            self._move(move, now)
        for start in result.starts:
            self._starting[start.item.id] = start
            if start.after:
                victims = ", ".join(start.after)
                self.store.event(start.item.id, "starting", f"{start.reason}; starts once {victims} stopped")
        for job_id, start in list(self._starting.items()):
            if any(victim in self._stopping for victim in start.after):
                continue  # its slices are held in the ledger meanwhile
            del self._starting[job_id]
            job = self.store.job(job_id)
            if job is None or job.state not in WAITING_STATES:
                self.hi.release(job_id)
                continue
            if start.opportunistic:
                self._start(job, start.placement, opportunistic=True)
            else:
                self._start(job, start.placement)  # (the signature test doubles override)
            self.hi.started(job_id)
        if self.hi.guests:
            self._gate_guests()

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

    def job_group(self, job_id: str) -> int | None:
        """Process group of a running job's command (what the slicer pauses); None until the shim has started it."""
        handle = self._running.get(job_id)
        return None if handle is None else self.runner.job_group(handle)

    def log_path(self, job_id: str) -> Path:
        return self.runner.paths(job_id)[0]

    def _start(self, job: JobRecord, placement: Placement, opportunistic: bool = False, moved: str = "") -> None:
        """Start the job's process on ``placement``; ``moved``: it was stopped to move there (why, as its reason)."""
        slices = self._slices(placement)
        again = job.state == "preempted"
        # Recorded before the process exists: a daemon killed right after Popen finds the job "running"
        # with its slices and adopts it through the shim's pid file instead of starting it twice (a moving job
        # keeps ``moving_from`` until its new pid is recorded: without a pid file it is started there again).
        self.store.update_job(job.id, state="running", slices=slices, pid=None, opportunistic=opportunistic)
        try:
            process = self.runner.start(job, self.job_environment(job, slices))
        except Exception as exc:  # noqa: BLE001  (OSError, or ValueError for a NUL byte: the job fails, the pool goes on)
            self.hi.release(job.id)
            self.store.update_job(
                job.id,
                "failed",
                f"could not start: {exc}",
                state="failed",
                reason=f"could not start: {exc}",
                slices=None,
                moving_from=None,
                ended_at=time.time(),
            )
            return
        job.pid, job.pid_start_ticks = process.pid, process_start_ticks(process.pid)
        job.state = "running"
        job.slices = slices
        job.reason = "restarted after preemption" if again else ""
        job.opportunistic = opportunistic
        where = ", ".join(f"device {s['device']} ({s['share_milli']}m)" for s in slices)
        if opportunistic:
            job.reason = "opportunistic: on share granted to others while they leave it idle"
            where += f", {placement.device_memory_mib} MiB, opportunistic (paused while the owners are busy)"
        if moved:
            job.reason = moved
            event = "restarted", f"restarted on {where} after the move"
        elif again:
            event = "restarted", f"restarted after preemption on {where}"
        else:
            event = "started", f"started on {where}"
        job.moving_from = None
        self.store.update_job(
            job.id,
            *event,
            state="running",
            reason=job.reason,
            pid=job.pid,
            pid_start_ticks=job.pid_start_ticks,
            slices=slices,
            moving_from=None,
            started_at=time.time(),
        )
        self._running[job.id] = Handle(job, process, whole_session=opportunistic)

    def _finish(self, job_id: str, state: str, reason: str, exit_code: int | None) -> None:
        handle = self._running.pop(job_id, None)
        self._job_memory_mib.pop(job_id, None)
        if handle and handle.process is not None:
            handle.process.poll()
        self.hi.release(job_id)
        self.store.update_job(
            job_id, state, reason or state, state=state, reason=reason, exit_code=exit_code, ended_at=time.time()
        )

    def _reap(self) -> None:
        for job_id, handle in list(self._running.items()):
            alive = self.runner.shim_alive(handle)
            code = self.runner.exit_code(job_id)
            if code is not None:
                if alive and handle.process is not None and handle.process.returncode is None:
                    continue  # the shim is still writing out
                self._finish(job_id, "succeeded" if code == 0 else "failed", f"exit code {code}", code)
            elif not alive:
                self._finish(job_id, "lost", "the job's process ended without recording an exit status", None)
        now = self.clock()
        for job_id, stop in list(self._stopping.items()):
            if self._gone(stop.handle):
                self._stopped(job_id)
            elif stop.killed:
                # A command forked while its shim was being killed outlives the first SIGKILL: its session is
                # still this job's (a session id is not reused while a member lives), so kill what is left.
                self._kill_session(stop.handle)
            elif now >= stop.kill_at:
                stop.killed = True
                self._kill_session(stop.handle)
                self.store.event(
                    job_id, "killed", f"still running {self.config.preemption_grace_s:g} s after SIGTERM: SIGKILL"
                )

    def _gone(self, handle: Handle) -> bool:
        """The job's shim and every process of its session have ended."""
        if self.runner.shim_alive(handle):
            return False
        shim = handle.record.pid
        # A session id is not reused while any member lives, so these are the job's own processes.
        return shim is None or all(state == "Z" for _, state in processes_of(shim))

    def _kill_session(self, handle: Handle) -> None:
        self.runner.kill(handle)
        if handle.record.pid is not None and not self.runner.shim_alive(handle):
            for pid, _ in processes_of(handle.record.pid):  # left behind by a shim that is gone
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _kill(self, job_id: str, state: str, reason: str) -> None:
        handle = self._running.get(job_id)
        if handle is None or handle.record.pid is None:
            return
        self.runner.kill(handle)
        self.runner.wait(handle, 10)
        self._finish(job_id, state, reason, None)

    # ------------------------------------------------------------------ preemption
    def _preempt(self, decision: Preempt, now: float) -> None:
        job_id = decision.victim.id
        stop = self._stopping.get(job_id)
        if stop is not None:  # already stopping (moving, or found so after a restart): Hi's victim now
            if stop.then == "move":
                job = stop.handle.record
                self.store.update_job(
                    job_id,
                    "preempted",
                    f"{decision.reason} while it was moving; it stops and waits in its queue",
                    state="preempted",
                    reason=decision.reason,
                    slices=job.moving_from or job.slices,  # where its process still runs
                    moving_from=None,
                )
            stop.then = "requeue"
            return
        if self._starting.pop(job_id, None) is not None:
            self.hi.requeue(job_id, now)  # it never started: straight back to its queue
            return
        handle = self._running.pop(job_id, None)
        self._job_memory_mib.pop(job_id, None)
        grace = self.config.preemption_grace_s
        yielded = decision.kind == "yield"
        reason = f"yielded: {decision.reason}" if yielded else decision.reason
        self.store.update_job(
            job_id,
            "yielded" if yielded else "preempted",
            f"{reason}; SIGTERM now, SIGKILL after {grace:g} s (about {decision.lost_work_s:.0f} s of work to redo)",
            state="preempted",  # until it has stopped: a restarted daemon stops it again
            reason=reason,
        )
        if handle is None:
            self.hi.requeue(job_id, now)
            if yielded:
                self.store.update_job(job_id, state="queued", opportunistic=False, pid=None, slices=None)
            return
        stop = self._stopping[job_id] = _Stop(handle, now + grace, "requeue", yielded=yielded)
        if not self.runner.terminate(handle):
            stop.killed = True
            self._kill_session(handle)

    def _stopped(self, job_id: str) -> None:
        """A preempted job has stopped: back to its queue (or cancelled, if that was asked meanwhile)."""
        stop = self._stopping.pop(job_id)
        now = self.clock()
        job = self.store.job(job_id)
        assert job is not None
        if stop.hold is not None:
            self.hi.release(stop.hold)  # the old slice of a move is free now
        if stop.then == "move":
            self._moved(job, stop)
            return
        if stop.then == "requeue":
            self.hi.requeue(job_id, now)
        else:
            if stop.then == "release":
                self.hi.release(job_id)
            try:
                self.hi.submit(self._item(job), now)
            except HiError as exc:
                self._lost(job, f"cannot be scheduled again: {exc}")
                return
        self.runner.paths(job_id)[1].unlink(missing_ok=True)  # the stopped run's exit status means nothing
        if stop.cancel:
            self.hi.withdraw(job_id)
            self._cancelled(job)
            return
        if stop.yielded:
            self.store.update_job(
                job_id,
                "requeued",
                f"stopped after yielding to its device's owners; waits in queue {job.queue} to start again",
                state="queued",
                opportunistic=False,
                pid=None,
                pid_start_ticks=None,
                slices=None,
            )
            return
        self.store.update_job(
            job_id,
            "requeued",
            f"stopped after preemption; waits in queue {job.queue} to start again",
            state="preempted",
            pid=None,
            pid_start_ticks=None,
            slices=None,
            moving_from=None,
        )

    # ------------------------------------------------------------------ moves
    def _move(self, decision: Move, now: float) -> None:
        """Carry out a move Hi decided (its target already held): stop the job as a victim is stopped, then
        (``_moved``) start it again on the target."""
        job_id = decision.item.id
        reason = self._move_reason(decision)
        start = self._starting.get(job_id)
        if start is not None:  # decided, not started yet (its own victims are stopping): it starts on the target
            self._starting[job_id] = dataclasses.replace(start, placement=decision.target)
            self.store.event(job_id, "moved", f"{reason}, before it started")
            return
        stop = self._stopping.get(job_id)
        if stop is not None:  # stopping already: released (or started on the target) once it has stopped
            if stop.then == "move":
                stop.target, stop.reason = decision.target, reason
                self.store.update_job(job_id, "moved", reason, reason=reason, slices=self._slices(decision.target))
            return
        handle = self._running.pop(job_id, None)
        self._job_memory_mib.pop(job_id, None)
        if handle is None:  # no process (cannot happen while Hi holds it as running): it starts on the target
            record = self.store.job(job_id)
            if record is None:
                self.hi.release(job_id)
                return
            handle = Handle(record, None)
        grace = self.config.preemption_grace_s
        source = handle.record.slices or self._slices(decision.source)
        handle.record.moving_from = source
        self.store.update_job(
            job_id,
            "moved",
            f"{reason}; SIGTERM now, SIGKILL after {grace:g} s, then it starts there "
            f"(about {decision.lost_work_s:.0f} s of work to redo)",
            reason=reason,
            slices=self._slices(decision.target),
            moving_from=source,
        )
        stop = self._stopping[job_id] = _Stop(handle, now + grace, "move", target=decision.target, reason=reason)
        if not self.runner.terminate(handle):
            stop.killed = True
            self._kill_session(handle)

    def _move_reason(self, decision: Move) -> str:
        """ "moved from device 0 to device 1 to open a hole for NAME (ID)", from Hi's reason (which names nodes)."""
        source = self._slices(decision.source)
        target = self._slices(decision.target)
        src = ", ".join(str(s["device"]) for s in source)
        dst = ", ".join(str(s["device"]) for s in target)
        why = decision.why or decision.reason
        plural = "s" if len(source) > 1 else ""
        return f"moved from device{plural} {src} to device{plural} {dst} " + (
            why if why.startswith("to ") else f"({why})"
        )

    def _moved(self, job: JobRecord, stop: _Stop) -> None:
        """A moving job has stopped: start it again on its target (Hi holds it running there), or let it go."""
        self.runner.paths(job.id)[1].unlink(missing_ok=True)  # the stopped run's exit status means nothing
        self.runner.pid_file(job.id).unlink(missing_ok=True)  # nor its pid: a restart must not adopt it
        if stop.cancel:
            self.hi.release(job.id)
            self._cancelled(job)
            return
        assert stop.target is not None
        self.store.update_job(job.id, pid=None, pid_start_ticks=None)
        self._start(job, stop.target, moved=stop.reason or job.reason)

    def _recover_move(self, job: JobRecord) -> None:
        """A job the daemon was moving when it died: held on its target (``slices``); what may still run on its old
        slice (``moving_from``) is stopped first, that slice held meanwhile; then it starts on the target."""
        now = self.clock()
        target = self._placement_of(job)
        then = "move"
        try:
            if target is None:
                raise HiError("its target devices are no longer in the pool")
            self.hi.adopt(self._item(job), target, self._since(job.started_at))
        except (LedgerError, HiError):
            then = "submit"  # queued again once stopped
        handle = Handle(job, None)
        stop = self._stopping[job.id] = _Stop(handle, now + self.config.preemption_grace_s, then, target=target)
        stop.reason = job.reason
        if not self.runner.alive(job.pid, job.pid_start_ticks):
            return  # started on its target by the next reap
        source = self._placement_of(dataclasses.replace(job, slices=job.moving_from))
        if source is not None:
            hold = f"{job.id}~leaving"
            held = WorkItem(
                id=hold,
                request=self._request(job),
                priority_class=PriorityClass.HIGH,  # neither preempted nor moved: it only holds the old slice
                queue=job.queue,
                name=f"{job.name} ({job.id}) leaving its old slice",
            )
            try:
                self.hi.adopt(held, source, now)
                stop.hold = hold
            except (LedgerError, HiError):
                pass
        if not self.runner.terminate(handle):
            stop.killed = True
            self._kill_session(handle)
        self.store.event(job.id, "adopted", f"moving job still on its old slice (pid {job.pid}): stopping it again")

    # ------------------------------------------------------------------ memory
    def _watch_memory(self) -> None:
        if not self._running:
            return
        now = self.clock()
        usage: dict[str, dict[int, int]] = {}
        devices_in_use = {int(s["device"]) for r in self._running.values() for s in (r.record.slices or [])}  # type: ignore[call-overload]
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
        for job_id, handle in list(self._running.items()):
            quota = _memory_quota(handle.record)
            worst = max(usage.get(job_id, {}).items(), key=lambda kv: kv[1], default=None)
            if not quota or worst is None or worst[1] <= quota:
                handle.over_quota_since = None
                continue
            if handle.over_quota_since is None:
                handle.over_quota_since = now
                self.store.event(job_id, "memory", f"device {worst[0]}: {worst[1]} MiB over the quota of {quota} MiB")
            elif now - handle.over_quota_since >= self.config.memory_grace_s:
                self._kill(
                    job_id,
                    "stopped",
                    f"device memory {worst[1]} MiB on device {worst[0]} over the quota of {quota} MiB "
                    f"for {self.config.memory_grace_s:g} s",
                )

    # ------------------------------------------------------------------ compute
    def _read_utilisation(self) -> None:
        now = self.clock()
        period = self.config.timeshare_observe_period_s if self._timesharing_may_act() else 1.0
        if now - self._utilisation_read_at < period:
            return
        self._utilisation_read_at = now
        try:
            found = self.backend.devices()
        except Exception:  # noqa: BLE001  (a failed reading means "cannot tell", which gates conservatively)
            found = []
        self._utilisation_pct = {d.index: d.utilisation_pct for d in found}
        self._device_memory_used_mib = {d.index: d.memory_used_mib for d in found}
        self._guest_busy_pct = self._read_guest_utilisation()

    def _read_guest_utilisation(self) -> dict[int, float]:
        """Per device: how busy its running (not paused) time-sharing guests keep it themselves, where the backend
        tells per process (``process_utilisation_pct``: NVML's per-process utilisation, or the sim backend's
        script). Devices it cannot tell for are left out (their whole utilisation counts as the owners')."""
        read = getattr(self.backend, "process_utilisation_pct", None)
        guests = {j: g for j, g in self.hi.guests.items() if not g.paused and j in self._running}
        if read is None or not guests:
            return {}
        session_of = {self._running[j].record.pid: j for j in guests if self._running[j].record.pid}
        devices = {
            self.group_devices[g.placement.node_index][local].index
            for g in guests.values()
            for local in g.placement.device_indices
        }
        found: dict[int, float] = {}
        for device in sorted(devices):
            try:
                per_process = read(device)
            except Exception:  # noqa: BLE001  (a failed reading: the device's whole utilisation counts as the owners')
                continue
            for pid, pct in (per_process or {}).items():
                ids = process_group_and_session(pid)
                if ids is not None and ids[1] in session_of:
                    found[device] = found.get(device, 0.0) + float(pct)
        return found

    def _timesharing_may_act(self) -> bool:
        """A guest runs, or ``low`` work waits that might start as one."""
        if not self.hi.config.timeshare:
            return False
        return bool(self.hi.guests) or any(i.priority_class is PriorityClass.LOW for i in self.hi.pending.values())

    def _observe_devices(self) -> None:
        """Tell Hi what the devices do (time-sharing): the owners' utilisation, which is the device's less what its
        running guests use themselves where the backend tells per process, and the memory they hold, which is
        the device's memory in use less the guests' (their measured use, or their quota where it cannot be read).
        A device that cannot tell how busy it is counts as fully busy."""
        guest_mib: dict[int, int] = {}
        for job_id, guest in self.hi.guests.items():
            group = self.group_devices[guest.placement.node_index]
            for local in guest.placement.device_indices:
                device = group[local].index
                used = self.used_memory_mib(job_id, device) if job_id in self._running else None
                guest_mib[device] = guest_mib.get(device, 0) + (guest.memory_mib if used is None else used)
        shape = self.state.free_share_milli.shape
        busy = np.ones(shape)
        owners = np.zeros(shape, dtype=np.int64)
        for node_index, group in enumerate(self.group_devices):
            for local, device in enumerate(group):
                pct = self._utilisation_pct.get(device.index)
                if pct is not None:  # a guest's own load is not its owners' busy time
                    pct = max(0.0, pct - self._guest_busy_pct.get(device.index, 0.0))
                busy[node_index, local] = 1.0 if pct is None else pct / 100.0
                used = self._device_memory_used_mib.get(device.index)
                if used is not None:
                    self._owner_memory_fallback_mib[device.index] = max(0, used - guest_mib.get(device.index, 0))
                owners[node_index, local] = self._owner_memory_fallback_mib.get(device.index, device.memory_mib)
        self.hi.observe_devices(busy, owners)

    def _pause_guest(self, job_id: str, pause: bool) -> None:
        """SIGSTOP (or SIGCONT) every group of a guest's session but its shim's; the slicer leaves guests alone."""
        handle = self._running.get(job_id)
        if handle is None:
            return
        self.runner.gate(handle, not pause)
        devices = ", ".join(str(s["device"]) for s in handle.record.slices or [])
        busy = ", ".join(
            f"{self._utilisation_pct.get(int(s['device'])):g} %"  # type: ignore[call-overload]
            if self._utilisation_pct.get(int(s["device"])) is not None  # type: ignore[call-overload]
            else "cannot tell"
            for s in handle.record.slices or []
        )
        if pause:
            self.store.event(job_id, "paused", f"device {devices} busy ({busy}): the guest is paused (SIGSTOP)")
        else:
            self.store.event(job_id, "resumed", f"device {devices} idle ({busy}): the guest runs again (SIGCONT)")

    def contended(self, device_index: int) -> bool:
        """Busy enough that co-located jobs compete for it (``flexai.local.slicer``)."""
        return self.slicer.contended(self._utilisation_pct.get(device_index))

    def timeslice(self) -> None:
        """Gate jobs that share a device so that each gets its share of device time (``flexai.local.slicer``);
        time-sharing guests are not sliced: they run exactly while Hi has not paused them."""
        guests = self.hi.guests
        if not guests:
            self.slicer.slice(self.clock(), self._running, self._utilisation_pct)
            return
        owners = {job_id: h for job_id, h in self._running.items() if job_id not in guests}
        self.slicer.slice(self.clock(), owners, self._utilisation_pct)
        self._gate_guests()

    def _gate_guests(self) -> None:
        """Each guest stopped exactly while Hi holds it paused (again and again until its group is known: a guest
        paused just after it started)."""
        for job_id, guest in self.hi.guests.items():
            handle = self._running.get(job_id)
            if handle is not None:
                self.runner.gate(handle, not guest.paused)

    def resume_all(self) -> None:
        """Let every paused job run (after an error in the loop, nobody may stay stopped)."""
        self.slicer.resume_all(self._running.values())

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """After a restart: re-adopt running jobs whose process lives (``hi.adopt``), finish those that ended,
        mark the rest lost; go on stopping preempted jobs still alive; give Hi every queued and preempted job
        again with its original submit time. The ledger is rebuilt so that no slice is granted twice."""
        for job in self.store.jobs(("running",)):
            if job.moving_from is not None:
                found = self.runner.adopt_pid(job.id) if job.pid is None else None
                if found is None:  # its old process (if it lives) runs on the slices it leaves
                    self._recover_move(job)
                    continue
                # It had started on its target, its pid not yet recorded: adopt it there.
                job.pid, job.pid_start_ticks, job.moving_from = found[0], found[1], None
                self.store.update_job(job.id, pid=found[0], pid_start_ticks=found[1], moving_from=None)
            if job.pid is None:
                adopted = self._adopt_unrecorded_start(job)
                if adopted is None:
                    continue
                job = adopted
            placement = self._placement_of(job)
            if placement is None:
                self._lost(job, "its devices are no longer in the pool")
                continue
            if job.opportunistic and not self.hi.config.timeshare:
                self._stop_guest_found(job)
                continue
            try:
                if job.opportunistic:
                    self.hi.adopt_guest(self._item(job), placement, self._since(job.started_at))
                else:
                    self.hi.adopt(self._item(job), placement, self._since(job.started_at))
            except (LedgerError, HiError) as exc:
                self._lost(job, f"cannot hold its slices again: {exc}")
                continue
            handle = self._running[job.id] = Handle(job, None, whole_session=job.opportunistic)
            if self.runner.alive(job.pid, job.pid_start_ticks):
                self.runner.resume(handle)  # a restart must not leave a job paused (a busy owner pauses a guest again)
                guest = " as a time-sharing guest" if job.opportunistic else ""
                self.store.event(job.id, "adopted", f"re-adopted running job (pid {job.pid}){guest}")
        now = self.clock()
        waiting: list[JobRecord] = []
        for job in self.store.jobs(("preempted",)):
            if not self.runner.alive(job.pid, job.pid_start_ticks):
                if job.pid is not None:
                    self.store.update_job(job.id, pid=None, pid_start_ticks=None, slices=None)
                waiting.append(job)
                continue
            # Preempted, and the daemon died before it had stopped: hold its slices until it has.
            handle = Handle(job, None, whole_session=job.opportunistic)
            placement = self._placement_of(job)
            then = "submit"
            if placement is not None and not job.opportunistic:  # a guest holds nothing in the ledger
                try:
                    self.hi.adopt(self._item(job), placement, self._since(job.started_at))
                    then = "release"
                except (LedgerError, HiError):
                    pass
            stop = self._stopping[job.id] = _Stop(
                handle, now + self.config.preemption_grace_s, then, yielded=job.opportunistic
            )
            if not self.runner.terminate(handle):
                stop.killed = True
                self._kill_session(handle)
            self.store.event(job.id, "adopted", f"preempted job still stopping (pid {job.pid}): stopping it again")
        waiting += self.store.jobs(("queued",))
        for job in sorted(waiting, key=lambda j: j.seq):
            try:
                self.hi.submit(self._item(job), now)
            except HiError as exc:  # a record this version cannot schedule: say so, start the others
                self._lost(job, f"cannot be scheduled again: {exc}")
        self._reap()

    def _stop_guest_found(self, job: JobRecord) -> None:
        """A guest found running by a daemon with time-sharing off: it may not stay on others' share. Stopped like
        a victim, then queued again."""
        reason = "yielded: time-sharing is off in this daemon"
        self.store.update_job(job.id, "yielded", f"{reason}; stopping it", state="preempted", reason=reason)
        handle = Handle(job, None, whole_session=True)
        stop = self._stopping[job.id] = _Stop(
            handle, self.clock() + self.config.preemption_grace_s, "submit", yielded=True
        )
        if not self.runner.terminate(handle):
            stop.killed = True
            self._kill_session(handle)

    def _lost(self, job: JobRecord, reason: str) -> None:
        self.store.update_job(job.id, "lost", reason, state="lost", reason=reason, ended_at=time.time())

    def _adopt_unrecorded_start(self, job: JobRecord) -> JobRecord | None:
        """The daemon died between recording a start and recording its pid: find the shim by its pid file,
        or put the job back in the queue if it never started."""
        found = self.runner.adopt_pid(job.id)
        if found is not None:
            pid, ticks = found
            self.store.update_job(job.id, pid=pid, pid_start_ticks=ticks)
            job.pid, job.pid_start_ticks = pid, ticks
            return job
        if self.runner.paths(job.id)[1].exists():
            return job
        self.store.update_job(
            job.id, "requeued", "the daemon stopped before the job started", state="queued", slices=None
        )
        return None

    def _placement_of(self, job: JobRecord) -> Placement | None:
        # By UUID: indices may move when devices are re-enumerated; UUIDs do not.
        wanted = [str(s["uuid"]) for s in job.slices or []]
        memory = _memory_quota(job)  # a guest's is its placement's (recorded in its slices)
        for node_index, group in enumerate(self.group_devices):
            local = {d.uuid: i for i, d in enumerate(group)}
            if wanted and all(w in local for w in wanted):
                return Placement(node_index, tuple(local[w] for w in wanted), job.share_milli, memory, 0, 0)
        return None

    def shutdown(self) -> None:
        """Stop the daemon's side only: jobs keep running and are re-adopted on the next start."""
        self.resume_all()
        self.store.close()

    # ------------------------------------------------------------------ views
    def reason(self, job: JobRecord) -> str:
        """Why a job is in its state now: for waiting work, Hi's answer (what it needs, whom it is held behind,
        which quota); for a preempted job, who preempted it and what it waits for now."""
        start = self._starting.get(job.id)
        if start is not None:
            victims = ", ".join(start.after)
            return f"starting once {victims} stopped ({start.reason})"
        stop = self._stopping.get(job.id)
        if stop is not None and stop.then == "move":
            return f"{stop.reason or job.reason}; stopping, then it starts there"
        if job.state == "queued":
            waiting = self.hi.reason(job.id)
            if job.reason.startswith("yielded") and waiting:
                return f"{job.reason}; now {waiting}"
            return waiting or job.reason
        if job.state == "preempted":
            if job.id in self._stopping:
                return f"{job.reason}; stopping"
            waiting = self.hi.reason(job.id)
            return f"{job.reason}; now {waiting}" if waiting else job.reason
        return job.reason

    def job_view(self, job: JobRecord) -> dict[str, object]:
        """What the API shows of a job, with the reason as of now; a time-sharing guest is ``opportunistic`` and
        ``paused`` while its device's owners are busy."""
        guest = self.hi.guests.get(job.id) if job.state == "running" else None
        return {**job.public(), "reason": self.reason(job), "paused": bool(guest is not None and guest.paused)}

    def queue_view(self) -> list[dict[str, object]]:
        """Per queue: guarantee, borrowing limit, use, borrowing and pending work (``hi.queue_view``)."""
        return self.hi.queue_view()

    def used_memory_mib(self, job_id: str, device_index: int) -> int | None:
        """Device memory a running job really uses on one device (its processes, as the backend reads them);
        None when the backend cannot tell."""
        if device_index not in self._memory_read:
            return None
        return self._job_memory_mib.get(job_id, {}).get(device_index, 0)

    def _name(self, job_id: str) -> str:
        handle = self._running.get(job_id)
        if handle is not None:
            return handle.record.name
        job = self.store.job(job_id)
        return job.name if job is not None else job_id

    def pool_view(self) -> dict[str, object]:
        devices = []
        for node_index, group in enumerate(self.group_devices):
            for local_index, device in enumerate(group):
                slices = [
                    {
                        "job": job_id,
                        "name": self._name(job_id),
                        "share_milli": p.share_milli,
                        "memory_mib": p.device_memory_mib,
                        "used_memory_mib": self.used_memory_mib(job_id, device.index),
                        "paused": bool(job_id in self._running and self._running[job_id].stopped_by_slicer),
                        "opportunistic": False,
                    }
                    for job_id, p in self.state.grants.items()
                    if p.node_index == node_index and local_index in p.device_indices
                ]
                slices += [
                    {
                        "job": job_id,
                        "name": self._name(job_id),
                        "share_milli": guest.placement.share_milli,
                        "memory_mib": guest.memory_mib,
                        "used_memory_mib": self.used_memory_mib(job_id, device.index),
                        "paused": guest.paused,
                        "opportunistic": True,
                    }
                    for job_id, guest in self.hi.guests.items()
                    if guest.placement.node_index == node_index and local_index in guest.placement.device_indices
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
        return {
            "backend": self.backend.name,
            "share_step_milli": self.config.share_step_milli,
            "lending": self.config.lending,
            "devices": devices,
            "running": len(self._running),
            "queued": len(self.store.jobs(("queued",))),
            "preempted": len(self.store.jobs(("preempted",))),
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


def _memory_quota(job: JobRecord) -> int:
    """The device-memory quota a job runs under: its request's, or for a time-sharing guest its placement's."""
    if job.opportunistic and job.slices:
        return max(int(s["memory_mib"]) for s in job.slices)  # type: ignore[call-overload]
    return job.memory_mib


def _device_dict(device: DeviceInfo) -> dict[str, object]:
    return dataclasses.asdict(device)


__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_QUEUE",
    "MIB_PER_GIB",
    "PRIORITY_CLASSES",
    "JobSubmission",
    "Pool",
    "PoolConfig",
    "SubmitError",
]
