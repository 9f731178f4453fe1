"""Remote XPU leases of the embedded pool: a slice held for a client, served by one worker process.

A lease is asked for through the pool's REST API (with the pool's token). The manager submits a job of kind
``lease`` to the pool like any other (``Pool.submit``): the Hi Scheduler places it, and the pool starts its
command, ``python -m flexai.remote.worker LEASE_FILE``, inside the granted slice under the same enforcement as
any job (memory watchdog, time-slicing, HAMi-core and MPS variables). The lease file (0600, in the state's
``leases/`` folder) holds the lease's secret; the client gets the token derived from it (``flexai.remote.auth``).

Clients on other machines connect to the pool's ``--remote-listen`` address. The gateway reads the 16-byte
preamble naming the lease and passes the connection itself (SCM_RIGHTS) to that lease's worker, which does the
TLS handshake: no byte of the lease's traffic goes through the daemon. A client on this machine connects to the
worker's unix socket.

The worker ends when its client is gone (no heartbeat for the TTL); the job ends with it and the pool frees the
slice. ``DELETE /api/v1/leases/ID`` ends it at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexai.local.pool import JobSubmission, Pool
from flexai.local.store import ACTIVE_STATES
from flexai.remote.auth import LEASE_ID, LeaseSpec, make_token, new_lease_id, new_secret, read_preamble

log = logging.getLogger(__name__)

GATEWAY_PREAMBLE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RemoteSettings:
    """``flexai serve --remote-listen HOST:PORT --tls-cert F --tls-key F [--client-ca F] --allow PATTERN``."""

    host: str | None = None
    """None: no TCP listener, leases are served to clients on this machine only (unix sockets)."""
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    allow: tuple[str, ...] = ()
    """Entry-point globs (``mypkg.models:*``) the workers may create objects from; empty: none."""
    ttl_s: float = 10.0
    connect_timeout_s: float = 60.0


@dataclass
class LeaseRecord:
    id: str
    job: str
    secret: str
    epoch: int
    share_milli: int
    memory_mib: int
    requested_by: str
    created_at: float = field(default_factory=time.time)
    announced: str = ""
    """The last state an event was written for."""
    client: str = ""


class LeaseManager:
    def __init__(self, pool: Pool, state_dir: Path, settings: RemoteSettings | None = None) -> None:
        self.pool = pool
        self.settings = settings = settings or RemoteSettings()
        self.dir = state_dir / "leases"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.leases: dict[str, LeaseRecord] = {}
        self._ended: dict[str, LeaseRecord] = {}
        self.by_job: dict[str, str] = {}
        self._load()
        self.gateway_port: int | None = None
        self._gateway: socket.socket | None = None

    # ------------------------------------------------------------------ files
    def _paths(self, lease_id: str) -> dict[str, Path]:
        # Short names: a unix socket path must stay under 108 bytes even in a deep state folder.
        return {
            "spec": self.dir / f"{lease_id}.json",
            "unix": self.dir / f"{lease_id}.s",
            "handoff": self.dir / f"{lease_id}.h",
            "stats": self.dir / f"{lease_id}.stats",
            "record": self.dir / f"{lease_id}.lease",
        }

    def _load(self) -> None:
        """Leases of an earlier daemon (their workers are jobs the pool re-adopts)."""
        for path in self.dir.glob("*.lease"):
            try:
                record = LeaseRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            self.leases[record.id] = record
            self.by_job[record.job] = record.id

    def _save(self, record: LeaseRecord) -> None:
        from flexai.remote.auth import write_private

        data = dict(record.__dict__)
        write_private(self._paths(record.id)["record"], json.dumps(data))

    # ------------------------------------------------------------------ API
    def create(self, share_milli: int, memory_mib: int, name: str, client: str) -> dict[str, Any]:
        """Submit the lease's worker as a job; raises ``SubmitError`` (a ValueError) for a request that cannot
        be served. Called with the pool lock held."""
        lease_id = new_lease_id()
        paths = self._paths(lease_id)
        settings = self.settings
        spec = LeaseSpec(
            lease=lease_id,
            secret=new_secret(),
            unix=str(paths["unix"]),
            handoff=str(paths["handoff"]) if settings.host else None,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            client_ca=settings.client_ca,
            allow=list(settings.allow),
            ttl_s=settings.ttl_s,
            connect_timeout_s=settings.connect_timeout_s,
            stats=str(paths["stats"]),
        )
        spec.save(paths["spec"])
        # The worker imports allow-listed modules the way the daemon could: same Python path and folder.
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PATH": os.environ.get("PATH", "")}
        host = client.rsplit(":", 1)[0] if client else "local"
        job = self.pool.submit(
            JobSubmission(
                command=[sys.executable, "-m", "flexai.remote.worker", str(paths["spec"])],
                share_milli=share_milli,
                memory_mib=memory_mib,
                name=(name or f"lease@{host}")[:200],
                cwd=os.getcwd(),
                env=env,
            )
        )
        record = LeaseRecord(lease_id, job.id, spec.secret, spec.epoch, share_milli, memory_mib, client)
        self.leases[lease_id] = record
        self.by_job[job.id] = lease_id
        self._save(record)
        self.pool.store.event(job.id, "lease", f"lease {lease_id} requested by {client or 'a local client'}")
        return {**self.view(lease_id), "token": make_token(spec.secret, lease_id, spec.epoch)}

    def new_token(self, lease_id: str) -> dict[str, Any]:
        """Re-issue the lease's token with the next epoch: every earlier token is refused from now on."""
        record = self.leases[lease_id]
        record.epoch += 1
        path = self._paths(lease_id)["spec"]
        spec = LeaseSpec.load(path)
        spec.epoch = record.epoch
        spec.save(path)
        self._save(record)
        self.pool.store.event(record.job, "lease", f"lease {lease_id}: token re-issued, epoch {record.epoch}")
        return {**self.view(lease_id), "token": make_token(record.secret, lease_id, record.epoch)}

    def end(self, lease_id: str) -> dict[str, Any]:
        record = self.leases[lease_id]
        self.pool.cancel(record.job)
        return self.view(lease_id)

    def stats(self, lease_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._paths(lease_id)["stats"].read_text())
        except (OSError, ValueError):
            return {}

    def view(self, lease_id: str) -> dict[str, Any]:
        record = self.leases.get(lease_id) or self._ended[lease_id]
        job = self.pool.store.job(record.job)
        stats = self.stats(lease_id)
        if job is None or job.state not in ACTIVE_STATES:
            state = "ended"
        elif job.state == "running" and stats.get("state") == "ready" and stats.get("pid"):
            state = "ready"
        elif job.state == "running":
            state = "starting"
        else:
            state = "queued"
        return {
            "id": lease_id,
            "job": record.job,
            "state": state,
            "reason": (job.reason if job else "") or stats.get("reason", ""),
            "epoch": record.epoch,
            "share_milli": record.share_milli,
            "memory_mib": record.memory_mib,
            "unix": str(self._paths(lease_id)["unix"]),
            "tcp_port": self.gateway_port,
            "client": stats.get("client") or record.requested_by,
            "calls": int(stats.get("calls", 0)),
            "bytes_in": int(stats.get("bytes_in", 0)),
            "bytes_out": int(stats.get("bytes_out", 0)),
            "idle_s": stats.get("idle_s"),
            "slices": job.slices if job else None,
        }

    def job_extra(self, job_id: str) -> dict[str, Any]:
        """What a job view adds: its kind, and for a lease its client, calls, bytes in and out, idle time."""
        lease_id = self.by_job.get(job_id)
        if lease_id is None:
            return {"kind": "job"}
        view = self.view(lease_id)
        keys = ("id", "state", "client", "calls", "bytes_in", "bytes_out", "idle_s", "epoch")
        return {"kind": "lease", "lease": {k: view[k] for k in keys}}

    def tick(self) -> None:
        """Events when a lease becomes ready, gets its client, ends; files of ended leases removed."""
        for lease_id, record in list(self.leases.items()):
            view = self.view(lease_id)
            state = view["state"]
            if state == "ready" and view["client"] != record.client and self.stats(lease_id).get("connections"):
                record.client = view["client"]
                self.pool.store.event(record.job, "lease", f"lease {lease_id}: client {record.client} connected")
            if state == record.announced:
                continue
            record.announced = state
            if state == "ready":
                self.pool.store.event(record.job, "lease", f"lease {lease_id}: worker ready")
            elif state == "ended":
                self.pool.store.event(
                    record.job,
                    "lease",
                    f"lease {lease_id} ended ({view['reason'] or 'job ended'}): {view['calls']} calls, "
                    f"{view['bytes_in']} bytes in, {view['bytes_out']} bytes out",
                )
                self._forget(lease_id)

    def _forget(self, lease_id: str) -> None:
        record = self.leases.pop(lease_id)
        # The job stays a lease in the views (kind) through by_job; the secret goes with the files.
        for key, path in self._paths(lease_id).items():
            if key != "stats":
                path.unlink(missing_ok=True)
        self.by_job[record.job] = lease_id
        self._ended[lease_id] = record

    # ------------------------------------------------------------------ gateway
    def listen(self) -> None:
        """Accept remote clients on ``--remote-listen`` and hand each connection to its lease's worker."""
        if self.settings.host is None:
            return
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.settings.host.strip("[]"), self.settings.port))
        listener.listen(64)
        self._gateway = listener
        self.gateway_port = listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="flexai-lease-gateway", daemon=True).start()

    def close(self) -> None:
        if self._gateway is not None:
            self._gateway.close()

    def _accept_loop(self) -> None:
        assert self._gateway is not None
        while True:
            try:
                conn, address = self._gateway.accept()
            except OSError:
                return
            threading.Thread(target=self._hand_over, args=(conn, address), daemon=True).start()

    def _hand_over(self, conn: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            conn.settimeout(GATEWAY_PREAMBLE_TIMEOUT_S)
            lease_id = read_preamble(conn)
            if not LEASE_ID.match(lease_id) or lease_id not in self.leases:
                raise LookupError(f"no lease {lease_id}")
            conn.settimeout(None)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as carrier:
                carrier.settimeout(GATEWAY_PREAMBLE_TIMEOUT_S)
                carrier.connect(str(self._paths(lease_id)["handoff"]))
                socket.send_fds(carrier, [peer.encode()], [conn.fileno()])
        except Exception as exc:  # noqa: BLE001  (any bad or early connection is dropped; the gateway goes on)
            log.info("remote connection from %s dropped: %s", peer, exc)
        finally:
            conn.close()  # the worker holds its own copy of the descriptor now
