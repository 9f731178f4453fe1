"""`flexai serve`: the pool loop in a thread, the API on a unix socket (0600) or on TCP with a bearer token.

SIGTERM, SIGINT and SIGHUP stop the daemon gracefully: the API stops, every job paused by the time-slicer is
resumed, and the jobs keep running for the next daemon to adopt. A daemon that dies without a word (``kill
-9``, a crash) cannot do that: each job's shim notices within a fraction of a second and resumes its job itself
(see ``flexai.local.shim``).
"""

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
from flexai.local.lease import LeaseManager, RemoteSettings
from flexai.local.pool import Pool
from flexai.local.shim import write_private

log = logging.getLogger(__name__)

LOOP_PERIOD_S = 0.02
UTILISATION_PERIOD_S = 1.0


class PoolLoop:
    """Ticks the pool (reap, memory watchdog, scheduling) and its time-slicer until stopped."""

    def __init__(self, pool: Pool, lock: threading.RLock, leases: LeaseManager | None = None) -> None:
        self.pool = pool
        self.lock = lock
        self.leases = leases
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
                    if self.leases is not None:
                        self.leases.tick()
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


class RemoteListenError(RuntimeError):
    """``--remote-listen`` cannot be bound (address in use, not an address of this machine)."""


def private_umask() -> int:
    """Make every file this process creates private (umask 077); returns the umask it had (the jobs get that)."""
    return os.umask(0o077)


def lock_state(state_dir: Path) -> int:
    """Hold the state folder for this daemon's life: two daemons on one state would grant slices twice."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _server(config: object) -> object:
    """A uvicorn server that stops gracefully on SIGINT, SIGTERM and SIGHUP and then returns.

    uvicorn's own handling re-raises the signal after its shutdown, which kills the process before the pool
    could resume its paused jobs; this one only asks the server to exit."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self._stop) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _stop(self, sig: int, frame: object) -> None:
            self.should_exit = True

    return Server(config)  # type: ignore[arg-type]


def serve(
    pool: Pool,
    state_dir: Path,
    listen: tuple[str, int] | None,
    token: str | None,
    remote: RemoteSettings | None = None,
) -> None:
    """Run the daemon until a stop signal. ``remote``: serve remote XPU leases (``flexai.local.lease``)."""
    import uvicorn

    lock = threading.RLock()
    leases = LeaseManager(pool, state_dir, remote)
    try:
        leases.listen()
    except OSError as exc:
        pool.shutdown()
        raise RemoteListenError(f"--remote-listen={remote and remote.host}:{remote and remote.port} cannot be "
                                f"served: {exc.strerror or exc}") from None
    loop = PoolLoop(pool, lock, leases)
    app = create_app(pool, lock, token if listen else None, leases)
    loop.start()
    write_private(str(state_dir / "daemon.pid"), str(os.getpid()))
    try:
        if listen:
            config = uvicorn.Config(app, host=listen[0], port=listen[1], log_level="warning")
            _server(config).run()  # type: ignore[attr-defined]
        else:
            listener = bind_private_socket(socket_path(state_dir))
            try:
                _server(uvicorn.Config(app, fd=listener.fileno(), log_level="warning")).run()  # type: ignore[attr-defined]
            finally:
                listener.close()
                socket_path(state_dir).unlink(missing_ok=True)
    finally:
        # Signals during the shutdown must not cut it short: the paused jobs are resumed first.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        loop.stop()
        leases.close()
        with lock:
            pool.shutdown()
