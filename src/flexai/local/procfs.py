"""What /proc tells about the pool's processes: start time (to tell a live job from a reused pid), state,
process group and session, and CPU time."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgrp, [3] session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot; None when it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_state(pid: int) -> str | None:
    """One-letter state (R, S, T, Z, ...) or None when the process does not exist."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_group_and_session(pid: int) -> tuple[int, int] | None:
    """(process group id, session id) of a process; None when it does not exist."""
    fields = _stat_fields(pid)
    return (int(fields[2]), int(fields[3])) if fields else None


def processes_of(leader: int) -> list[tuple[int, str]]:
    """(pid, state) of every live process in the process group or the session whose id is ``leader``.

    A pool job is the session of its shim: the shim leads it, the command runs in a group of its own inside."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields and (int(fields[2]) == leader or int(fields[3]) == leader):
            found.append((int(entry.name), fields[0]))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in the process group or session ``pgid`` (a job's
    shim pid covers the whole job)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields and (int(fields[2]) == pgid or int(fields[3]) == pgid):
            total += int(fields[11]) + int(fields[12])
    return total / ticks
