"""Remote XPU faults, each with a typed error and nothing left behind: kill -9 of the worker, a frozen worker
(heartbeats), the link cut during a 64 MiB transfer, cancellation, lease expiry."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from flexai.remote import CallCancelledError, LeaseExpiredError, WorkerLostError, connect
from tests.test_remote_support import certs, token_of, workers  # noqa: F401  (fixtures)

ENTRY = "tests.test_remote_support:build"


def _session(worker, **kwargs):  # noqa: ANN001, ANN202
    return connect(f"unix:{worker.spec.unix}", worker.spec.lease, token_of(worker.spec), **kwargs)


def test_kill_9_during_a_call_fails_it_at_once(workers) -> None:  # noqa: F811
    worker = workers()
    session = _session(worker)
    net = session.create(ENTRY)
    future = net.call_async("sleep", 30.0)
    time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(worker.process.pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError, match="is gone"):
        future.result(5)
    assert time.monotonic() - killed_at < 1.5
    with pytest.raises(WorkerLostError):
        net(np.ones(2))
    worker.process.wait(5)
    session.close()


def test_a_frozen_worker_is_found_by_missed_heartbeats(workers) -> None:  # noqa: F811
    worker = workers()
    session = _session(worker, heartbeat_s=0.2)
    net = session.create(ENTRY)
    future = net.call_async("sleep", 30.0)
    os.kill(worker.process.pid, signal.SIGSTOP)  # like a machine that died: no reset, just silence
    try:
        stopped_at = time.monotonic()
        with pytest.raises(WorkerLostError, match="missed 3 heartbeats"):
            future.result(5)
        assert time.monotonic() - stopped_at < 1.5
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
        session.close()


class CuttingProxy:
    """A TCP relay on loopback that cuts both directions once ``cut_after`` bytes went from client to worker."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        sent = 0

        def back() -> None:
            try:
                while data := server.recv(1 << 16):
                    client.sendall(data)
            except OSError:
                pass

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := client.recv(1 << 16):
                server.sendall(data)
                sent += len(data)
                if sent >= self.cut_after:
                    break
        except OSError:
            pass
        self.cut.set()
        for sock in (client, server):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            sock.close()
        self.listener.close()


def test_link_cut_during_a_64_mib_transfer(workers, certs) -> None:  # noqa: F811
    cert, key = certs
    worker = workers(tcp="127.0.0.1:0", tls_cert=cert, tls_key=key)
    proxy = CuttingProxy(worker.stats()["tcp_port"], cut_after=20 << 20)
    session = connect(f"tls://127.0.0.1:{proxy.port}", worker.spec.lease, token_of(worker.spec), ca=cert,
                      server_name="127.0.0.1")
    net = session.create(ENTRY)
    with pytest.raises(WorkerLostError):
        net.call("echo", np.ones(64 << 20, np.uint8), timeout=20)
    assert proxy.cut.is_set()
    session.close()
    # The worker is unharmed: a new connection is served and nothing of the cut frame stayed.
    again = _session(worker)
    assert again.create(ENTRY)(np.ones(2)).tolist() == [1.0, 1.0]
    again.close()
    assert worker.process.poll() is None


def test_cancel_drops_a_running_and_a_queued_call(workers) -> None:  # noqa: F811
    worker = workers()
    session = _session(worker)
    try:
        net = session.create(ENTRY)
        running = net.call_async("sleep", 0.5)
        queued = net.call_async("encode", np.ones(3), keep=True)
        time.sleep(0.1)
        assert running.cancel() and queued.cancel()
        for future in (running, queued):
            with pytest.raises(CallCancelledError):
                future.result(1)
        assert net.call("echo", "after") == "after"  # the session goes on
        time.sleep(1.1)  # the worker's counters are written once a second
        assert worker.stats()["objects"] == 1  # the cancelled keep=True result was not kept
    finally:
        session.close()


def test_lease_expires_without_heartbeats_and_the_worker_ends(workers) -> None:  # noqa: F811
    worker = workers(ttl_s=1.0)
    session = _session(worker, heartbeat_s=0)  # a client that stopped heartbeating
    net = session.create(ENTRY)
    deadline = time.monotonic() + 5
    while worker.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.process.poll() == 0, "the worker ends itself (and frees its slice) when the lease expires"
    with pytest.raises((LeaseExpiredError, WorkerLostError)) as caught:
        net.call("echo", 1, timeout=5)
    assert "lease expired" in str(caught.value) or isinstance(caught.value, WorkerLostError)
    assert worker.stats()["state"] == "ended" and "lease expired" in worker.stats()["reason"]
    session.close()


def test_a_worker_nobody_connects_to_ends_by_itself(workers) -> None:  # noqa: F811
    worker = workers(connect_timeout_s=0.3)
    worker.process.wait(5)
    assert worker.process.returncode == 0
    assert "no client connected" in worker.stats()["reason"]
