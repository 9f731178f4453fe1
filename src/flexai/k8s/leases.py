"""Remote XPU on Kubernetes, the agent's part: lease workers for the remote slices on this node.

A pod that asks for ``flexai.io/vxpu-remote: 1`` is bound by the extender with its slice's place in the
annotation ``flexai.io/remote-placement`` (node, client node, lease id, endpoint, slices). The agent of the node
that holds the slice (``RemoteLeases.sync``, every ``interval_s``):

* lists the remote pods (label ``flexai.io/vxpu-remote``, written by the webhook) whose slice is on its node;
* for each live one, makes the lease's secret (kept in ``state_dir``, mode 0600, so that a restarted agent
  mints the same token), starts its worker (``python -m flexai.remote.worker``) with the slice's environment
  (visibility and HAMi-core / MPS variables, as a container on the slice would get), and writes the lease token
  into a Secret of the pod's namespace (name: the pod's ``flexai.io/lease-secret`` annotation, default
  ``flexai-lease-<pod>``), owned by the pod (``ownerReferences``: the garbage collector deletes it with the pod);
  the pod's containers read it by ``secretKeyRef`` (the webhook writes that reference), never from the pod spec;
* restarts a worker that ended while its pod lives (a worker ends when its client is silent for its TTL);
* stops the worker and deletes the Secret when the pod is gone or finished (its slice returns to the pool
  in the extender's view as the pod goes).

Clients reach the workers through one TLS port per node (``Gateway``): the agent reads the 16-byte preamble
that names the lease and hands the connection to that lease's worker over a unix socket (SCM_RIGHTS); the
worker does the TLS handshake itself, and no byte of the traffic goes through the agent.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from flexai.k8s import names
from flexai.k8s.extender import ApiError
from flexai.node.devices import DeviceBackend
from flexai.node.environment import slice_environment
from flexai.remote.auth import LeaseSpec, make_token, new_secret, read_preamble

log = logging.getLogger("flexai.k8s.leases")

HANDSHAKE_TIMEOUT_S = 5.0


class Gateway:
    """One TCP port for every lease worker of the node: the preamble names the lease, the connection is passed on."""

    def __init__(self, listen: str, route: Callable[[str], str | None]) -> None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen={listen!r} is not allowed: HOST:PORT like 0.0.0.0:8471")
        self.host, self.port = host.strip("[]"), int(port)
        self.route = route
        self._listener: socket.socket | None = None
        self.handed = 0
        self.refused = 0

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="flexai-lease-gateway", daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                sock, address = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pass_on, args=(sock, address), daemon=True).start()

    def _pass_on(self, sock: socket.socket, address: tuple) -> None:
        with sock:
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                lease = read_preamble(sock)
                path = self.route(lease)
                if path is None:
                    raise ConnectionError(f"no worker serves lease {lease} on this node")
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as carrier:
                    carrier.settimeout(HANDSHAKE_TIMEOUT_S)
                    carrier.connect(path)
                    socket.send_fds(carrier, [f"{address[0]}:{address[1]}".encode()], [sock.fileno()])
                self.handed += 1
            except (OSError, ValueError) as exc:
                self.refused += 1
                log.info("remote connection from %s refused: %s", address[0], exc)
            except Exception as exc:  # noqa: BLE001  (FrameError and the like: one bad client must not stop the loop)
                self.refused += 1
                log.info("remote connection from %s refused: %s", address[0], exc)


@dataclass
class LeaseProcess:
    pod_key: str
    namespace: str
    name: str
    uid: str
    secret_name: str
    spec: LeaseSpec
    spec_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0


class RemoteLeases:
    def __init__(
        self,
        client: object,
        node_name: str,
        backend: DeviceBackend,
        state_dir: str | Path,
        listen: str = "0.0.0.0:8471",
        advertise: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        ca_file: str = "",
        server_name: str = "",
        client_ca: str = "",
        allow: list[str] | None = None,
        ttl_s: float = 10.0,
        interval_s: float = 2.0,
        python: str = sys.executable,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        if not tls_cert or not tls_key:
            raise ValueError("remote leases need --remote-tls-cert and --remote-tls-key: clients are served over TLS")
        self.client = client
        self.node_name = node_name
        self.backend = backend
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.gateway = Gateway(listen, self.route)
        self.advertise = advertise
        self.tls_cert, self.tls_key, self.client_ca = tls_cert, tls_key, client_ca or None
        self.ca_pem = Path(ca_file).read_text() if ca_file else ""
        self.server_name = server_name
        self.allow = list(allow or [])
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.python = python
        self.worker_env = dict(worker_env or {})
        self.leases: dict[str, LeaseProcess] = {}
        """By lease id."""
        self.problems: dict[str, str] = {}
        self.lock = threading.RLock()
        self._stop = threading.Event()

    # ----------------------------------------------------------------- life
    @property
    def endpoint(self) -> str:
        """What the agent publishes in its inventory (``remote_endpoint``) and the extender writes on pods."""
        return self.advertise or f"tls://{self.gateway.host}:{self.gateway.port}"

    def start(self, loop: bool = True) -> None:
        self.gateway.start()
        if loop:
            threading.Thread(target=self._loop, name="flexai-remote-leases", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.gateway.stop()
        with self.lock:
            for lease in list(self.leases.values()):
                self._stop_worker(lease)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except ApiError as exc:
                log.warning("remote leases: cannot list pods: %s", exc)

    def route(self, lease_id: str) -> str | None:
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or lease.process is None or lease.process.poll() is not None:
                return None
            return lease.spec.handoff

    # ----------------------------------------------------------------- pods
    def sync(self) -> None:
        """Make the workers and Secrets match the remote pods whose slices are on this node."""
        items, _ = self.client.list(f"/api/v1/pods?labelSelector={quote(names.LABEL_REMOTE)}")  # type: ignore[attr-defined]
        wanted: dict[str, tuple[dict, names.RemotePlacement]] = {}
        for pod in items:
            meta = pod.get("metadata") or {}
            raw = (meta.get("annotations") or {}).get(names.ANNOTATION_REMOTE)
            phase = (pod.get("status") or {}).get("phase") or ""
            if not raw or phase in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
                continue
            try:
                placement = names.RemotePlacement.from_json(raw)
            except ValueError:
                continue
            node = (pod.get("spec") or {}).get("nodeName")
            if placement.node != self.node_name or placement.client != node:
                continue
            if placement.lease != names.lease_id_of(str(meta.get("uid") or "")):
                continue  # a placement not written by the extender for this pod
            wanted[placement.lease] = (pod, placement)
        with self.lock:
            for lease_id in [k for k in self.leases if k not in wanted]:
                self._end(self.leases.pop(lease_id))
            for lease_id, (pod, placement) in wanted.items():
                lease = self.leases.get(lease_id)
                if lease is None:
                    lease = self._begin(pod, placement)
                    if lease is None:
                        continue
                    self.leases[lease_id] = lease
                if lease.process is None or lease.process.poll() is not None:
                    self._start_worker(lease, placement)

    def _begin(self, pod: dict, placement: names.RemotePlacement) -> LeaseProcess | None:
        meta = pod["metadata"]
        key = f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
        spec_path = self.state_dir / f"{placement.lease}.json"
        spec = None
        if spec_path.exists():  # a restarted agent mints the same token for a pod that still runs
            try:
                spec = LeaseSpec.load(spec_path)
            except (OSError, ValueError, TypeError):
                spec = None
        if spec is None or spec.lease != placement.lease:
            spec = LeaseSpec(lease=placement.lease, secret=new_secret())
        spec.handoff = str(self.state_dir / f"{placement.lease}.sock")
        spec.tls_cert, spec.tls_key, spec.client_ca = self.tls_cert, self.tls_key, self.client_ca
        spec.allow = self.allow
        spec.ttl_s = self.ttl_s
        spec.connect_timeout_s = 3600.0  # the agent starts it again anyway while the pod lives
        spec.stats = str(self.state_dir / f"{placement.lease}.stats")
        spec.save(spec_path)
        lease = LeaseProcess(
            key, meta.get("namespace", "default"), meta.get("name", ""), str(meta.get("uid", "")),
            names.lease_secret_name(pod), spec, spec_path,
        )  # fmt: skip
        error = self._write_secret(lease)
        if error:
            self.problems[key] = error
            log.warning("remote lease of %s: %s", key, error)
            spec_path.unlink(missing_ok=True)
            return None
        self.problems.pop(key, None)
        return lease

    def _secret_body(self, lease: LeaseProcess) -> dict:
        data = {"token": make_token(lease.spec.secret, lease.spec.lease, lease.spec.epoch)}
        if self.ca_pem:
            data["ca.crt"] = self.ca_pem
        if self.server_name:
            data["server-name"] = self.server_name
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": lease.secret_name,
                "namespace": lease.namespace,
                "labels": {"flexai.io/lease": lease.spec.lease},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": lease.name,
                        "uid": lease.uid,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    def _write_secret(self, lease: LeaseProcess) -> str:
        """Create the pod's Secret; an existing one is replaced only when the same pod owns it ("" = done)."""
        body = self._secret_body(lease)
        client = self.client
        try:
            client.create_secret(lease.namespace, body)  # type: ignore[attr-defined]
            return ""
        except ApiError as exc:
            if exc.status != 409:
                return f"cannot create Secret {lease.namespace}/{lease.secret_name}: {exc}"
        try:
            current = client.get_secret(lease.namespace, lease.secret_name)  # type: ignore[attr-defined]
            owners = (current.get("metadata") or {}).get("ownerReferences") or []
            if not any(o.get("uid") == lease.uid for o in owners):
                return f"Secret {lease.namespace}/{lease.secret_name} exists and is not this pod's: not overwritten"
            body["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion", "")
            client.replace_secret(lease.namespace, lease.secret_name, body)  # type: ignore[attr-defined]
            return ""
        except ApiError as exc:
            return f"cannot replace Secret {lease.namespace}/{lease.secret_name}: {exc}"

    def _start_worker(self, lease: LeaseProcess, placement: names.RemotePlacement) -> None:
        slices = [
            {"device": s.device, "uuid": s.uuid, "share_milli": s.share_milli, "memory_mib": s.memory_mib}
            for s in placement.slices
        ]
        env = {**os.environ, **self.worker_env, **slice_environment(self.backend, lease.pod_key, slices)}
        Path(str(lease.spec.handoff)).unlink(missing_ok=True)
        lease.process = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
            [self.python, "-m", "flexai.remote.worker", str(lease.spec_path)],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        lease.starts += 1
        log.info("remote lease %s of %s: worker %d started", lease.spec.lease, lease.pod_key, lease.process.pid)

    def _stop_worker(self, lease: LeaseProcess) -> None:
        process = lease.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=3)

    def _end(self, lease: LeaseProcess) -> None:
        self._stop_worker(lease)
        for path in (lease.spec_path, Path(str(lease.spec.handoff)), Path(str(lease.spec.stats))):
            path.unlink(missing_ok=True)
        try:
            self.client.delete_secret(lease.namespace, lease.secret_name)  # type: ignore[attr-defined]
        except ApiError as exc:
            if exc.status != 404:
                log.warning(
                    "remote lease of %s: cannot delete its Secret (its owner reference will): %s", lease.pod_key, exc
                )
        log.info("remote lease %s of %s ended", lease.spec.lease, lease.pod_key)

    def ready(self, lease_id: str) -> bool:
        """The lease's worker is up and listening (its stats file says ready)."""
        import json

        with self.lock:
            lease = self.leases.get(lease_id)
        if lease is None or lease.process is None or lease.process.poll() is not None:
            return False
        try:
            return json.loads(Path(str(lease.spec.stats)).read_text()).get("state") == "ready"
        except (OSError, ValueError):
            return False


__all__ = ["Gateway", "RemoteLeases"]
