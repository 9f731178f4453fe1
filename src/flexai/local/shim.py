"""Runs one job's command, records its exit status in a file, and never leaves the job paused.

    python -m flexai.local.shim EXIT_FILE LOG_FILE [--watch OWNER_FILE] [--umask OCTAL] -- COMMAND [ARGS...]

Started by the pool as the leader of a new session. The command runs in a process group of its own inside
that session (the *job group*, whose id the shim writes to ``<job>.group``): time-slicing pauses and resumes
the job group only, so the shim itself is never stopped and can always

- record how the command ended (``<job>.exit``; the status survives a daemon restart), and
- guard against a dead pool: with ``--watch``, it reads the pool owner's pid and start time from OWNER_FILE
  a few times a second, and as soon as that process is gone (however it died: ``kill -9``, a crash, SIGTERM)
  it resumes the job group and every other group of its session (a time-sharing guest is paused whole), so
  no job stays paused without a pool to resume it. A pool that starts again
  writes OWNER_FILE anew and is watched from then on.

The shim ignores SIGTERM so that it can still record how the command ended; the pool cancels a job with
SIGKILL to both groups, which ends them without a record ("killed"). It first writes its pid next to the exit
file (``<job>.pid``), so a daemon that died right after starting it can still find and adopt it. Every file it
writes is private to the user (0600); the command runs with the umask given by ``--umask`` (the user's own).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

from flexai.local.procfs import process_group_and_session, process_start_ticks, process_state, processes_of

WATCH_PERIOD_S = 0.25
"""How often the shim checks that its pool is alive; a paused job resumes at most this long after it died."""

USAGE = "usage: python -m flexai.local.shim EXIT_FILE LOG_FILE [--watch OWNER_FILE] [--umask OCTAL] -- COMMAND..."


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (through ``path.tmp``), mode 0600 whatever the umask."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def owner_alive(owner_file: str) -> bool:
    """Whether the process named in ``owner_file`` (``PID START_TICKS``) still lives; False when unreadable."""
    try:
        with open(owner_file) as fh:
            pid_text, ticks_text = fh.read().split()[:2]
        pid, ticks = int(pid_text), int(ticks_text)
    except (OSError, ValueError):
        return False
    return process_start_ticks(pid) == ticks and process_state(pid) not in (None, "Z", "X")


def _resume(group: int) -> None:
    try:
        os.killpg(group, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        pass


def _resume_session(job_group: int) -> None:
    """SIGCONT to the job group, then to every other group of this shim's session (never its own)."""
    _resume(job_group)
    me = os.getpid()
    groups = set()
    for pid, _ in processes_of(me):
        ids = process_group_and_session(pid)
        if ids is not None and ids[1] == me and ids[0] not in (me, job_group):
            groups.add(ids[0])
    for group in sorted(groups):
        _resume(group)


def _wait_watching(child: subprocess.Popen[bytes], owner_file: str | None) -> int:
    """Wait for the command; meanwhile resume its group whenever the pool owner is found dead."""
    if owner_file is None:
        return child.wait()
    try:
        pidfd: int | None = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        pidfd = None
    owner_was_alive = True
    try:
        while True:
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], WATCH_PERIOD_S)
                if ready:
                    return child.wait()
            else:
                try:
                    return child.wait(timeout=WATCH_PERIOD_S)
                except subprocess.TimeoutExpired:
                    pass
            alive = owner_alive(owner_file)
            if owner_was_alive and not alive:
                _resume_session(child.pid)  # the job group's id is the command's pid; not reaped yet, so not reused
            owner_was_alive = alive
    finally:
        if pidfd is not None:
            os.close(pidfd)


def parse(argv: list[str]) -> tuple[str, str, str | None, int | None, list[str]] | None:
    if len(argv) < 4 or "--" not in argv[2:]:
        return None
    exit_file, log_file = argv[0], argv[1]
    split = argv.index("--", 2)
    options, command = argv[2:split], argv[split + 1 :]
    watch: str | None = None
    umask: int | None = None
    while options:
        key = options.pop(0)
        if not options:
            return None
        value = options.pop(0)
        if key == "--watch":
            watch = value
        elif key == "--umask":
            try:
                umask = int(value, 8)
            except ValueError:
                return None
        else:
            return None
    if not command:
        return None
    return exit_file, log_file, watch, umask, command


def main(argv: list[str]) -> int:
    parsed = parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    exit_file, log_file, watch, job_umask, command = parsed
    user_umask = os.umask(0o077)
    if job_umask is None:
        job_umask = user_umask
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    base = exit_file.removesuffix(".exit")
    write_private(f"{base}.pid", str(os.getpid()))
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)

    def in_child() -> None:  # before exec: the user's umask and default SIGTERM handling back
        os.umask(job_umask)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    with os.fdopen(log_fd, "ab", buffering=0) as log:
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=in_child,
            )
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.write(f"flexai: cannot start {command[0]!r}: {reason}\n".encode())
            code = 127
        else:
            write_private(f"{base}.group", str(child.pid))
            status = _wait_watching(child, watch)
            code = status if status >= 0 else 128 - status
    write_private(exit_file, str(code))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
