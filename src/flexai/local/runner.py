"""The pool's processes: start a job's shim, find its command's process group, pause, resume, stop and kill it.

A job is the session its shim leads (``flexai.local.shim``): the shim's own group, the command's group (the
*job group*, which the time-slicer pauses) and any group the command made. Signals go only to groups of that
session, and only while the shim is the process that was started (its pid and start time match), so a reused
pid never gets a signal meant for a job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flexai.local.procfs import process_group_and_session, process_start_ticks, process_state, processes_of
from flexai.local.store import JobRecord


@dataclass
class Handle:
    """A started job: its record, its shim process (None when adopted after a restart) and what the pool
    knows of it now."""

    record: JobRecord
    process: subprocess.Popen[bytes] | None
    over_quota_since: float | None = None
    stopped_by_slicer: bool = False
    job_group: int | None = None
    """Process group of the command (inside the shim's session); the slicer pauses this group, never the shim."""
    whole_session: bool = False
    """Pause every group of the session but the shim's, not only the command's (a time-sharing guest: whatever it
    started must leave the device to its owners)."""


class Runner:
    """Starts shims and signals the sessions they lead; keeps each job's files under ``logs_dir``."""

    def __init__(self, logs_dir: Path, owner_file: Path, job_umask: int) -> None:
        self.logs_dir = logs_dir
        self.owner_file = owner_file
        self.job_umask = job_umask

    # ------------------------------------------------------------------ files
    def paths(self, job_id: str) -> tuple[Path, Path]:
        """The job's log (appended to by every start) and its exit-status file."""
        return self.logs_dir / f"{job_id}.log", self.logs_dir / f"{job_id}.exit"

    def pid_file(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.pid"

    def group_file(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.group"

    def exit_code(self, job_id: str) -> int | None:
        """The command's exit status as the shim recorded it; None when it has not ended (or no record)."""
        exit_file = self.paths(job_id)[1]
        try:
            return int(exit_file.read_text().strip() or 1)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return 1

    # ------------------------------------------------------------------ start
    def start(self, job: JobRecord, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the job's shim as the leader of a new session; raises OSError or ValueError when it cannot."""
        log, exit_file = self.paths(job.id)
        exit_file.unlink(missing_ok=True)
        self.pid_file(job.id).unlink(missing_ok=True)
        self.group_file(job.id).unlink(missing_ok=True)
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flexai.local.shim",
                str(exit_file),
                str(log),
                "--watch",
                str(self.owner_file),
                "--umask",
                f"{self.job_umask:o}",
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

    def adopt_pid(self, job_id: str) -> tuple[int, int | None] | None:
        """(pid, start ticks) of a shim that wrote its pid file (started by a daemon that died before it could
        record the pid); None when there is none."""
        try:
            pid = int(self.pid_file(job_id).read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid, process_start_ticks(pid) if pid else None

    # ------------------------------------------------------------------ what lives
    @staticmethod
    def alive(pid: int | None, start_ticks: int | None) -> bool:
        """Whether the process that was started as ``pid`` (at ``start_ticks``) still lives (not a zombie)."""
        if pid is None:
            return False
        ticks = process_start_ticks(pid)
        if ticks is None:
            return False
        if start_ticks is not None and ticks != start_ticks:
            return False  # the pid was reused by another process
        return process_state(pid) not in (None, "Z")

    def shim_alive(self, handle: Handle) -> bool:
        if handle.process is not None:
            handle.process.poll()  # reap it if it ended, so that it is no zombie
        return self.alive(handle.record.pid, handle.record.pid_start_ticks)

    def job_group(self, handle: Handle) -> int | None:
        """Process group of a job's command (what the slicer pauses); None until the shim has started it."""
        if handle.record.pid is None:
            return None
        if handle.job_group is None:
            try:
                group = int(self.group_file(handle.record.id).read_text().strip())
            except (OSError, ValueError):
                return None
            # Only a group of this job's own session (the shim's): never signal a stranger's reused pid.
            if process_group_and_session(group) == (group, handle.record.pid):
                handle.job_group = group
        return handle.job_group

    def _session_groups(self, handle: Handle) -> list[int]:
        """The shim's group first, then the command's group, then any other group of the job's session."""
        shim = handle.record.pid
        assert shim is not None
        groups = [shim, self.job_group(handle) or shim]
        groups += sorted({g for pid, _ in processes_of(shim) for g in [_process_group(pid)] if g is not None})
        return list(dict.fromkeys(groups))

    # ------------------------------------------------------------------ signals
    def gate(self, handle: Handle, run: bool) -> None:
        """Pause or resume the job's command group, or with ``handle.whole_session`` every group of its session
        (never its shim, which must stay free to resume them when the pool dies)."""
        if handle.record.pid is None or run == (not handle.stopped_by_slicer):
            return
        group = self.job_group(handle)
        if group is None:
            return
        groups = self._session_groups(handle)[1:] if handle.whole_session else [group]
        sig = signal.SIGCONT if run else signal.SIGSTOP
        signalled = False
        for target in groups:
            try:
                os.killpg(target, sig)
                signalled = True
            except (ProcessLookupError, PermissionError):
                continue
        if signalled:
            handle.stopped_by_slicer = not run

    def resume(self, handle: Handle) -> None:
        """SIGCONT to every group of the job's session (a restarted pool must not leave a job paused)."""
        groups = [handle.record.pid, self.job_group(handle)]
        if handle.record.pid is not None and self.alive(handle.record.pid, handle.record.pid_start_ticks):
            groups = [*self._session_groups(handle)]
        for group in groups:
            if group is None:
                continue
            try:
                os.killpg(group, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        handle.stopped_by_slicer = False

    def terminate(self, handle: Handle) -> bool:
        """Ask the job to stop: SIGCONT (it may be paused), then SIGTERM to every group of its session but the
        shim's (the shim stays to record the end). False when there is no command to ask (not started yet, or
        its group is unknown): kill it instead."""
        shim = handle.record.pid
        if shim is None or not self.alive(shim, handle.record.pid_start_ticks) or self.job_group(handle) is None:
            return False
        for group in self._session_groups(handle)[1:]:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    break
        handle.stopped_by_slicer = False
        return True

    def kill(self, handle: Handle) -> None:
        """SIGKILL the whole session, the shim first so that it records nothing; paused groups get SIGCONT."""
        shim = handle.record.pid
        if shim is None or not self.alive(shim, handle.record.pid_start_ticks):
            return  # never signal a group whose leader pid was reused
        for group in self._session_groups(handle):
            for sig in (signal.SIGKILL,) if group == shim else (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    break

    @staticmethod
    def wait(handle: Handle, timeout_s: float) -> None:
        """Wait for a shim this pool started (no-op for an adopted one)."""
        if handle.process is not None:
            try:
                handle.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel (e.g. a device call): the slice is released all the same


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


__all__ = ["Handle", "Runner"]
