"""A small Kubernetes API client (httpx): list, watch with resume, pod annotate and bind, events, leases.

Only what flexai's scheduler and agent need. ``Informer`` keeps a cache from list+watch: it resumes a
broken watch from the last resourceVersion and lists again when the server answers 410 Gone.

The requests are written here, not by a general client: ``benchmarks/k8s_client_cpu.py`` measured lightkube
1.0.1 (typed, on httpx2) at 2 to 3 times this client's CPU per pods/binding POST, its typed pods at 9 times
the memory of the Informer's ``slim_pod`` records, and it cannot read the Status the API server answers a
binding with. A kubeconfig is read with lightkube's ``KubeConfig`` (``KubeClient.from_kubeconfig``).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from flexai.k8s.extender import ApiError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = Path("~/.kube/config")

CLUSTER_FIELDS = frozenset(
    {"server", "certificate-authority", "certificate-authority-data", "insecure-skip-tls-verify"}
    | {"extensions", "disable-compression"}  # no effect on how flexai connects
)
"""What flexai reads of a kubeconfig cluster (any other field is refused, never silently dropped)."""
USER_FIELDS = frozenset(
    {
        "token",
        "tokenFile",
        "client-certificate",
        "client-certificate-data",
        "client-key",
        "client-key-data",
        "extensions",
    }
)
"""What flexai reads of a kubeconfig user: a bearer token or a client certificate (no exec plugin,
auth-provider, basic auth or impersonation)."""


class KubeConfigError(ValueError):
    """A kubeconfig flexai cannot use; the message names the file and the context or field."""


def tls_context(
    verify: str | bool | ssl.SSLContext = True,
    client_cert: tuple[str | Path, str | Path] | None = None,
    ca_data: str | None = None,
) -> ssl.SSLContext:
    """One TLS context for both of the client's paths (httpx and the http.client fast path): ``verify`` is a CA
    file, True (the system's CAs), False (no verification, tests only) or a ready context; ``ca_data`` PEM
    CAs; ``client_cert`` (certificate file, key file) presented to the server."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif verify is False:
        context = ssl._create_unverified_context()  # noqa: S323  (--insecure / insecure-skip-tls-verify)
    elif isinstance(verify, str) or ca_data:
        context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None, cadata=ca_data)
    else:
        context = ssl.create_default_context()
    if client_cert is not None:
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return context


class KubeClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        verify: str | bool | ssl.SSLContext = True,
        timeout_s: float = 30,
        client_cert: tuple[str | Path, str | Path] | None = None,
    ) -> None:
        """``verify``: CA file, True (system CAs), False (no verification) or an ``ssl.SSLContext`` (as
        ``tls_context`` makes); ``client_cert``: (certificate, key) files of a client certificate."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        https = urlsplit(base_url).scheme == "https"
        self.ssl_context = tls_context(verify, client_cert) if https else None
        """Shared by httpx and the fast path's connections (its client certificate is loaded once)."""
        self.http = httpx.Client(
            base_url=base_url,
            headers=headers,
            verify=self.ssl_context if self.ssl_context is not None else True,
            timeout=timeout_s,
        )
        self.base_url = base_url
        self.headers = headers
        self.verify = verify
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        """This thread's kept-alive connection for the hot path (pods/binding): the standard library's client
        costs a quarter of httpx's CPU per request, and the extender binds thousands of pods a minute."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        url = urlsplit(self.base_url)
        if self.ssl_context is not None:
            conn = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=self.timeout_s, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=self.timeout_s)
        self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close the httpx client and this thread's fast-path connection."""
        self.http.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _post_fast(self, path: str, body: dict) -> dict:
        payload = self._send_fast("POST", path, json.dumps(body, separators=(",", ":")).encode(), "application/json")
        return json.loads(payload) if payload else {}

    def _send_fast(self, method: str, path: str, data: bytes, content_type: str) -> bytes:
        """One request on this thread's kept-alive connection; the answer's body (raises ApiError for >= 400)."""
        headers = {"Content-Type": content_type, "Accept": "application/json", **self.headers}
        target = urlsplit(self.base_url).path.rstrip("/") + path
        for attempt in (0, 1):  # a kept-alive connection the server has closed: once more on a new one
            conn = self._connection(fresh=attempt > 0)
            try:
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise ApiError(503, f"{method} {path}: {exc}") from None
        if response.status >= 400:
            try:
                message = json.loads(payload).get("message", payload.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = payload.decode(errors="replace")
            raise ApiError(response.status, message)
        return payload

    @classmethod
    def in_cluster(cls) -> KubeClient:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return cls(f"https://{host}:{port}", token, verify=str(SERVICE_ACCOUNT / "ca.crt"))

    @classmethod
    def from_kubeconfig(cls, path: str | Path | None = None, context: str | None = None) -> KubeClient:
        """A client for a kubeconfig's context (``context`` or its current-context), as kubectl reads it: the
        server, its CA (certificate-authority file or -data), insecure-skip-tls-verify, and the user's bearer
        token (token, else tokenFile) and/or client certificate (client-certificate/-key, file or -data).
        ``path`` defaults to $KUBECONFIG, else ~/.kube/config. Raises ``KubeConfigError`` naming the file and
        the context or field for a missing file, an unknown context or what flexai does not support (an exec
        plugin, auth-provider, basic auth, impersonation, tls-server-name, proxy-url)."""
        server, token, verify = _read_kubeconfig(path, context)
        return cls(server, token, verify=verify)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"{method} {path}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ApiError(response.status_code, message)
        return response.json() if response.content else {}

    # ----------------------------------------------------------------- reads
    def list(
        self, path: str, limit: int = 0, transform: Callable[[dict], Any] | None = None
    ) -> tuple[list[Any], str]:
        """Every item of a collection and its resourceVersion; with ``limit``, page by page (``limit`` and
        ``continue``), each page's items passed through ``transform`` before the next is read, so a large
        collection is never held whole as raw objects."""
        items: list[Any] = []
        version = ""
        token = ""
        while True:
            params: dict[str, str] = {}
            if limit:
                params["limit"] = str(limit)
            if token:
                params["continue"] = token
            body = self._call("GET", path, params=params or None)
            page = body.get("items") or []
            if transform is not None:
                page = [transform(i) for i in page]
            items.extend(page)
            meta = body.get("metadata") or {}
            version = version or meta.get("resourceVersion", "")
            token = meta.get("continue") or ""
            if not token:
                return items, version

    def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> Iterator[dict]:
        """Watch events (type, object) from resource_version; raises ApiError(410) when it is too old."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        try:
            # A read timeout past the server's own watch timeout: a half-open connection cannot hang forever.
            timeout = httpx.Timeout(10.0, read=timeout_s + 30.0)
            with self.http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, response.text)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = orjson.loads(line)  # every pod event of the cluster passes here
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        raise ApiError(int(status.get("code", 500)), status.get("message", "watch error"))
                    yield event
        except httpx.HTTPError as exc:
            raise ApiError(503, f"watch {path}: {exc}") from None

    def get_pod(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    # ----------------------------------------------------------------- writes
    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> dict:
        """Merge-patch the pod's annotations (a None value removes the key)."""
        return self._call(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            content=json.dumps({"metadata": {"annotations": annotations}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def annotate_node(self, name: str, annotations: dict[str, str]) -> dict:
        return self._call(
            "PATCH",
            f"/api/v1/nodes/{name}",
            content=json.dumps({"metadata": {"annotations": annotations}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def bind_pod(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str] | None = None
    ) -> None:
        """POST pods/binding. ``annotations`` go in the Binding's metadata: the API server copies them onto the
        pod as it binds it (so the binder needs no right to patch pods)."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            metadata["uid"] = uid
        if annotations:
            metadata["annotations"] = dict(annotations)
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        self._post_fast(f"/api/v1/namespaces/{namespace}/pods/{name}/binding", body)

    def nominate_pod(self, namespace: str, name: str, node: str) -> None:
        """Merge-patch the pod's ``status.nominatedNodeName``: kube-scheduler tries a pod's nominated node first
        (that node alone, extenders included) on its next attempt, before it samples nodes."""
        # On the fast path, its answer (the whole pod) unread: one for every pod that arrives.
        body = json.dumps({"status": {"nominatedNodeName": node}}, separators=(",", ":")).encode()
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        self._send_fast("PATCH", path, body, "application/merge-patch+json")

    def evict_pod(self, namespace: str, name: str, uid: str = "") -> None:
        """POST pods/eviction (policy/v1 Eviction): the API server honours PodDisruptionBudgets and answers
        429 when one refuses."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        body: dict[str, Any] = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": metadata}
        if uid:
            body["deleteOptions"] = {"preconditions": {"uid": uid}}
        self._call("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", json=body)

    def create_event(self, pod: dict, reason: str, message: str, kind: str = "Warning") -> None:
        meta = pod.get("metadata", {})
        namespace = meta.get("namespace", "default")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'pod')}.", "namespace": namespace},
            "involvedObject": {"kind": "Pod", "name": meta.get("name"), "namespace": namespace, "uid": meta.get("uid")},
            "reason": reason,
            "message": message,
            "type": kind,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "flexai-scheduler"},
        }
        self._call("POST", f"/api/v1/namespaces/{namespace}/events", json=body)

    # ----------------------------------------------------------------- secrets (remote XPU lease tokens)
    def create_secret(self, namespace: str, body: dict) -> dict:
        return self._call("POST", f"/api/v1/namespaces/{namespace}/secrets", json=body)

    def get_secret(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def replace_secret(self, namespace: str, name: str, body: dict) -> dict:
        return self._call("PUT", f"/api/v1/namespaces/{namespace}/secrets/{name}", json=body)

    def delete_secret(self, namespace: str, name: str) -> None:
        self._call("DELETE", f"/api/v1/namespaces/{namespace}/secrets/{name}")

    # ----------------------------------------------------------------- leases
    def get_lease(self, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, body: dict) -> dict:
        return self._call("POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", json=body)

    def replace_lease(self, namespace: str, name: str, body: dict) -> dict:
        return self._call("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}", json=body)


def _kubeconfig_path(path: str | Path | None) -> Path:
    if path is None or str(path) == "":
        path = os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    if os.pathsep in str(path):
        raise KubeConfigError(
            f"kubeconfig {path}: a list of files is not supported (kubectl merges them); name one file"
        )
    return Path(path).expanduser()


def _read_kubeconfig(path: str | Path | None, context: str | None) -> tuple[str, str | None, ssl.SSLContext | bool]:
    """(server URL, bearer token, TLS context) of one kubeconfig context; lightkube parses the file."""
    import yaml
    from lightkube.config.kubeconfig import KubeConfig, SingleConfig
    from lightkube.core.exceptions import ConfigError

    source = _kubeconfig_path(path)
    try:
        raw = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise KubeConfigError(f"kubeconfig {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeConfigError(f"kubeconfig {source}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig {source}: not YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise KubeConfigError(f"kubeconfig {source}: not a kubeconfig (a YAML mapping with clusters, contexts)")
    try:
        config = KubeConfig.from_dict({"clusters": [], "contexts": [], **raw}, fname=source)
        contexts = ", ".join(sorted(config.contexts)) or "none"
        name = context or config.current_context
        if not name:
            raise KubeConfigError(f"kubeconfig {source}: no current-context; name a context (it has: {contexts})")
        if name not in config.contexts:
            raise KubeConfigError(f"kubeconfig {source}: no context {name!r} (it has: {contexts})")
        ctx = config.contexts[name]
        if ctx.cluster not in config.clusters:
            raise KubeConfigError(f"kubeconfig {source}: context {name!r} names cluster {ctx.cluster!r}, not defined")
        if ctx.user and ctx.user not in config.users:
            raise KubeConfigError(f"kubeconfig {source}: context {name!r} names user {ctx.user!r}, not defined")
        single = config.get(name)
    except KubeConfigError:
        raise
    except (KeyError, TypeError, ValueError, ConfigError) as exc:  # ValueError: msgspec's ValidationError
        raise KubeConfigError(f"kubeconfig {source}: not a kubeconfig ({type(exc).__name__}: {exc})") from None
    assert isinstance(single, SingleConfig)
    where = f"kubeconfig {source}, context {name!r}"
    raw_cluster = _named(raw.get("clusters"), ctx.cluster, "cluster")
    raw_user = _named(raw.get("users"), ctx.user, "user") if ctx.user else {}
    for kind, owner, given, known in (
        ("cluster", ctx.cluster, raw_cluster, CLUSTER_FIELDS),
        ("user", ctx.user, raw_user, USER_FIELDS),
    ):
        unsupported = sorted(set(given) - known)
        if unsupported:
            readable = ", ".join(sorted(known - {"extensions", "disable-compression"}))
            raise KubeConfigError(
                f"{where}: {kind} {owner!r} field {unsupported[0]!r} is not supported (flexai reads {readable})"
            )
    cluster, user = single.cluster, single.user
    if "server" not in raw_cluster or not cluster.server:
        raise KubeConfigError(f"{where}: cluster {ctx.cluster!r} has no server")
    https = urlsplit(cluster.server).scheme == "https"
    if cluster.certificate_auth and cluster.certificate_auth_data:
        raise KubeConfigError(f"{where}: certificate-authority and certificate-authority-data are both set")
    if cluster.insecure and (cluster.certificate_auth or cluster.certificate_auth_data):
        raise KubeConfigError(f"{where}: insecure-skip-tls-verify with a certificate-authority (choose one)")
    token = None
    if user is not None and user.token:
        token = user.token.strip()
    elif user is not None and user.token_file:
        token_file = Path(single.abs_file(user.token_file))
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise KubeConfigError(f"{where}: tokenFile {token_file}: cannot read it ({exc})") from None
    verify: ssl.SSLContext | bool = not cluster.insecure
    if not https:
        return cluster.server, token, verify
    ca_file = str(single.abs_file(cluster.certificate_auth)) if cluster.certificate_auth else None
    ca_data = None
    if cluster.certificate_auth_data:
        ca_data = _b64(cluster.certificate_auth_data, f"{where}: certificate-authority-data")
    try:
        tls = tls_context(ca_file if ca_file else not cluster.insecure, ca_data=ca_data)
    except (OSError, ValueError) as exc:
        field = f"certificate-authority {ca_file}" if ca_file else "certificate-authority-data"
        raise KubeConfigError(f"{where}: {field}: cannot load it ({exc})") from None
    if user is not None:
        _load_client_cert(tls, single, user, where)
    return cluster.server, token, tls


def _named(entries: object, name: str | None, key: str) -> dict:
    """The raw mapping of the named cluster/user (lightkube's model drops fields it does not know)."""
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(key) or {}
    return {}


def _b64(data: str, what: str) -> str:
    try:
        return base64.b64decode(data, validate=True).decode()
    except (binascii.Error, ValueError) as exc:
        raise KubeConfigError(f"{what}: not base64 PEM ({exc})") from None


def _load_client_cert(context: ssl.SSLContext, single: Any, user: Any, where: str) -> None:
    """Load the user's client certificate and key into ``context``; -data is written for OpenSSL to a private
    folder (0700, files 0600) that is removed as soon as they are loaded."""
    parts = (
        ("client-certificate", user.client_cert, user.client_cert_data),
        ("client-key", user.client_key, user.client_key_data),
    )
    if not any(file or data for _, file, data in parts):
        return
    for (name, file, data), (other, _, _) in zip(parts, reversed(parts), strict=True):
        if file and data:
            raise KubeConfigError(f"{where}: {name} and {name}-data are both set")
        if not (file or data):
            raise KubeConfigError(f"{where}: {other} without {name} (or {name}-data)")
    folder = tempfile.mkdtemp(prefix="flexai-kubeconfig-") if any(data for _, _, data in parts) else ""  # 0700
    try:
        paths = []
        for name, file, data in parts:
            if file:
                paths.append(str(single.abs_file(file)))
                continue
            target = os.path.join(folder, name)
            pem = _b64(data, f"{where}: {name}-data")
            with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(pem)
            paths.append(target)
        try:
            context.load_cert_chain(paths[0], paths[1])
        except (OSError, ValueError) as exc:
            shown = ["(data)" if folder and p.startswith(folder) else p for p in paths]
            raise KubeConfigError(
                f"{where}: client-certificate {shown[0]} / client-key {shown[1]}: cannot load them ({exc})"
            ) from None
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


class Informer:
    """list+watch one collection into callbacks, forever (until stopped)."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        on_replace: Callable[[list[Any]], None],
        on_event: Callable[[str, Any], None],
        retry_s: float = 1.0,
        transform: Callable[[dict], Any] | None = None,
        page_size: int = 500,
    ) -> None:
        """``transform`` turns each object into what the callbacks get (as client-go's SetTransform), so the
        cache holds only what it needs; lists are read ``page_size`` items at a time."""
        self.client = client
        self.path = path
        self.on_replace = on_replace
        self.on_event = on_event
        self.retry_s = retry_s
        self.transform = transform
        self.page_size = page_size
        self.resource_version = ""
        self.relists = 0
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer {path}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _relist(self) -> None:
        items, self.resource_version = self.client.list(self.path, self.page_size, self.transform)
        self.relists += 1
        self.on_replace(items)
        self.synced.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._relist()
                for event in self.client.watch(self.path, self.resource_version, timeout_s=60):
                    if self._stop.is_set():
                        return
                    obj = event.get("object", {})
                    if event["type"] != "BOOKMARK":
                        try:
                            self.on_event(event["type"], self.transform(obj) if self.transform else obj)
                        except Exception:  # noqa: BLE001  (never skip an event silently: list again)
                            self.resource_version = ""
                            break
                    rv = obj.get("metadata", {}).get("resourceVersion")
                    if rv:
                        self.resource_version = rv
            except ApiError as exc:
                if exc.status == 410:
                    log.warning("watch %s from resourceVersion %s: 410 Gone (history compacted); listing again",
                                self.path, self.resource_version)  # fmt: skip
                    self.resource_version = ""  # too old: list again
                    continue
                self._stop.wait(self.retry_s)
            except Exception:  # noqa: BLE001  (keep the informer alive; the next loop resumes)
                self._stop.wait(self.retry_s)


class LeaderElector:
    """coordination.k8s.io Lease: one replica holds it and binds; the others wait and take over on expiry."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        lease_s: int = 15,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_s = lease_s
        self.clock = clock
        self._leader_until = 0.0
        self._observed: tuple[object, object] | None = None
        self._observed_at = 0.0

    def is_leader(self) -> bool:
        return self.clock() < self._leader_until

    @staticmethod
    def _stamp(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _expired(self, spec: dict, now: float) -> bool:
        """Expiry timed on this replica's clock from when it last saw the record change (as client-go does),
        so clock skew between replicas cannot make two leaders."""
        record = (spec.get("holderIdentity"), spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        return now >= self._observed_at + float(spec.get("leaseDurationSeconds") or self.lease_s)

    def try_acquire_or_renew(self) -> bool:
        now = self.clock()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_s, "renewTime": self._stamp(now)}
        try:
            lease = self.client.get_lease(self.namespace, self.name)
            if lease is None:
                spec["acquireTime"] = self._stamp(now)
                self.client.create_lease(
                    self.namespace,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": spec,
                    },
                )
            else:
                current = lease.get("spec", {})
                holder = current.get("holderIdentity")
                if holder not in (None, "", self.identity) and not self._expired(current, now):
                    self._leader_until = 0.0
                    return False
                if holder != self.identity:
                    spec["acquireTime"] = self._stamp(now)
                    spec["leaseTransitions"] = int(current.get("leaseTransitions", 0)) + 1
                else:
                    spec["acquireTime"] = current.get("acquireTime", self._stamp(now))
                lease["spec"] = {**current, **spec}
                # The resourceVersion in metadata makes the update conditional: two replicas never both win.
                self.client.replace_lease(self.namespace, self.name, lease)
        except (ApiError, ValueError, TypeError):
            self._leader_until = 0.0
            return False
        self._leader_until = now + self.lease_s * 2 / 3  # stop acting before the lease can expire
        return True
