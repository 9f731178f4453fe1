"""Runs one job's command and records its exit status in a file, so the status survives a daemon restart.

Started by the daemon as the leader of a new session (its process group is the job's group: time-slicing
and cancel signal the whole group). It ignores SIGTERM itself so that it can still record how the command
ended; SIGKILL of the group ends both without a record, which the daemon reads as "killed".

    python -m flexai.local.shim EXIT_FILE LOG_FILE -- COMMAND [ARGS...]

It first writes its pid next to the exit file (``<job>.pid``), so a daemon that died right after starting
it can still find and adopt it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m flexai.local.shim EXIT_FILE LOG_FILE -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    exit_file, log_file, command = argv[0], argv[1], argv[3:]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid_file = exit_file.removesuffix(".exit") + ".pid"
    with open(f"{pid_file}.tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(f"{pid_file}.tmp", pid_file)
    with open(log_file, "ab", buffering=0) as log:
        try:
            # The child gets default SIGTERM handling back (preexec restores it before exec).
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
            )
        except OSError as exc:
            log.write(f"flexai: cannot start {command[0]!r}: {exc.strerror}\n".encode())
            code = 127
        else:
            status = child.wait()
            code = status if status >= 0 else 128 - status
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(code))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, exit_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
