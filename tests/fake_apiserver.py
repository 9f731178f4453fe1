"""A small fake Kubernetes API server on loopback for tests: nodes, pods, bindings, evictions, events, leases,
with list+watch (resourceVersion, 410 Gone for expired history) and injectable faults (409, 410, 500).

Evictions (``POST pods/{name}/eviction``) delete the pod at once (no grace period) unless a pod is protected
as by a PodDisruptionBudget (``protect``), which answers 429 as the real API server does."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeApiServer:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.rv = 1
        self.min_rv = 0
        self.nodes: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.leases: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        """``namespace/name`` -> Secret; deleted with their owner pod (ownerReferences), as the garbage collector."""
        self.events: list[dict] = []
        self.bindings: list[dict] = []
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, collection, type, object)
        self.faults: list[dict[str, Any]] = []
        self.bind_calls = 0
        self.list_calls = 0
        self.pod_patches = 0
        self.status_patches: list[tuple[str, dict]] = []
        self.evictions: list[str] = []
        """``namespace/name`` of every pod evicted."""
        self.refused_evictions: list[str] = []
        self.protected: set[str] = set()
        """``namespace/name`` of pods a PodDisruptionBudget protects: their evictions get 429."""
        self.pod_deletes = 0
        """DELETE calls on pods (a scheduler must evict, never delete)."""
        self.bind_delay_s = 0.0
        """Seconds each pods/binding POST waits before answering (a slow API server)."""
        self.app = self._build()
        self.server: uvicorn.Server | None = None
        self.url = ""

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.server:
            self.server.should_exit = True

    def fail(self, method: str, path_part: str, status: int, times: int = 1) -> None:
        with self.lock:
            self.faults.append({"method": method, "path": path_part, "status": status, "times": times})

    def expire_history(self) -> None:
        """Watches from any resourceVersion seen so far now get 410 Gone."""
        with self.lock:
            self.rv += 1  # as after a compaction: every version a client holds is now too old
            self.min_rv = self.rv
            self.history.clear()
            self.lock.notify_all()

    def _record(self, collection: str, kind: str, obj: dict) -> dict:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, collection, kind, copy.deepcopy(obj)))
        self.lock.notify_all()
        return obj

    def add_node(self, node: dict) -> None:
        with self.lock:
            self.nodes[node["metadata"]["name"]] = self._record("nodes", "ADDED", node)

    def protect(self, namespace: str, name: str) -> None:
        """A PodDisruptionBudget now refuses to evict this pod."""
        with self.lock:
            self.protected.add(f"{namespace}/{name}")

    def delete_pod(self, namespace: str, name: str) -> bool:
        with self.lock:
            pod = self.pods.pop(f"{namespace}/{name}", None)
            if pod is None:
                return False
            self._record("pods", "DELETED", pod)
            uid = pod["metadata"].get("uid")
            for key, secret in list(self.secrets.items()):
                owners = secret["metadata"].get("ownerReferences") or []
                if key.startswith(f"{namespace}/") and any(o.get("uid") == uid for o in owners):
                    del self.secrets[key]
            return True

    def finish_pod(self, namespace: str, name: str, phase: str = "Succeeded") -> None:
        with self.lock:
            pod = self.pods[f"{namespace}/{name}"]
            pod.setdefault("status", {})["phase"] = phase
            self._record("pods", "MODIFIED", pod)

    def add_pod(self, pod: dict) -> None:
        with self.lock:
            meta = pod["metadata"]
            meta.setdefault("namespace", "default")
            meta.setdefault("uid", f"uid-{meta['name']}")
            self.pods[f"{meta['namespace']}/{meta['name']}"] = self._record("pods", "ADDED", pod)

    # ----------------------------------------------------------------- app
    def _build(self) -> FastAPI:  # noqa: C901
        app = FastAPI()
        server = self

        @app.middleware("http")
        async def faults(request: Request, call_next):  # noqa: ANN001, ANN202
            with server.lock:
                for fault in server.faults:
                    if fault["times"] > 0 and fault["method"] == request.method and fault["path"] in request.url.path:
                        fault["times"] -= 1
                        return JSONResponse(
                            {"kind": "Status", "code": fault["status"], "message": "injected"},
                            status_code=fault["status"],
                        )
            return await call_next(request)

        def collection(name: str, request: Request) -> Any:
            params = request.query_params
            if params.get("watch") in ("1", "true"):
                return StreamingResponse(
                    server._watch(
                        name, int(params.get("resourceVersion") or 0), float(params.get("timeoutSeconds") or 30)
                    )
                )
            with server.lock:
                server.list_calls += 1
                items = list((server.nodes if name == "nodes" else server.pods).values())
                selector = params.get("fieldSelector", "")
                if selector.startswith("spec.nodeName="):
                    wanted = selector.split("=", 1)[1]
                    items = [i for i in items if (i.get("spec") or {}).get("nodeName") == wanted]
                labels = params.get("labelSelector", "")
                if labels:  # "key" or "key=value"
                    key, _, value = labels.partition("=")
                    items = [
                        i
                        for i in items
                        if key in ((i.get("metadata") or {}).get("labels") or {})
                        and (not value or i["metadata"]["labels"][key] == value)
                    ]
                # Pages: "continue" is the offset and the list's resourceVersion (one snapshot per list).
                offset, version = 0, str(server.rv)
                if params.get("continue"):
                    start, version = params["continue"].split(":", 1)
                    offset = int(start)
                limit = int(params.get("limit") or 0) or len(items)
                page = items[offset : offset + limit]
                meta = {"resourceVersion": version}
                if offset + limit < len(items):
                    meta["continue"] = f"{offset + limit}:{version}"
                return {"kind": "List", "items": copy.deepcopy(page), "metadata": meta}

        @app.get("/api/v1/nodes")
        def list_nodes(request: Request) -> Any:
            return collection("nodes", request)

        @app.get("/api/v1/pods")
        def list_pods(request: Request) -> Any:
            return collection("pods", request)

        @app.get("/api/v1/namespaces/{ns}/pods/{name}")
        def get_pod(ns: str, name: str) -> dict:
            with server.lock:
                pod = server.pods.get(f"{ns}/{name}")
                if pod is None:
                    raise HTTPException(404, "not found")
                return copy.deepcopy(pod)

        def merge(obj: dict, patch: dict) -> None:
            for key, value in patch.items():
                if isinstance(value, dict) and isinstance(obj.get(key), dict):
                    merge(obj[key], value)
                elif value is None:
                    obj.pop(key, None)
                else:
                    obj[key] = value

        @app.post("/api/v1/namespaces/{ns}/pods", status_code=201)
        def create_pod(ns: str, body: dict = Body(...)) -> Any:  # noqa: B008
            body.setdefault("metadata", {})["namespace"] = ns
            key = f"{ns}/{body['metadata']['name']}"
            with server.lock:
                if key in server.pods:
                    return JSONResponse({"kind": "Status", "code": 409, "message": "exists"}, 409)
            server.add_pod(body)
            return copy.deepcopy(server.pods[key])

        @app.patch("/api/v1/namespaces/{ns}/pods/{name}")
        async def patch_pod(ns: str, name: str, request: Request) -> dict:
            patch = json.loads(await request.body())
            with server.lock:
                server.pod_patches += 1
                pod = server.pods.get(f"{ns}/{name}")
                if pod is None:
                    raise HTTPException(404, "not found")
                merge(pod, patch)
                return copy.deepcopy(server._record("pods", "MODIFIED", pod))

        @app.patch("/api/v1/namespaces/{ns}/pods/{name}/status")
        async def patch_pod_status(ns: str, name: str, request: Request) -> dict:
            patch = json.loads(await request.body())
            with server.lock:
                server.status_patches.append((f"{ns}/{name}", copy.deepcopy(patch)))
                pod = server.pods.get(f"{ns}/{name}")
                if pod is None:
                    raise HTTPException(404, "not found")
                merge(pod, {"status": patch.get("status", {})})  # the status subresource changes status only
                return copy.deepcopy(server._record("pods", "MODIFIED", pod))

        @app.patch("/api/v1/nodes/{name}")
        async def patch_node(name: str, request: Request) -> dict:
            patch = json.loads(await request.body())
            with server.lock:
                node = server.nodes.get(name)
                if node is None:
                    raise HTTPException(404, "not found")
                merge(node, patch)
                return copy.deepcopy(server._record("nodes", "MODIFIED", node))

        @app.post("/api/v1/namespaces/{ns}/pods/{name}/binding", status_code=201)
        def bind(ns: str, name: str, body: dict = Body(...)) -> dict:  # noqa: B008
            if server.bind_delay_s:
                time.sleep(server.bind_delay_s)  # the fake's own latency, not a test waiting
            with server.lock:
                server.bind_calls += 1
                pod = server.pods.get(f"{ns}/{name}")
                if pod is None:
                    raise HTTPException(404, "not found")
                uid = (body.get("metadata") or {}).get("uid")
                if uid and uid != pod["metadata"].get("uid"):
                    return JSONResponse({"kind": "Status", "code": 409, "message": "uid precondition failed"}, 409)
                if pod.get("spec", {}).get("nodeName"):
                    return JSONResponse({"kind": "Status", "code": 409, "message": "pod is already assigned"}, 409)
                # As the API server's setPodHostAndAnnotations: the Binding's annotations are merged into the pod.
                annotations = (body.get("metadata") or {}).get("annotations") or {}
                if annotations:
                    pod["metadata"]["annotations"] = {**(pod["metadata"].get("annotations") or {}), **annotations}
                pod.setdefault("spec", {})["nodeName"] = body["target"]["name"]
                server._record("pods", "MODIFIED", pod)
                server.bindings.append(copy.deepcopy(body))
                return {"kind": "Status", "status": "Success"}

        @app.post("/api/v1/namespaces/{ns}/pods/{name}/eviction", status_code=201)
        def evict(ns: str, name: str, body: dict = Body(...)) -> Any:  # noqa: B008
            key = f"{ns}/{name}"
            if body.get("kind") != "Eviction" or body.get("apiVersion") != "policy/v1":
                return JSONResponse({"kind": "Status", "code": 400, "message": "not a policy/v1 Eviction"}, 400)
            with server.lock:
                if key not in server.pods:
                    raise HTTPException(404, "not found")
                if key in server.protected:
                    server.refused_evictions.append(key)
                    message = "Cannot evict pod as it would violate the pod's disruption budget."
                    return JSONResponse(
                        {"kind": "Status", "code": 429, "reason": "TooManyRequests", "message": message}, 429
                    )
                server.evictions.append(key)
            server.delete_pod(ns, name)
            return {"kind": "Status", "status": "Success"}

        @app.delete("/api/v1/namespaces/{ns}/pods/{name}")
        def delete(ns: str, name: str) -> Any:
            with server.lock:
                server.pod_deletes += 1
            if not server.delete_pod(ns, name):
                raise HTTPException(404, "not found")
            return {"kind": "Status", "status": "Success"}

        @app.post("/api/v1/namespaces/{ns}/events", status_code=201)
        def event(ns: str, body: dict = Body(...)) -> dict:  # noqa: B008
            with server.lock:
                server.events.append(body)
            return body

        @app.post("/api/v1/namespaces/{ns}/secrets", status_code=201)
        def create_secret(ns: str, body: dict = Body(...)) -> Any:  # noqa: B008
            with server.lock:
                key = f"{ns}/{body['metadata']['name']}"
                if key in server.secrets:
                    return JSONResponse({"kind": "Status", "code": 409, "message": "exists"}, 409)
                server.rv += 1
                body["metadata"]["resourceVersion"] = str(server.rv)
                body["metadata"]["namespace"] = ns
                server.secrets[key] = body
                return body

        @app.get("/api/v1/namespaces/{ns}/secrets/{name}")
        def get_secret(ns: str, name: str) -> dict:
            with server.lock:
                secret = server.secrets.get(f"{ns}/{name}")
                if secret is None:
                    raise HTTPException(404, "not found")
                return copy.deepcopy(secret)

        @app.put("/api/v1/namespaces/{ns}/secrets/{name}")
        def replace_secret(ns: str, name: str, body: dict = Body(...)) -> Any:  # noqa: B008
            with server.lock:
                current = server.secrets.get(f"{ns}/{name}")
                if current is None:
                    raise HTTPException(404, "not found")
                if body.get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
                    return JSONResponse({"kind": "Status", "code": 409, "message": "conflict"}, 409)
                server.rv += 1
                body["metadata"]["resourceVersion"] = str(server.rv)
                server.secrets[f"{ns}/{name}"] = body
                return body

        @app.delete("/api/v1/namespaces/{ns}/secrets/{name}")
        def delete_secret(ns: str, name: str) -> Any:
            with server.lock:
                if server.secrets.pop(f"{ns}/{name}", None) is None:
                    raise HTTPException(404, "not found")
            return {"kind": "Status", "status": "Success"}

        @app.get("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}")
        def get_lease(ns: str, name: str) -> dict:
            with server.lock:
                lease = server.leases.get(f"{ns}/{name}")
                if lease is None:
                    raise HTTPException(404, "not found")
                return copy.deepcopy(lease)

        @app.post("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", status_code=201)
        def create_lease(ns: str, body: dict = Body(...)) -> Any:  # noqa: B008
            with server.lock:
                key = f"{ns}/{body['metadata']['name']}"
                if key in server.leases:
                    return JSONResponse({"kind": "Status", "code": 409, "message": "exists"}, 409)
                server.rv += 1
                body["metadata"]["resourceVersion"] = str(server.rv)
                server.leases[key] = body
                return body

        @app.put("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}")
        def replace_lease(ns: str, name: str, body: dict = Body(...)) -> Any:  # noqa: B008
            with server.lock:
                current = server.leases.get(f"{ns}/{name}")
                if current is None:
                    raise HTTPException(404, "not found")
                if body.get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
                    return JSONResponse({"kind": "Status", "code": 409, "message": "conflict"}, 409)
                server.rv += 1
                body["metadata"]["resourceVersion"] = str(server.rv)
                server.leases[f"{ns}/{name}"] = body
                return body

        return app

    def _watch(self, name: str, since: int, timeout_s: float) -> Iterator[bytes]:
        # Never yield while holding the lock: a client that hangs up leaves the generator suspended forever.
        gone = (
            json.dumps(
                {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "code": 410,
                        "reason": "Expired",
                        "message": "too old resource version",
                    },
                }
            )
            + "\n"
        )
        deadline = time.monotonic() + min(timeout_s, 30)
        sent = since
        while time.monotonic() < deadline:
            with self.lock:
                expired = bool(sent) and sent < self.min_rv
                fresh = (
                    []
                    if expired
                    else [(rv, kind, obj) for rv, col, kind, obj in self.history if col == name and rv > sent]
                )
                if not expired and not fresh:
                    self.lock.wait(timeout=0.2)
                    continue
            if expired:
                yield gone.encode()
                return
            for rv, kind, obj in fresh:
                sent = rv
                yield (json.dumps({"type": kind, "object": obj}) + "\n").encode()
