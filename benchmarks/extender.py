"""Scheduler extender: decision latency over 1,000 nodes and bind throughput (Kubernetes issue, acceptance 2).

    python benchmarks/extender.py [--nodes 1000] [--pods 200] [--binds 300]

1. A cluster of NODES nodes x 8 GPUs (inventory annotations as the agents publish them), half of its share
   already placed; for PODS pods, kube-scheduler's two calls (`/filter` then `/prioritize` with all node
   names) over real HTTP on loopback, timed per pod (median and p99), and the same in-process.
2. Bind throughput against the fake API server of the tests (loopback HTTP): placement annotation PATCH
   plus pods/binding POST per pod, sequential.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fake_apiserver import FakeApiServer  # noqa: E402
from tests.k8s_objects import node, pod  # noqa: E402

from flexai.k8s.apiclient import KubeClient  # noqa: E402
from flexai.k8s.cluster import KubeCluster  # noqa: E402
from flexai.k8s.extender import Extender, create_extender_app  # noqa: E402

SHARES = (100, 200, 300, 500, 700, 1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filled_cluster(nodes: int) -> KubeCluster:
    cluster = KubeCluster()
    for i in range(nodes):
        cluster.upsert_node(node(f"node-{i:04d}", 8))
    extender = Extender(cluster)
    state = extender.scheduler().state  # type: ignore[union-attr]
    # Half the share placed, through the engine's own ledger.
    n = 0
    while state.allocated_share_milli < state.total_share_milli / 2:
        request_pod = pod(f"fill-{n}", 1, SHARES[n % len(SHARES)])
        result = extender.filter({"Pod": request_pod, "NodeNames": [f"node-{i:04d}" for i in range(nodes)]})
        if not result["NodeNames"]:
            break
        sched = extender.scheduler()
        from flexai.k8s.cluster import pod_request

        sched.schedule(pod_request(request_pod), f"fill-{n}")  # type: ignore[union-attr, arg-type]
        n += 1
    return cluster


def latency(nodes: int, pods: int) -> None:
    cluster = filled_cluster(nodes)
    extender = Extender(cluster)
    names = [f"node-{i:04d}" for i in range(nodes)]
    samples_local = []
    for k in range(pods):
        body = {"Pod": pod(f"q{k}", 1, SHARES[k % len(SHARES)]), "NodeNames": names}
        start = time.perf_counter()
        passed = extender.filter(body)["NodeNames"]
        extender.prioritize({**body, "NodeNames": passed})
        samples_local.append(time.perf_counter() - start)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_extender_app(extender), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    samples_http = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for k in range(pods):
            body = {"Pod": pod(f"h{k}", 1, SHARES[k % len(SHARES)]), "NodeNames": names}
            start = time.perf_counter()
            passed = client.post("/filter", json=body).json()["NodeNames"]
            client.post("/prioritize", json={**body, "NodeNames": passed})
            samples_http.append(time.perf_counter() - start)
    server.should_exit = True
    for label, samples in (("in-process", samples_local), ("HTTP", samples_http)):
        samples.sort()
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        print(
            f"filter + prioritize over {nodes} nodes ({label}): median {statistics.median(samples) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms ({pods} pods)",
            flush=True,
        )


def bind_throughput(binds: int) -> None:
    server = FakeApiServer()
    server.start()
    for i in range(max(4, binds // 40 + 1)):
        server.add_node(node(f"node-{i:04d}", 8))
    for k in range(binds):
        server.add_pod(pod(f"b{k}", 1, 200))
    cluster = KubeCluster()
    for n in server.nodes.values():
        cluster.upsert_node(n)
    for p in server.pods.values():
        cluster.upsert_pod(p)
    extender = Extender(cluster, KubeClient(server.url))
    names = sorted(server.nodes)
    start = time.perf_counter()
    for k in range(binds):
        the_pod = server.pods[f"default/b{k}"]
        chosen = extender.filter({"Pod": the_pod, "NodeNames": names})["NodeNames"][0]
        result = extender.bind({"PodName": f"b{k}", "PodNamespace": "default", "PodUID": f"uid-b{k}", "Node": chosen})
        assert result == {"Error": ""}, result
    elapsed = time.perf_counter() - start
    server.stop()
    print(f"bind against the fake API server: {binds / elapsed:.0f} pods/s ({binds} pods, filter + annotate + bind)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--binds", type=int, default=300)
    args = parser.parse_args()
    latency(args.nodes, args.pods)
    bind_throughput(args.binds)


if __name__ == "__main__":
    main()
