"""A small Kubernetes API client (httpx): list, watch with resume, pod annotate and bind, events, leases.

Only what flexai's scheduler and agent need. ``Informer`` keeps a cache from list+watch: it resumes a
broken watch from the last resourceVersion and lists again when the server answers 410 Gone.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from flexai.k8s.extender import ApiError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeClient:
    def __init__(
        self, base_url: str, token: str | None = None, verify: str | bool = True, timeout_s: float = 30
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, verify=verify, timeout=timeout_s)
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
        if url.scheme == "https":
            if self.verify is False:
                context = ssl._create_unverified_context()  # noqa: S323  (--insecure, tests only)
            elif isinstance(self.verify, str):
                context = ssl.create_default_context(cafile=self.verify)
            else:
                context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(url.hostname or "", url.port, timeout=self.timeout_s, context=context)
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=self.timeout_s)
        self._local.conn = conn
        return conn

    def _post_fast(self, path: str, body: dict) -> dict:
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        target = urlsplit(self.base_url).path.rstrip("/") + path
        for attempt in (0, 1):  # a kept-alive connection the server has closed: once more on a new one
            conn = self._connection(fresh=attempt > 0)
            try:
                conn.request("POST", target, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise ApiError(503, f"POST {path}: {exc}") from None
        if response.status >= 400:
            try:
                message = json.loads(payload).get("message", payload.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = payload.decode(errors="replace")
            raise ApiError(response.status, message)
        return json.loads(payload) if payload else {}

    @classmethod
    def in_cluster(cls) -> KubeClient:
        import os

        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return cls(f"https://{host}:{port}", token, verify=str(SERVICE_ACCOUNT / "ca.crt"))

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
                    event = json.loads(line)
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
