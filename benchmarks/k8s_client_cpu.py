"""The Kubernetes client's own cost: lightkube against flexai's KubeClient, side by side in one run.

    python benchmarks/k8s_client_cpu.py [--pods 10000] [--binds 300] [--rounds 3] [--list-rounds 1] [--json PATH]

The fake API server of the tests runs in its own process (spawned), so the CPU seconds measured here
(``time.process_time()`` of this process, which runs no server thread) are the client's alone. The machine's
load drifts (a shared VM): the clients take turns, ROUNDS times, and the best round is reported.

1. **Bind**: CPU seconds per ``pods/binding`` POST (one pending pod each, kept-alive connection), with
   ``KubeClient.bind_pod`` (its http.client fast path), the same POST through KubeClient's httpx path, and
   lightkube's ``Client.create(Pod.Binding(...), name, namespace=...)``.
2. **List**: CPU seconds, then (one more list, traced: tracing slows it) peak Python memory (tracemalloc) to
   list every pod, 500 a page, and hold what a scheduler's cache would hold: KubeClient.list with the
   ``slim_pod`` transform (the Informer's), lightkube's typed ``Pod`` models, lightkube's models turned into
   ``slim_pod`` records, and KubeClient.list's raw dicts for scale. "held" is what is still allocated while
   the result is kept; "peak" the most allocated during the list. The server encodes the lists with
   json.dumps (``FastListApiServer``), so the run stays short.

The pods look like a real API server's (labels, owner reference, env, mounts, tolerations, status with
conditions and container statuses): a third are flexai pods bound to a GPU slice, the rest CPU-only.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fake_apiserver import FakeApiServer  # noqa: E402
from tests.k8s_objects import pod  # noqa: E402

from flexai.k8s import names  # noqa: E402
from flexai.k8s.apiclient import KubeClient  # noqa: E402
from flexai.k8s.cluster import slim_pod  # noqa: E402

PAGE = 500


def realistic_pod(i: int) -> dict:
    """A bound pod as a real API server serves it (about 2.5 kB of JSON)."""
    flexai = i % 3 == 0
    obj = pod(f"pod-{i}", share=500 if flexai else 1000, node_name=f"node-{i % 2000}", namespace=f"ns-{i % 40}")
    if not flexai:
        obj["spec"]["containers"][0]["resources"]["limits"] = {"cpu": "2", "memory": "4Gi"}
        obj["spec"]["schedulerName"] = "default-scheduler"
    else:
        node_name, device = f"node-{i % 2000}", i % 8
        placement = names.Placement(node_name, (names.SliceGrant(device, f"GPU-{node_name}-{device}", 500, 0),))
        obj["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] = placement.to_json()
    meta = obj["metadata"]
    meta.update(
        {
            "labels": {"app": f"app-{i % 300}", "pod-template-hash": "7d9f8b6c5d", "team": f"team-{i % 12}"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"app-{i % 300}-7d9f8b6c5d",
                 "uid": f"6f1c2a3b-0000-4000-8000-{i:012d}", "controller": True, "blockOwnerDeletion": True}
            ],
            "creationTimestamp": "2026-01-05T10:00:00Z",
            "generateName": f"app-{i % 300}-7d9f8b6c5d-",
        }
    )  # fmt: skip
    container = obj["spec"]["containers"][0]
    container.update(
        {
            "env": [{"name": "MODE", "value": "serve"}, {"name": "LOG_LEVEL", "value": "info"}],
            "ports": [{"containerPort": 8080, "protocol": "TCP", "name": "http"}],
            "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                              "readOnly": True}],
            "terminationMessagePath": "/dev/termination-log",
            "imagePullPolicy": "IfNotPresent",
        }
    )  # fmt: skip
    obj["spec"].update(
        {
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
            ],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {
                "expirationSeconds": 3607, "path": "token"}}]}}],
        }
    )  # fmt: skip
    stamp = "2026-01-05T10:00:05Z"
    obj["status"] = {
        "phase": "Running",
        "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": stamp}
            for kind in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "hostIP": f"10.0.{i % 250}.{i % 200}",
        "podIP": f"10.244.{i % 250}.{i % 200}",
        "startTime": stamp,
        "containerStatuses": [
            {"name": "main", "ready": True, "restartCount": 0, "image": "busybox:latest",
             "imageID": "docker.io/library/busybox@sha256:" + "ab" * 32,
             "containerID": f"containerd://{i:064x}", "started": True,
             "state": {"running": {"startedAt": stamp}}}
        ],
        "qosClass": "Burstable",
    }  # fmt: skip
    return obj


class FastListApiServer(FakeApiServer):
    """The tests' fake API server, its GET /api/v1/pods (no selector, no watch) encoded with json.dumps:
    FastAPI's encoding of 20,000 pods takes the server longer than any client here takes to read them (only
    the clients' CPU is measured). Pages as the fake's: ``continue`` is "offset:resourceVersion"."""

    def _build(self) -> Any:
        from fastapi import Request
        from fastapi.responses import Response

        app = super()._build()

        @app.middleware("http")
        async def pods_list(request: Request, call_next: Any) -> Any:
            params = request.query_params
            if request.method != "GET" or request.url.path != "/api/v1/pods" or set(params) - {"limit", "continue"}:
                return await call_next(request)
            with self.lock:
                items = list(self.pods.values())
                offset, version = 0, str(self.rv)
                if params.get("continue"):
                    start, version = params["continue"].split(":", 1)
                    offset = int(start)
                limit = int(params.get("limit") or 0) or len(items)
                meta = {"resourceVersion": version}
                if offset + limit < len(items):
                    meta["continue"] = f"{offset + limit}:{version}"
                body = json.dumps({"kind": "List", "items": items[offset : offset + limit], "metadata": meta})
            return Response(body.encode(), media_type="application/json")

        return app


def serve_api(pods: int, pending: int, url_out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """The fake API server's process: PODS bound pods, PENDING pods waiting for a binding."""
    server = FastListApiServer()
    with server.lock:  # as add_pod, without a watch history (nothing watches here)
        for i in range(pods):
            obj = realistic_pod(i)
            obj["metadata"]["resourceVersion"] = str(server.rv)
            server.pods[f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"] = obj
    for i in range(pending):
        server.add_pod(pod(f"pending-{i}", namespace="bench"))
    server.start()
    url_out.put(server.url)
    threading.Event().wait()


def lightkube_client(url: str) -> Any:
    from lightkube import Client, KubeConfig
    from lightkube.config.models import Cluster, User

    # KubeConfig.from_server(url) would do, but lightkube 1.0.1's Client then asserts "Missing user".
    return Client(config=KubeConfig.from_one(cluster=Cluster(server=url), user=User()))


def timed(calls: int, call: Callable[[int], None], first: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call for CALLS calls, indices from FIRST."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(first, first + calls):
        call(i)
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def bind_benchmark(url: str, binds: int, warmup: int, rounds: int) -> list[dict]:
    """Each client binds its own pending pods: WARMUP, then ROUNDS rounds of BINDS // ROUNDS, the clients
    taking turns each round (the machine's load drifts); CPU per bind is the best round's (least disturbed)."""
    import msgspec
    from lightkube.models.core_v1 import ObjectReference
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod

    kube = KubeClient(url)
    light = lightkube_client(url)
    decode_errors = [0]
    per_client = warmup + binds

    def fast(i: int) -> None:
        name = f"pending-{i}"
        kube.bind_pod("bench", name, f"uid-{name}", "node-1", {"a": "b"})

    def via_httpx(i: int) -> None:
        name = f"pending-{per_client + i}"
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": "bench", "uid": f"uid-{name}", "annotations": {"a": "b"}},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
        }
        kube._call("POST", f"/api/v1/namespaces/bench/pods/{name}/binding", json=body)

    def via_lightkube(i: int) -> None:
        name = f"pending-{2 * per_client + i}"
        binding = Pod.Binding(
            metadata=ObjectMeta(name=name, namespace="bench", uid=f"uid-{name}", annotations={"a": "b"}),
            target=ObjectReference(apiVersion="v1", kind="Node", name="node-1"),
        )
        try:
            light.create(binding, name, namespace="bench")
        except msgspec.ValidationError:
            # The API server answers a binding with a Status, which lightkube 1.0.1 decodes as a Binding and
            # refuses ("missing required field `target`"), after the pod is bound.
            decode_errors[0] += 1

    clients = (
        ("KubeClient.bind_pod (http.client)", fast),
        ("KubeClient POST via httpx", via_httpx),
        ("lightkube create(Pod.Binding)", via_lightkube),
    )
    for _, call in clients:
        timed(warmup, call, 0)  # connection, imports, caches
    per_round = binds // rounds
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in clients}
    for r in range(rounds):
        for label, call in clients:
            samples[label].append(timed(per_round, call, warmup + r * per_round))
    kube.close()
    rows = []
    for label, _ in clients:
        cpu = [c for c, _ in samples[label]]
        wall = [w for _, w in samples[label]]
        rows.append(
            {
                "client": label,
                "cpu_ms_per_bind": min(cpu) * 1000,
                "cpu_ms_per_bind_rounds": [round(c * 1000, 4) for c in cpu],
                "wall_ms_per_bind": sum(wall) / len(wall) * 1000,
            }
        )
    rows[-1]["decode_errors"] = decode_errors[0]
    return rows


def list_benchmark(url: str, pods: int, rounds: int) -> list[dict]:
    """PODS: how many the server holds (the bound ones and the pending ones of the bind step). CPU: the best
    of ROUNDS lists per variant, the variants taking turns; memory: one more list each, traced."""
    from lightkube import ALL_NS
    from lightkube.resources.core_v1 import Pod

    kube = KubeClient(url)
    light = lightkube_client(url)

    variants: list[tuple[str, Callable[[], list]]] = [
        ("KubeClient.list + slim_pod", lambda: kube.list("/api/v1/pods", PAGE, slim_pod)[0]),
        ("lightkube list, typed Pod models", lambda: list(light.list(Pod, namespace=ALL_NS, chunk_size=PAGE))),
        (
            "lightkube list -> to_dict -> slim_pod",
            lambda: [slim_pod(p.to_dict()) for p in light.list(Pod, namespace=ALL_NS, chunk_size=PAGE)],
        ),
        ("KubeClient.list, raw dicts (reference)", lambda: kube.list("/api/v1/pods", PAGE)[0]),
    ]
    # The clients' connections, imports and classes warm up.
    slim_pod(kube._call("GET", "/api/v1/pods", params={"limit": "1"})["items"][0])
    next(iter(light.list(Pod, namespace=ALL_NS, chunk_size=1)))
    cpu: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in variants}
    for _ in range(rounds):
        for label, run in variants:
            gc.collect()
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            items = run()
            cpu[label].append((time.process_time() - start_cpu, time.perf_counter() - start_wall))
            assert len(items) == pods, (label, len(items))
            del items
    rows = []
    for label, run in variants:
        traced = time.perf_counter()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        items = run()
        peak = tracemalloc.get_traced_memory()[1]
        gc.collect()  # the garbage of the last pages is not held
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del items
        best = min(cpu[label])
        rows.append(
            {
                "client": label,
                "cpu_s": best[0],
                "cpu_s_rounds": [round(c, 3) for c, _ in cpu[label]],
                "wall_s": best[1],
                "peak_mib": (peak - base) / 2**20,
                "held_mib": (held - base) / 2**20,
                "traced_wall_s": time.perf_counter() - traced,
            }
        )
    kube.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10_000, help="bound pods in the server (all are listed)")
    parser.add_argument("--binds", type=int, default=300, help="binds timed per client")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of binds per client")
    parser.add_argument("--list-rounds", type=int, default=1, help="rounds of lists per client (CPU: the best)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    warmup = 20
    pending = 3 * (warmup + args.binds)
    started = time.perf_counter()
    urls: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    server = multiprocessing.get_context("spawn").Process(
        target=serve_api, args=(args.pods, pending, urls), daemon=True
    )
    server.start()
    try:
        url = ""
        while not url:  # the server fills its pods first (seconds); it may also die doing so
            if not server.is_alive():
                raise SystemExit("the fake API server's process died")
            try:
                url = urls.get(timeout=1)
            except queue.Empty:
                pass
        phases = {"server_s": time.perf_counter() - started}
        binds = bind_benchmark(url, args.binds, warmup, args.rounds)
        phases["bind_s"] = time.perf_counter() - started - sum(phases.values())
        lists = list_benchmark(url, args.pods + pending, args.list_rounds)
        phases["list_s"] = time.perf_counter() - started - sum(phases.values())
    finally:
        server.terminate()
        server.join(timeout=10)
    from importlib.metadata import version

    versions = {"lightkube": version("lightkube"), "httpx": version("httpx"), "httpx2": version("httpx2")}
    print(f"bind: {args.binds} pods/binding POSTs per client after {warmup} warm-up; client CPU only, the best")
    print(f"of {args.rounds} rounds (wall: the mean, with the fake server's own time)")
    print(f"  {'client':<40} {'CPU ms/bind':>12} {'wall ms/bind':>13}")
    for row in binds:
        print(f"  {row['client']:<40} {row['cpu_ms_per_bind']:>12.3f} {row['wall_ms_per_bind']:>13.3f}")
    print(f"list: {args.pods + pending} pods, {PAGE} a page; CPU the best of {args.list_rounds}; peak and held:")
    print("tracemalloc (Python allocations), held = still allocated while the result is kept")
    print(f"  {'client':<40} {'CPU s':>7} {'wall s':>7} {'peak MiB':>9} {'held MiB':>9}")
    for row in lists:
        print(
            f"  {row['client']:<40} {row['cpu_s']:>7.2f} {row['wall_s']:>7.2f} "
            f"{row['peak_mib']:>9.1f} {row['held_mib']:>9.1f}"
        )
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine_cpus": os.cpu_count(),
        "versions": versions,
        "pods_listed": args.pods + pending,
        "binds": args.binds,
        "rounds": args.rounds,
        "list_rounds": args.list_rounds,
        "bind": binds,
        "list": lists,
        "run_s": round(time.perf_counter() - started, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
    }
    print(json.dumps({"machine_cpus": os.cpu_count(), "run_s": result["run_s"], **result["phases_s"], **versions}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
