"""Helpers for tests of the embedded pool: jobs that end on demand, waiting on real processes, CPU time."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from flexai.local.procfs import group_cpu_seconds

__all__ = ["busy_command", "gated_command", "group_cpu_seconds", "wait_for"]


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
