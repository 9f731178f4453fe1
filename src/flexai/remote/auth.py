"""Lease tokens, the lease file a worker is started with, TLS contexts and the routing preamble.

A lease token is ``LEASE.EPOCH.MAC`` where MAC = HMAC-SHA256(lease secret, "flexai-lease:LEASE:EPOCH"). The
secret is made by the pool for one lease and never leaves its machine; the worker holds it in its lease file
(0600). A token of another lease, a made-up one and one of an older epoch (the pool bumps the epoch when it
re-issues the token) are refused. Expiry is the lease's TTL: the worker frees the slice when no heartbeat came
for ``ttl_s``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexai.remote.errors import AuthError, FrameError

LEASE_ID = re.compile(r"^[0-9a-f]{12}$")
PREAMBLE_MAGIC = b"FXRL"
PREAMBLE_BYTES = 16
"""b"FXRL" + the 12-character lease id, in clear before TLS: it routes the connection to the lease's worker.
Fixed length, so that reading it never eats into the TLS handshake that follows."""


def new_lease_id() -> str:
    return secrets.token_hex(6)


def new_secret() -> str:
    return secrets.token_hex(32)


def make_token(secret_hex: str, lease_id: str, epoch: int) -> str:
    mac = hmac.new(bytes.fromhex(secret_hex), f"flexai-lease:{lease_id}:{epoch}".encode(), hashlib.sha256)
    return f"{lease_id}.{epoch}.{mac.hexdigest()}"


def check_token(token: object, secret_hex: str, lease_id: str, epoch: int) -> None:
    """Raise ``AuthError`` unless ``token`` is this lease's token of the current epoch."""
    if token is None or token == "":
        raise AuthError("token missing: every frame must carry the lease token")
    if not isinstance(token, str) or len(token) > 200:
        raise AuthError("token refused: not a lease token (LEASE.EPOCH.MAC)")
    parts = token.split(".")
    if len(parts) != 3 or not LEASE_ID.match(parts[0]) or not parts[1].isdigit():
        raise AuthError("token refused: not a lease token (LEASE.EPOCH.MAC)")
    if parts[0] != lease_id:
        raise AuthError(f"token refused: it was issued for lease {parts[0]}, this worker serves lease {lease_id}")
    expected = make_token(secret_hex, lease_id, int(parts[1]))
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthError(f"token refused: not issued by the pool for lease {lease_id}")
    if int(parts[1]) != epoch:
        raise AuthError(f"token refused: epoch {parts[1]} is stale, lease {lease_id} is at epoch {epoch}")


@dataclass
class LeaseSpec:
    """What a worker serves: written by the pool (or a test) to a 0600 file, read by the worker at start."""

    lease: str
    secret: str
    epoch: int = 1
    tcp: str | None = None
    """HOST:PORT to listen on with TLS (standalone); None when the pool's gateway hands connections over."""
    unix: str | None = None
    """Unix socket for co-located clients (no TLS; the token is still required)."""
    handoff: str | None = None
    """Unix socket on which the pool's gateway passes accepted TCP connections (SCM_RIGHTS)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    allow: list[str] = field(default_factory=list)
    ttl_s: float = 10.0
    heartbeat_s: float = 0.5
    connect_timeout_s: float = 60.0
    """The lease is freed when no client has connected this long after the worker started."""
    max_payload_mib: int = 4096
    stats: str | None = None
    """File the worker writes its counters to (JSON, 0600) about once a second."""
    plain_tcp: bool = False
    """TCP without TLS: for benchmarks that compare, never for a pool."""

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LeaseSpec:
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        if not LEASE_ID.match(spec.lease):
            raise ValueError(f"lease={spec.lease!r} is not allowed: 12 lowercase hex characters")
        return spec


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 from the start (no window where others may read)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def client_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key)
    return context


def preamble(lease_id: str) -> bytes:
    if not LEASE_ID.match(lease_id):
        raise ValueError(f"lease={lease_id!r} is not allowed: 12 lowercase hex characters")
    return PREAMBLE_MAGIC + lease_id.encode()


def read_preamble(sock: socket.socket) -> str:
    """The lease id a new connection asks for (exactly ``PREAMBLE_BYTES`` read, nothing of the TLS after it)."""
    data = b""
    while len(data) < PREAMBLE_BYTES:
        chunk = sock.recv(PREAMBLE_BYTES - len(data))
        if not chunk:
            raise ConnectionError("the connection closed before its preamble")
        data += chunk
    lease = data[4:].decode("ascii", "replace")
    if data[:4] != PREAMBLE_MAGIC or not LEASE_ID.match(lease):
        raise FrameError(f"preamble {data[:16]!r} is not allowed: b'FXRL' + a 12-character lease id")
    return lease
