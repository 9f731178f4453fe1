"""The lease worker: one process per lease, run by the pool inside the granted slice.

It serves the lease's client over TCP with TLS (straight, or through connections the pool's gateway hands over
with SCM_RIGHTS) and over a unix socket for a client on the same machine. Every frame must carry the lease's
token (``flexai.remote.auth``); before a valid hello a connection may send one small header and nothing else.

It creates objects only from entry points (``module:callable``) that its allow-list names, loads weights only
as safetensors, and keeps created objects and kept results resident; handles to them travel instead of data.
Calls run one at a time, in the order they came (a slice is one device's share: running them side by side would
only contend for it). A call that comes when none runs is run by the connection thread that read it, with no
hand-over to another thread (a small call's answer goes out as soon as it is computed); one that comes while
another runs waits in line and the running thread takes it next. When a call has run for ``INLINE_HANDOFF_S``,
its connection gets a new reader thread, so heartbeats, cancellations and further calls are read while it runs.

The worker ends itself, freeing the slice, when no heartbeat or call came for ``ttl_s`` (the client is gone),
or when no client connected within ``connect_timeout_s`` of its start.

Run: ``python -m flexai.remote.worker LEASE_FILE`` (the file is a ``LeaseSpec``, mode 0600).
"""

from __future__ import annotations

import fnmatch
import hmac
import importlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexai.remote.auth import LeaseSpec, check_token, make_token, read_preamble, server_context, write_private
from flexai.remote.errors import (
    AuthError,
    FrameError,
    LeaseExpiredError,
    NotAllowedError,
    RemoteError,
    TransferError,
)
from flexai.remote.wire import HELLO_LIMITS, BufferPool, Frame, FrameReader, Limits, Ref, encode_tree, send_frame

log = logging.getLogger("flexai.remote.worker")

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
ENTRY_POINT = re.compile(f"^{_DOTTED}:{_DOTTED}$")
METHOD = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_CONNECTIONS = 16
HANDSHAKE_TIMEOUT_S = 5.0
SUPERVISE_PERIOD_S = 0.1
INLINE_HANDOFF_S = 0.02
"""A call run by its connection's reader thread for this long makes the connection get another reader."""
HANDOFF_PERIOD_S = 0.02
STATS_PERIOD_S = 1.0
CALL_OPS = ("create", "call", "fetch", "free")


def entry_allowed(entry: str, allow: list[str]) -> bool:
    """``entry`` (module:callable) matches one of the allow-list's globs (``mypkg.models:*``)."""
    return any(fnmatch.fnmatchcase(entry, pattern) for pattern in allow)


def check_entry(entry: object, allow: list[str]) -> str:
    if not isinstance(entry, str) or not ENTRY_POINT.match(entry):
        raise NotAllowedError(f"entry point {str(entry)[:200]!r} is not allowed: module.path:callable (identifiers)")
    if any(part.startswith("_") for part in re.split(r"[.:]", entry)):
        raise NotAllowedError(f"entry point {entry!r} is not allowed: no part may start with '_'")
    if not entry_allowed(entry, allow):
        shown = ", ".join(allow) or "nothing (no --allow given)"
        raise NotAllowedError(f"entry point {entry!r} is not allowed: the worker's allow-list is {shown}")
    return entry


def load_entry(entry: str) -> Callable[..., Any]:
    """Import the module of an allow-listed entry point (only after ``check_entry``) and find the callable."""
    module_name, _, qualname = entry.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise NotAllowedError(f"entry point {entry!r} cannot be loaded: {exc}") from None
    if not callable(target):
        raise NotAllowedError(f"entry point {entry!r} is a {type(target).__name__}: a callable is required")
    return target


def load_weights(data: bytes | bytearray) -> dict[str, np.ndarray]:
    """Weights in the safetensors format (a JSON header and raw tensors: nothing executable)."""
    from safetensors.numpy import load

    try:
        return load(bytes(data))
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types; all mean "not valid")
        raise TransferError(f"weights are not a valid safetensors file: {str(exc)[:200]}") from None


def _torch_args(target: Any, value: Any) -> Any:
    """Arrays as torch tensors when the target is a torch module (only if torch is already imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(getattr(target, "__self__", target), torch.nn.Module):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, list):
        return [_torch_args(target, v) for v in value]
    if isinstance(value, dict):
        return {k: _torch_args(target, v) for k, v in value.items()}
    return value


@dataclass
class Stats:
    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    client: str = ""
    connections: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class Connection:
    def __init__(self, worker: Worker, sock: socket.socket, peer: str) -> None:
        self.worker = worker
        self.sock = sock
        self.peer = peer
        self.frames = FrameReader(sock, worker.pool)
        self.send_lock = threading.Lock()
        self.cancelled: set[int] = set()
        self.closed = False
        self._lock = threading.Lock()
        self._reader_turn = 0
        """Which reader thread reads the socket now (a new one takes over when the reader runs a long call)."""
        self._running_since: float | None = None
        """When this connection's reader thread started running calls (None: it is reading)."""

    def send(self, header: dict[str, Any], buffers: list[memoryview] | None = None) -> None:
        with self.send_lock:
            if self.closed:
                return
            try:
                sent = send_frame(self.sock, header, buffers)
            except OSError:
                self.close()
                return
        self.worker.stats.bytes_out += sent

    def error(self, call_id: object, exc: BaseException) -> None:
        kind = exc.kind if isinstance(exc, RemoteError) else "call"
        self.send(
            {"op": "error", "id": call_id if isinstance(call_id, int) else None, "kind": kind,
             "message": str(exc)[:4000], "type": type(exc).__name__}
        )

    def close(self) -> None:
        """Shut the connection down; the reader thread closes the socket when it leaves (closing it here, under
        a thread still reading it, would let that thread read a new connection that reuses the descriptor)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---------------------------------------------------------------- who reads
    def running(self, since: float | None) -> None:
        """The reader thread starts (a time) or stops (None) running calls."""
        with self._lock:
            self._running_since = since

    def hand_off(self, now: float) -> None:
        """Give the connection a new reader thread if its reader has been running calls for ``INLINE_HANDOFF_S``
        (the old one ends when its calls are done)."""
        with self._lock:
            if self.closed or self._running_since is None or now - self._running_since < INLINE_HANDOFF_S:
                return
            self._running_since = None
            self._reader_turn += 1
            turn = self._reader_turn
        threading.Thread(target=self._read_loop, args=(turn,), name=f"flexai-conn-{self.peer}", daemon=True).start()

    def _my_turn(self, turn: int) -> bool:
        with self._lock:
            self._running_since = None
            return self._reader_turn == turn

    # ---------------------------------------------------------------- serving
    def serve(self) -> None:
        worker = self.worker
        try:
            self.sock.settimeout(HANDSHAKE_TIMEOUT_S)  # a connection that never says hello frees its place
            worker.reload_epoch()  # a token re-issued a moment ago already counts for a new connection
            hello = self.frames.read_frame(HELLO_LIMITS, None, worker.authorise_header)
            # Blocking from here: a timeout makes an SSL socket non-blocking underneath, and then a read racing
            # the executor's write can end early. A silent client is found by the supervisor's TTL instead.
            self.sock.settimeout(None)
            if hello.header.get("op") != "hello":
                raise AuthError(f"op={str(hello.header.get('op'))[:40]!r} before hello: a connection starts with hello")
            worker.authorise(hello.header.get("token"))
            worker.stats.client = self.peer
            worker.touch()
            self.send({"op": "ok", "id": hello.header.get("id") if isinstance(hello.header.get("id"), int) else 0,
                       "lease": worker.spec.lease, "heartbeat_s": worker.spec.heartbeat_s, "ttl_s": worker.spec.ttl_s,
                       "pid": os.getpid()})
        except (FrameError, AuthError) as exc:
            log.info("connection from %s refused: %s", self.peer, exc)
            self.error(None, exc)
            self._end()
            return
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            log.info("connection from %s closed: %s", self.peer, exc or type(exc).__name__)
            self._end()
            return
        except Exception:  # noqa: BLE001  (a bug here must cost this connection only, never the lease)
            log.exception("connection from %s failed", self.peer)
            self._end()
            return
        self._read_loop(0)

    def _read_loop(self, turn: int) -> None:
        worker = self.worker
        try:
            while not self.closed:
                frame = self.frames.read_frame(worker.limits, worker.progress, worker.authorise_header)
                worker.stats.bytes_in += frame.payload_bytes
                worker.touch()
                self.dispatch(frame, turn)
                del frame
                if not self._my_turn(turn):
                    return  # another thread reads this connection now
        except (FrameError, AuthError) as exc:
            log.info("connection from %s refused: %s", self.peer, exc)
            self.error(None, exc)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            # The client went away or stopped talking: its calls' results have nowhere to go.
            log.info("connection from %s closed: %s", self.peer, exc or type(exc).__name__)
        except Exception:  # noqa: BLE001  (a bug here must cost this connection only, never the lease)
            log.exception("connection from %s failed", self.peer)
        self._end()

    def _end(self) -> None:
        self.close()
        with self.send_lock:
            self.sock.close()
        self.worker.forget(self)

    def dispatch(self, frame: Frame, turn: int = 0) -> None:
        op = frame.header.get("op")
        call_id = frame.header.get("id")
        if op == "ping":
            self.send({"op": "pong", "id": call_id if isinstance(call_id, int) else 0})
        elif op == "cancel":
            target = frame.value
            if isinstance(target, int) and not isinstance(target, bool):
                self.cancelled.add(target)
        elif op == "bye":
            self.close()
        elif op in CALL_OPS:
            if not isinstance(call_id, int) or isinstance(call_id, bool) or call_id < 0:
                raise FrameError(f"id={str(call_id)[:40]!r} is not allowed: an integer >= 0")
            self.worker.submit(self, call_id, op, frame)
        else:
            raise FrameError(f"op={str(op)[:40]!r} is not allowed: hello, ping, cancel, bye, {', '.join(CALL_OPS)}")


class Worker:
    def __init__(self, spec: LeaseSpec, spec_path: Path | None = None) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self._spec_mtime = spec_path.stat().st_mtime_ns if spec_path else 0
        self.limits = Limits(max_payload_bytes=spec.max_payload_mib << 20)
        self.objects: dict[int, Any] = {}
        self._next_ref = 1
        self.stats = Stats()
        self.calls: deque[tuple[Connection, int, str, Frame]] = deque()
        """Calls waiting for the one running (run by whichever thread runs calls, in order)."""
        self._run_lock = threading.Lock()
        """Held by the thread that runs calls."""
        self.pool = BufferPool()
        self.connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._expected = make_token(spec.secret, spec.lease, spec.epoch)
        self._expected_bytes = self._expected.encode()
        self.authenticated_once = False
        self.started = time.monotonic()
        self.listeners: list[socket.socket] = []
        self.tls = None
        if spec.tls_cert and spec.tls_key:
            self.tls = server_context(spec.tls_cert, spec.tls_key, spec.client_ca)
        self.stopping = threading.Event()
        self.reason = ""

    # ---------------------------------------------------------------- auth
    def authorise(self, token: object) -> None:
        # The common case is one constant-time comparison; the full check only explains a refusal.
        if isinstance(token, str) and len(token) == len(self._expected):
            if hmac.compare_digest(token.encode(), self._expected_bytes):
                return
        check_token(token, self.spec.secret, self.spec.lease, self.spec.epoch)

    def authorise_header(self, header: dict[str, Any]) -> None:
        self.authorise(header.get("token"))

    def touch(self) -> None:
        self.authenticated_once = True
        self.stats.last_seen = time.monotonic()

    def progress(self) -> None:
        """Bytes of a large frame came in: the client is alive (an upload may outlast the TTL)."""
        if self.authenticated_once:
            self.stats.last_seen = time.monotonic()

    def reload_epoch(self) -> None:
        """The pool bumps the epoch in the lease file when it re-issues the token: older tokens stop working."""
        if self.spec_path is None:
            return
        try:
            mtime = self.spec_path.stat().st_mtime_ns
            if mtime == self._spec_mtime:
                return
            self._spec_mtime = mtime
            epoch = int(json.loads(self.spec_path.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return
        if epoch != self.spec.epoch:
            self.spec.epoch = epoch
            self._expected = make_token(self.spec.secret, self.spec.lease, epoch)
            self._expected_bytes = self._expected.encode()

    # ---------------------------------------------------------------- connections
    def accept(self, sock: socket.socket, peer: str, tls: bool, preamble: bool) -> None:
        """Serve one new connection on its own thread (preamble and handshake there too: a slow client must not
        hold up the accept loop)."""

        def run() -> None:
            conn_sock = sock
            try:
                conn_sock.settimeout(HANDSHAKE_TIMEOUT_S)
                if preamble and read_preamble(conn_sock) != self.spec.lease:
                    raise FrameError("preamble names another lease")
                if tls:
                    if self.tls is None:
                        raise FrameError("this worker has no TLS certificate")
                    conn_sock = self.tls.wrap_socket(conn_sock, server_side=True)
                conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if tls else None
            except (OSError, FrameError, ssl.SSLError, ValueError):
                sock.close()
                return
            with self._lock:
                if len(self.connections) >= MAX_CONNECTIONS:
                    conn_sock.close()
                    return
                conn = Connection(self, conn_sock, peer)
                self.connections.add(conn)
                self.stats.connections = len(self.connections)
            conn.serve()

        threading.Thread(target=run, name=f"flexai-conn-{peer}", daemon=True).start()

    def forget(self, conn: Connection) -> None:
        with self._lock:
            self.connections.discard(conn)
            self.stats.connections = len(self.connections)

    def _accept_loop(self, listener: socket.socket, tls: bool, preamble: bool) -> None:
        while not self.stopping.is_set():
            try:
                sock, address = listener.accept()
            except OSError:
                return
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unix"
            self.accept(sock, peer, tls, preamble)

    def _handoff_loop(self, listener: socket.socket) -> None:
        """Connections accepted by the pool's gateway, passed over with SCM_RIGHTS (preamble already read)."""
        while not self.stopping.is_set():
            try:
                carrier, _ = listener.accept()
            except OSError:
                return
            try:
                with carrier:
                    message, fds, _, _ = socket.recv_fds(carrier, 256, 1)
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    continue
                sock = socket.socket(fileno=fds[0])
                self.accept(sock, message.decode("ascii", "replace")[:100] or "tcp", tls=True, preamble=False)
            except OSError:
                continue

    # ---------------------------------------------------------------- calls
    def _resolve(self, value: Any) -> Any:
        kind = type(value)
        if kind is np.ndarray or kind is str or kind is int or kind is float or kind is bool or value is None:
            return value
        if isinstance(value, Ref):
            try:
                return self.objects[value.ref]
            except KeyError:
                raise NotAllowedError(
                    f"handle {value.ref} is unknown on this worker (freed, or never made here)"
                ) from None
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value

    def _keep(self, value: Any) -> Ref:
        ref = self._next_ref
        self._next_ref += 1
        self.objects[ref] = value
        return Ref(ref)

    def _run_op(self, op: str, body: Any) -> Any:
        if not isinstance(body, dict):
            raise FrameError(f"args of {op} is a {type(body).__name__}: a map is required")
        if op == "create":
            entry = check_entry(body.get("entry"), self.spec.allow)
            factory = load_entry(entry)
            args, kwargs = self._arguments(body)
            weights = body.get("weights")
            if weights is not None:
                if not isinstance(weights, bytearray):
                    raise TransferError("weights must travel as raw bytes of a safetensors file")
                kwargs["weights"] = load_weights(weights)
            return self._keep(factory(*args, **kwargs))
        if op == "free":
            refs = body.get("refs", [])
            for ref in refs if isinstance(refs, list) else []:
                if isinstance(ref, Ref):
                    self.objects.pop(ref.ref, None)
            return None
        target = self._resolve(body.get("ref"))
        if not isinstance(body.get("ref"), Ref):
            raise FrameError("ref is missing: a handle {'$ref': n} is required")
        if op == "fetch":
            return target
        method = body.get("method", "__call__")
        if method != "__call__" and (not isinstance(method, str) or not METHOD.match(method)):
            raise NotAllowedError(f"method {str(method)[:100]!r} is not allowed: a public name (letters, digits, _)")
        function = target if method == "__call__" else getattr(target, method, None)
        if not callable(function):
            raise NotAllowedError(f"method {method!r} is not a callable of {type(target).__name__}")
        args, kwargs = self._arguments(body)
        result = function(*_torch_args(function, args), **_torch_args(function, kwargs))
        return self._keep(result) if body.get("keep") is True else result

    def _arguments(self, body: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise FrameError("args must be a list and kwargs a map")
        return self._resolve(args), self._resolve(kwargs)

    def submit(self, conn: Connection, call_id: int, op: str, frame: Frame) -> None:
        """Queue a call; run it here (the reading thread) when no call runs, else the running thread takes it."""
        self.calls.append((conn, call_id, op, frame))
        # A call queued while another thread runs is seen by that thread after it lets go of the lock (it looks
        # again), so nothing waits behind a lock nobody holds.
        while self.calls and self._run_lock.acquire(blocking=False):
            conn.running(time.monotonic())
            try:
                while True:
                    try:
                        item = self.calls.popleft()
                    except IndexError:
                        break
                    self._run_one(*item)
            finally:
                self._run_lock.release()

    def _run_one(self, conn: Connection, call_id: int, op: str, frame: Frame) -> None:
        if call_id in conn.cancelled or conn.closed:
            conn.cancelled.discard(call_id)
            return
        try:
            result = self._run_op(op, frame.value)
            self.stats.calls += 1
            if call_id in conn.cancelled:  # cancelled while it ran: the result is dropped, nothing kept
                conn.cancelled.discard(call_id)
                if isinstance(result, Ref):
                    self.objects.pop(result.ref, None)
                return
            buffers: list[memoryview] = []
            tree = encode_tree(result, buffers)
        except Exception as exc:  # noqa: BLE001  (whatever the user's code raises goes back as a typed error)
            conn.error(call_id, exc)
            return
        conn.send({"op": "result", "id": call_id, "args": tree}, buffers)

    def hand_off_busy_readers(self) -> None:
        now = time.monotonic()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            conn.hand_off(now)

    # ---------------------------------------------------------------- life
    def listen(self) -> None:
        spec = self.spec
        if spec.tcp:
            host, _, port = spec.tcp.rpartition(":")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host.strip("[]"), int(port)))
            listener.listen(16)
            self.listeners.append(listener)
            self.tcp_port = listener.getsockname()[1]
            tls = not spec.plain_tcp
            threading.Thread(target=self._accept_loop, args=(listener, tls, True), daemon=True).start()
        for path, loop in ((spec.unix, "unix"), (spec.handoff, "handoff")):
            if not path:
                continue
            Path(path).unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                listener.bind(path)
            finally:
                os.umask(old)
            listener.listen(16)
            self.listeners.append(listener)
            if loop == "unix":
                threading.Thread(target=self._accept_loop, args=(listener, False, True), daemon=True).start()
            else:
                threading.Thread(target=self._handoff_loop, args=(listener,), daemon=True).start()

    def write_stats(self, state: str) -> None:
        if not self.spec.stats:
            return
        s = self.stats
        data = {
            "state": state,
            "pid": os.getpid(),
            "tcp_port": getattr(self, "tcp_port", None),
            "client": s.client,
            "connections": s.connections,
            "calls": s.calls,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "idle_s": round(time.monotonic() - s.last_seen, 3),
            "objects": len(self.objects),
            "reason": self.reason,
        }
        try:
            write_private(Path(self.spec.stats), json.dumps(data))
        except OSError:
            pass

    def supervise(self) -> str:
        """Run until the lease ends; returns why."""
        last_stats = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            self.reload_epoch()
            if not self.authenticated_once and now - self.started > self.spec.connect_timeout_s:
                self.reason = f"no client connected within {self.spec.connect_timeout_s:g} s"
                break
            if self.authenticated_once and now - self.stats.last_seen > self.spec.ttl_s:
                self.reason = f"lease expired: no heartbeat for {self.spec.ttl_s:g} s (client gone)"
                break
            if now - last_stats >= STATS_PERIOD_S:
                self.write_stats("ready")
                last_stats = now
            tick_end = now + SUPERVISE_PERIOD_S
            while not self.stopping.wait(HANDOFF_PERIOD_S):
                self.hand_off_busy_readers()
                if time.monotonic() >= tick_end:
                    break
        self.stop()
        return self.reason

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            conn.error(None, LeaseExpiredError(self.reason or "the lease ended"))
            conn.close()
        for listener in self.listeners:
            listener.close()
        for path in (self.spec.unix, self.spec.handoff):
            if path:
                Path(path).unlink(missing_ok=True)
        self.objects.clear()
        self.write_stats("ended")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flexai.remote.worker LEASE_FILE", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s flexai-worker %(message)s")
    path = Path(args[0])
    try:
        spec = LeaseSpec.load(path)
        worker = Worker(spec, path)
        worker.listen()
    except (OSError, ValueError, TypeError, ssl.SSLError) as exc:
        print(f"flexai worker: cannot serve lease file {path}: {exc}", file=sys.stderr)
        return 2
    log.info("lease %s: serving (tcp=%s unix=%s handoff=%s allow=%s)", spec.lease, spec.tcp, spec.unix,
             spec.handoff, spec.allow)
    reason = worker.supervise()
    log.info("lease %s: ended: %s", spec.lease, reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
