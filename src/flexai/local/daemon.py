"""`flexai serve`: the pool loop in a thread, the API on a unix socket (0600) or on TCP with a bearer token."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from flexai.local.api import create_app
from flexai.local.pool import Pool

log = logging.getLogger(__name__)

LOOP_PERIOD_S = 0.02
UTILISATION_PERIOD_S = 1.0


class PoolLoop:
    """Ticks the pool (reap, memory watchdog, scheduling) and its time-slicer until stopped."""

    def __init__(self, pool: Pool, lock: threading.RLock) -> None:
        self.pool = pool
        self.lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexai-pool-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last_point = 0.0
        while not self._stop.is_set():
            with self.lock:
                try:
                    self.pool.tick()
                    self.pool.timeslice()
                    now = time.monotonic()
                    if now - last_point >= UTILISATION_PERIOD_S:
                        self.pool.record_utilisation()
                        last_point = now
                except Exception:  # noqa: BLE001  (the loop must outlive any one bad tick)
                    log.exception("pool loop tick failed; resuming every paused job and going on")
                    self.pool.resume_all()
                    self.pool.store.event(None, "error", "a pool loop tick failed; see the daemon log")
            self._stop.wait(LOOP_PERIOD_S)


class StateInUseError(RuntimeError):
    pass


def lock_state(state_dir: Path) -> int:
    """Hold the state folder for this daemon's life: two daemons on one state would grant slices twice."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateInUseError(f"another flexai serve is running on state {state_dir}") from None
    return fd


def socket_path(state_dir: Path) -> Path:
    return state_dir / "flexai.sock"


def bind_private_socket(path: Path) -> socket.socket:
    """A listening unix socket that only this user may use (mode 0600 from the start, no window)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(128)
    return listener


def serve(pool: Pool, state_dir: Path, listen: tuple[str, int] | None, token: str | None) -> None:
    import uvicorn

    lock = threading.RLock()
    loop = PoolLoop(pool, lock)
    app = create_app(pool, lock, token if listen else None)
    loop.start()
    (state_dir / "daemon.pid").write_text(str(os.getpid()))
    try:
        if listen:
            config = uvicorn.Config(app, host=listen[0], port=listen[1], log_level="warning")
            uvicorn.Server(config).run()
        else:
            listener = bind_private_socket(socket_path(state_dir))
            try:
                uvicorn.Server(uvicorn.Config(app, fd=listener.fileno(), log_level="warning")).run()
            finally:
                listener.close()
                socket_path(state_dir).unlink(missing_ok=True)
    finally:
        loop.stop()
        with lock:
            pool.shutdown()


def install_signal_handlers() -> None:
    # uvicorn handles SIGINT/SIGTERM for a graceful stop; SIGHUP does the same here.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
