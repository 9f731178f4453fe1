"""Helpers for tests of the embedded pool: jobs that end on demand, waiting on real processes, CPU time, and a
pool that runs no process at all (for API and CLI tests)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from flexai.local.pool import Pool, PoolConfig
from flexai.local.procfs import group_cpu_seconds
from flexai.local.store import JobRecord
from flexai.model import Placement
from flexai.node.devices import discover

__all__ = ["NoProcessPool", "busy_command", "gated_command", "group_cpu_seconds", "no_process_pool", "wait_for"]


class NoProcessPool(Pool):
    """A pool whose jobs start and succeed at once without any process (the command is never run)."""

    def _start(self, job: JobRecord, placement: Placement) -> None:
        self.store.update_job(job.id, state="running", slices=self._slices(placement))
        self._finish(job.id, "succeeded", "exit code 0", 0)


def no_process_pool(tmp_path: Path, spec: str = "2xA100-80GB") -> NoProcessPool:
    backend, devices = discover(f"sim:{spec}")
    return NoProcessPool(tmp_path / "state", backend, devices, PoolConfig())


def gated_command(release_file: Path) -> list[str]:
    """A job that runs until ``release_file`` exists, then exits 0."""
    code = f"import os, time\nwhile not os.path.exists({str(release_file)!r}):\n    time.sleep(0.02)\nprint('done')"
    return [sys.executable, "-c", code]


def busy_command(seconds: float) -> list[str]:
    """A CPU-bound stand-in for a device-bound job."""
    return [sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass"]


def wait_for(predicate: Callable[[], bool], tick: Callable[[], None] | None = None, timeout_s: float = 20.0) -> None:
    """Wait for real processes (not a clock we could fake) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick:
            tick()
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")
