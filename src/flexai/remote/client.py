"""The client side: lease a slice, create resident objects on it, call them.

```python
import flexai.remote as remote
with remote.lease(share="10%", memory="4GiB") as xpu:
    net = xpu.create("mypkg.models:build", weights="model.safetensors")
    y = net(batch)
    h = net.call("encode", batch, keep=True)     # stays on the slice; pass h to later calls
```

A ``Session`` is one authenticated connection to a lease's worker; several calls may be in flight
(``call_async``). A thread waiting for a result reads the connection itself (one at a time; the answers it reads
for others' calls resolve their futures), so a call's answer reaches its caller with no hand-over between
threads. When nobody has waited for ``IDLE_READ_S``, a background reader takes over (pongs, answers nobody waits
for yet, the end of the stream). A heartbeat thread pings every ``heartbeat_s`` and declares the worker lost when
nothing came back for three periods. A reset or end of stream fails every call in flight at once with
``WorkerLostError``; nothing is retried.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import socket
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from flexai.remote.auth import client_context, preamble
from flexai.remote.errors import (
    CallCancelledError,
    CallTimeoutError,
    LeaseRefusedError,
    RemoteError,
    WorkerLostError,
    error_from_wire,
)
from flexai.remote.wire import Frame, FrameReader, Limits, Ref, encode_tree, send_frame

HEARTBEAT_S = 0.5
MISSED_HEARTBEATS = 3
CONNECT_TIMEOUT_S = 10.0
LEASE_WAIT_S = 60.0
CLIENT_LIMITS = Limits(max_header_bytes=64 << 20, max_payload_bytes=64 << 30, max_buffers=1 << 20, max_items=1 << 22)
"""What the client accepts from its worker: generous, but still bounded."""
WAIT_SLICE_S = 0.25
IDLE_READ_S = 0.01
"""The background reader reads only when no caller has waited for a result this long (callers read for
themselves: handing each answer from a reader thread to its caller cost a thread switch per call)."""


class RemoteFuture(Future):
    """A call in flight. ``cancel()`` works while it waits or runs: the worker drops it (or its result)."""

    def __init__(self, session: Session, call_id: int, torch_out: bool) -> None:
        super().__init__()
        self.session = session
        self.call_id = call_id
        self.torch_out = torch_out

    def cancel(self) -> bool:
        if self.done():
            return False
        self.session._cancel(self.call_id)
        return _settle(self, error=CallCancelledError(f"call {self.call_id} was cancelled by the caller"))

    def result(self, timeout: float | None = None) -> Any:
        try:
            if not self.done():
                timeout = self.session._wait(self, timeout)
            return super().result(timeout)
        except FutureTimeout:
            self.cancel()
            raise CallTimeoutError(f"call {self.call_id} did not answer within {timeout:g} s: cancelled") from None


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> bool:
    """Resolve ``future`` unless it was resolved meanwhile (a cancel racing with the answer): True if this did."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


class RemoteObject:
    """A handle to an object resident on the worker (created, or a result kept with ``keep=True``)."""

    def __init__(self, session: Session, ref: int) -> None:
        self.session = session
        self.ref = ref

    def __repr__(self) -> str:
        return f"<RemoteObject {self.ref} on lease {self.session.lease_id}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("__call__", *args, **kwargs)

    def call(self, method: str, *args: Any, keep: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on the resident object and wait. ``keep=True`` leaves the result on the worker and
        returns a handle to it."""
        return self.call_async(method, *args, keep=keep, **kwargs).result(timeout)

    def call_async(self, method: str, *args: Any, keep: bool = False, **kwargs: Any) -> RemoteFuture:
        body = {"ref": Ref(self.ref), "method": method, "args": list(args), "kwargs": kwargs, "keep": keep}
        return self.session.submit("call", body, torch_out=_has_torch(args, kwargs))

    def fetch(self, timeout: float | None = None) -> Any:
        """The object's value, copied to this side (arrays, scalars, lists, dicts)."""
        return self.session.submit("fetch", {"ref": Ref(self.ref)}).result(timeout)

    def free(self) -> None:
        """Drop the object on the worker (its memory is released there)."""
        if not self.session.closed:
            self.session.submit("free", {"refs": [Ref(self.ref)]})


def _has_torch(*values: Any) -> bool:
    if "torch" not in sys.modules:  # no tensor can be among them
        return False

    def walk(v: Any) -> bool:
        if type(v).__module__.split(".")[0] == "torch":
            return True
        if isinstance(v, list | tuple):
            return any(walk(x) for x in v)
        if isinstance(v, dict):
            return any(walk(x) for x in v.values())
        return False

    return any(walk(v) for v in values)


class Session:
    """One authenticated connection to a lease's worker."""

    def __init__(
        self,
        sock: socket.socket,
        lease_id: str,
        token: str,
        heartbeat_s: float = HEARTBEAT_S,
        missed_heartbeats: int = MISSED_HEARTBEATS,
    ) -> None:
        self.sock = sock
        self.lease_id = lease_id
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.missed_heartbeats = missed_heartbeats
        self._ids = itertools.count(1)
        self._pending: dict[int, RemoteFuture] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = False
        self.failure: RemoteError | None = None
        self.bytes_out = 0
        self._frames = FrameReader(sock)
        role_lock = threading.Lock()
        self._role = threading.Condition(role_lock)
        """Waiters for the reading role (or for their futures) wait here."""
        self._idle = threading.Condition(role_lock)
        """The background reader waits here (apart, so that the callers' turns do not wake it each time)."""
        self._reading = False
        """A thread is reading the connection (only one may)."""
        self._waiting = 0
        """Threads in ``RemoteFuture.result`` (they read for themselves)."""
        self._last_wait = 0.0
        self._idle_polling = False
        """The background reader holds the reading role and waits in ``poll`` (a caller wakes it to take over)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        sock.settimeout(CONNECT_TIMEOUT_S)
        self._send({"op": "hello", "id": 0, "token": token})
        try:
            answer = self._frames.read_frame(CLIENT_LIMITS)
        except (ConnectionError, OSError) as exc:
            self._close_pipe()
            raise WorkerLostError(f"the worker of lease {lease_id} closed the connection during hello: {exc}") from None
        if answer.header.get("op") != "ok":
            self._close_pipe()
            raise error_from_wire(answer.header.get("kind"), answer.header.get("message"))
        self.worker_pid = answer.header.get("pid")
        sock.settimeout(None)
        self._poller = select.poll()  # the reading role's holder alone uses it
        self._poller.register(sock, select.POLLIN)
        self._idle_poller = select.poll()  # the background reader's
        self._idle_poller.register(sock, select.POLLIN)
        self._idle_poller.register(self._wake_r, select.POLLIN)
        self.last_heard = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name="flexai-remote-reader", daemon=True)
        self._reader.start()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="flexai-remote-heartbeat", daemon=True)
        if heartbeat_s > 0:
            self._beat.start()

    # ------------------------------------------------------------------ sending
    def _send(self, header: dict[str, Any], buffers: list[memoryview] | None = None) -> None:
        header["token"] = self.token
        with self._send_lock:
            self.bytes_out += send_frame(self.sock, header, buffers, self._heard)

    def submit(self, op: str, body: dict[str, Any], torch_out: bool = False) -> RemoteFuture:
        if self.closed:
            raise self.failure or WorkerLostError(f"the session to lease {self.lease_id} is closed")
        call_id = next(self._ids)
        future = RemoteFuture(self, call_id, torch_out)
        buffers: list[memoryview] = []
        tree = encode_tree(body, buffers, _ref_of)  # a TransferError here is the caller's, before anything is sent
        with self._lock:
            self._pending[call_id] = future
        try:
            self._send({"op": op, "id": call_id, "args": tree}, buffers)
        except OSError as exc:
            self._fail(WorkerLostError(f"the link to lease {self.lease_id} broke while sending: {exc}"))
        return future

    def _cancel(self, call_id: int) -> None:
        with self._lock:
            self._pending.pop(call_id, None)
        try:
            self._send({"op": "cancel", "id": 0, "args": call_id})
        except OSError:
            pass

    # ------------------------------------------------------------------ receiving
    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    def _wait(self, future: RemoteFuture, timeout: float | None) -> float | None:
        """Read the connection until ``future`` is resolved (or ``timeout`` passes); returns the time left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        role = self._role
        with role:
            self._waiting += 1
        try:
            while not future.done() and not self.closed:
                with role:
                    while self._reading and not future.done():
                        if self._idle_polling:  # the background reader waits in poll: make it let go
                            self._idle_polling = False
                            self._wake()
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return 0
                        role.wait(left)
                    if future.done() or self.closed:
                        break
                    self._reading = True
                try:
                    # In slices: a future resolved meanwhile by another thread (a cancel) is seen within one.
                    self._read_one(time.monotonic() + WAIT_SLICE_S if deadline is None else deadline)
                finally:
                    with role:
                        self._reading = False
                        role.notify_all()
                if deadline is not None and time.monotonic() >= deadline:
                    return 0
        finally:
            with role:
                self._waiting -= 1
                self._last_wait = time.monotonic()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _readable(self, timeout: float | None, wake: bool = False) -> bool:
        """Whether a frame's bytes are there to read (waiting up to ``timeout``; ``wake``: or the wake pipe)."""
        if self._frames.buffered() or (hasattr(self.sock, "pending") and self.sock.pending()):
            return True
        poller = self._idle_poller if wake else self._poller
        events = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
        readable = False
        for fd, _ in events:
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 64)
                except OSError:
                    pass
            else:
                readable = True
        return readable

    def _read_one(self, deadline: float | None) -> None:
        """Read and handle one frame if one comes before ``deadline`` (the caller holds the reading role)."""
        try:
            if not self._readable(None if deadline is None else deadline - time.monotonic()) or self.closed:
                return
            frame = self._frames.read_frame(CLIENT_LIMITS, self._heard)
            self._heard()
            self._handle(frame)
        except RemoteError as exc:
            self._fail(exc)
        except (ConnectionError, OSError, ValueError) as exc:
            self._fail(WorkerLostError(f"the worker of lease {self.lease_id} is gone: {exc or type(exc).__name__}"))

    def _read_loop(self) -> None:
        """The background reader: reads when no caller does. It closes the socket when the session ends (nobody
        reads it then; see ``_fail``)."""
        role = self._role
        try:
            while True:
                with role:
                    while not self.closed and (
                        self._reading or self._waiting or time.monotonic() - self._last_wait < IDLE_READ_S
                    ):
                        self._idle.wait(IDLE_READ_S)
                    if self.closed:
                        break
                    self._reading = True
                    self._idle_polling = True
                try:
                    if self._readable(None, wake=True):
                        with role:
                            self._idle_polling = False
                        if not self.closed:
                            self._read_one(time.monotonic() + 3600)
                finally:
                    with role:
                        self._reading = False
                        self._idle_polling = False
                        role.notify_all()
        finally:
            with role:
                while self._reading:
                    role.wait(0.1)
                self._reading = True  # for good: the socket is closed
            with self._send_lock:
                self.sock.close()
            self._close_pipe()

    def _wake(self) -> None:
        """Wake the background reader out of ``poll`` (the caller holds ``_role``'s lock)."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"w")
            except OSError:
                pass

    def _close_pipe(self) -> None:
        with self._role:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _handle(self, frame: Frame) -> None:
        header = frame.header
        op = header.get("op")
        if op == "pong":
            return
        call_id = header.get("id")
        if op == "error" and call_id is None:  # about the connection, not one call
            self._fail(error_from_wire(header.get("kind"), header.get("message"), header.get("type")))
            return
        with self._lock:
            future = self._pending.pop(call_id, None) if isinstance(call_id, int) else None
        if future is None or future.done():
            return  # cancelled meanwhile
        if op == "result":
            _settle(future, result=self._decode(frame.value, future.torch_out))
        else:
            _settle(future, error=error_from_wire(header.get("kind"), header.get("message"), header.get("type")))

    def _decode(self, value: Any, torch_out: bool) -> Any:
        kind = type(value)
        if kind is np.ndarray and not torch_out or kind is str or kind is int or kind is float or value is None:
            return value
        if isinstance(value, Ref):
            return RemoteObject(self, value.ref)
        if isinstance(value, np.ndarray) and torch_out:
            import torch

            return torch.from_numpy(value)
        if isinstance(value, list):
            return [self._decode(v, torch_out) for v in value]
        if isinstance(value, dict):
            return {k: self._decode(v, torch_out) for k, v in value.items()}
        if isinstance(value, bytearray):
            return bytes(value)
        return value

    def _heartbeat_loop(self) -> None:
        limit_s = self.heartbeat_s * self.missed_heartbeats
        while not self.closed:
            try:
                self._send({"op": "ping", "id": 0})
            except OSError as exc:
                self._fail(WorkerLostError(f"the link to lease {self.lease_id} broke: {exc}"))
                return
            deadline = time.monotonic() + self.heartbeat_s
            while not self.closed and time.monotonic() < deadline:
                if time.monotonic() - self.last_heard > limit_s:
                    self._fail(WorkerLostError(
                        f"the worker of lease {self.lease_id} missed {self.missed_heartbeats} heartbeats "
                        f"({limit_s:g} s without an answer)"
                    ))
                    return
                time.sleep(min(0.05, self.heartbeat_s / 5))

    def _fail(self, error: RemoteError) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = error
            pending, self._pending = self._pending, {}
        self.closed = True
        # Shutdown, not close: a thread may be inside a read of this socket; the background reader closes it
        # when it leaves, once nobody reads.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for future in pending.values():
            _settle(future, error=error)
        with self._role:
            self._role.notify_all()
            self._idle.notify_all()
            self._wake()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._send({"op": "bye", "id": 0})
        except OSError:
            pass
        self._fail(WorkerLostError(f"the session to lease {self.lease_id} was closed by the client"))
        self._reader.join(timeout=5)

    def create(self, entry: str, *args: Any, weights: str | os.PathLike[str] | bytes | None = None, **kwargs: Any
               ) -> RemoteObject:
        """Make a resident object on the worker: ``entry`` is ``module:callable`` (it must be on the worker's
        allow-list); ``weights`` a safetensors file here (sent as is, loaded there) given to it as ``weights=``."""
        data = None
        if weights is not None:
            data = weights if isinstance(weights, bytes) else Path(weights).read_bytes()
        body = {"entry": entry, "args": list(args), "kwargs": kwargs, "weights": data}
        return self.submit("create", body).result()


def _ref_of(value: Any) -> int | None:
    return value.ref if isinstance(value, RemoteObject) else None


def connect(
    endpoint: str,
    lease_id: str,
    token: str,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> Session:
    """A session to a lease's worker at ``endpoint``: ``unix:/path``, ``tls://host:port`` or (benchmarks only)
    ``tcp://host:port``."""
    if endpoint.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = endpoint[5:]
    else:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("tls", "tcp") or not parsed.hostname or not parsed.port:
            raise ValueError(f"endpoint={endpoint!r} is not allowed: unix:/path, tls://host:port or tcp://host:port")
        target = (parsed.hostname, parsed.port)
        sock = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if endpoint.startswith("unix:"):
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(target)
        sock.sendall(preamble(lease_id))
        if endpoint.startswith("tls://"):
            sock = client_context(ca, cert, key).wrap_socket(sock, server_hostname=server_name or target[0])
        return Session(sock, lease_id, token, heartbeat_s)
    except (OSError, RemoteError):
        sock.close()
        raise


# ---------------------------------------------------------------------------- leases through the pool
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|m)\s*$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|G|M)?\s*$", re.IGNORECASE)


def parse_share(value: str | int) -> int:
    """'10%' or '100m' or 100 (milli) -> 100."""
    if isinstance(value, int):
        return value
    match = _SHARE.match(value)
    if not match:
        raise ValueError(f"share={value!r} is not allowed: a percentage like 10% or milli like 100m")
    number = float(match.group(1))
    return round(number * 10) if match.group(2) == "%" else round(number)


def parse_memory(value: str | int) -> int:
    """'4GiB', '512MiB' or 512 (MiB) -> MiB."""
    if isinstance(value, int):
        return value
    match = _MEMORY.match(value)
    if not match:
        raise ValueError(f"memory={value!r} is not allowed: like 4GiB or 512MiB")
    unit = (match.group(2) or "MiB").lower()
    return round(float(match.group(1)) * (1024 if unit.startswith("g") else 1))


class Lease:
    """A leased slice and the session to its worker; ``with`` releases it."""

    def __init__(self, session: Session, info: dict[str, Any], pool: Any | None = None) -> None:
        self.session = session
        self.info = info
        self.id = session.lease_id
        self._pool = pool

    def create(self, entry: str, *args: Any, weights: str | os.PathLike[str] | bytes | None = None,
               **kwargs: Any) -> RemoteObject:
        return self.session.create(entry, *args, weights=weights, **kwargs)

    def close(self) -> None:
        self.session.close()
        if self._pool is not None:
            try:
                self._pool.delete(f"/api/v1/leases/{self.id}")
            except Exception:  # noqa: BLE001  (the worker frees the slice itself when its TTL runs out)
                pass
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pool_client(url: str | None, token_file: str | None, ca: str | None) -> tuple[Any, str | None]:
    import httpx

    if url:
        headers = {}
        if token_file:
            headers["Authorization"] = f"Bearer {Path(token_file).read_text().strip()}"
        verify: Any = client_context(ca) if url.startswith("https") else True
        return httpx.Client(base_url=url, headers=headers, timeout=30, verify=verify), urlparse(url).hostname
    state = os.environ.get("FLEXAI_STATE") or str(
        Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "flexai"
    )
    sock = Path(state) / "flexai.sock"
    if not sock.exists():
        raise LeaseRefusedError(f"no pool: FLEXAI_URL is not set and there is no pool daemon at {sock}")
    transport = httpx.HTTPTransport(uds=str(sock))
    return httpx.Client(transport=transport, base_url="http://flexai", timeout=30), None


def lease(
    share: str | int = "10%",
    memory: str | int = 0,
    url: str | None = None,
    token_file: str | None = None,
    ca: str | None = None,
    *,
    name: str = "",
    cert: str | None = None,
    key: str | None = None,
    wait_s: float = LEASE_WAIT_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> Lease:
    """Lease a slice from the pool at ``url`` (default ``$FLEXAI_URL``; without one, this machine's pool over its
    unix socket) with the pool token in ``token_file`` (``$FLEXAI_TOKEN_FILE``), trusting the CA in ``ca``
    (``$FLEXAI_CA``) for TLS. The pool decides where the slice is; a client on the pool's own machine is served
    over a unix socket, others over TCP with TLS."""
    url = url or os.environ.get("FLEXAI_URL") or None
    token_file = token_file or os.environ.get("FLEXAI_TOKEN_FILE") or None
    ca = ca or os.environ.get("FLEXAI_CA") or None
    share_milli, memory_mib = parse_share(share), parse_memory(memory)
    import httpx

    http, host = _pool_client(url, token_file, ca)
    try:
        answer = http.post("/api/v1/leases", json={"share_milli": share_milli, "memory_mib": memory_mib, "name": name})
        if answer.status_code >= 400:
            raise LeaseRefusedError(f"the pool refused the lease ({answer.status_code}): {_detail(answer)}")
        info = answer.json()
        token = info["token"]  # only the answer that issues it carries it
        deadline = time.monotonic() + wait_s
        while info.get("state") != "ready":
            if info.get("state") in ("ended", "failed"):
                raise LeaseRefusedError(f"lease {info.get('id')} ended before it was ready: {info.get('reason')}")
            if time.monotonic() > deadline:
                http.delete(f"/api/v1/leases/{info['id']}")
                raise LeaseRefusedError(f"lease {info['id']} was not granted within {wait_s:g} s: {info.get('reason')}")
            time.sleep(0.05)
            info = {**http.get(f"/api/v1/leases/{info['id']}").json(), "token": token}
    except httpx.HTTPError as exc:
        http.close()
        raise LeaseRefusedError(f"cannot reach the pool at {url or 'the local socket'}: {exc}") from None
    except BaseException:
        http.close()
        raise
    session = None
    unix = info.get("unix")
    if unix and Path(unix).exists() and os.access(unix, os.W_OK):
        session = connect(f"unix:{unix}", info["id"], info["token"], heartbeat_s=heartbeat_s)  # co-located
    else:
        where = f"tls://{host or '127.0.0.1'}:{info['tcp_port']}"
        session = connect(where, info["id"], info["token"], ca=ca, cert=cert, key=key, heartbeat_s=heartbeat_s)
    return Lease(session, info, http)


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:500]


