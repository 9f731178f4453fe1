"""Scheduler extender at cluster scale: latency, sustained decisions, node updates, memory.

    python benchmarks/extender.py [--nodes 5000] [--gpus 8] [--pods 200] [--decisions 2000] [--memory-pods 150000]

The extender sees the cluster as kube-scheduler configured with ``nodeCacheCapable: true`` shows it: node
names only in each call, the nodes themselves from the extender's own view. The view is filled directly (as
its informers would fill it) with NODES nodes x GPUS devices whose agents' heartbeats are all at the same
instant, and the view's clock stands still at that instant (a fake clock: filling 5,000 nodes takes longer
than the agents' 120 s timeout, which made the old benchmark's nodes expire half way). Half of the devices'
share is held by bound pods.

1. **Latency**: for PODS pods, kube-scheduler's two calls (``/filter`` then ``/prioritize``, all NODES names)
   over HTTP on loopback to the extender in its own process, median and p99 (and the same in-process).
2. **Sustained decisions**: a kube-scheduler stand-in decides DECISIONS pods one after the other (filter,
   prioritize, best score) and binds each in the background (16 binds at a time, as kube-scheduler's binding
   goroutines), the extender binding through the fake API server of the tests (its own process). Reported:
   decisions per second end to end on this machine (three processes share its cores) and the extender's own
   CPU seconds per decision, whose inverse is what one extender process sustains on one core.
3. **Node update**: one node's inventory changes (a device goes unhealthy); the time to update the view,
   against building it anew.
4. **Memory**: the extender's resident memory with NODES nodes and MEMORY_PODS pods (a third with flexai
   slices, the rest CPU-only), in a fresh process, as its informers would leave it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fake_apiserver import FakeApiServer  # noqa: E402
from tests.k8s_objects import node, pod  # noqa: E402

from flexai.k8s import names  # noqa: E402
from flexai.k8s.apiclient import KubeClient  # noqa: E402
from flexai.k8s.cluster import KubeCluster, slim_pod  # noqa: E402
from flexai.k8s.extender import Extender, create_extender_app  # noqa: E402

SHARES = (100, 200, 300, 500, 700, 1000)
T0 = 1_800_000_000.0
"""The instant of every heartbeat, and the view's (fake) clock."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names(nodes: int) -> list[str]:
    return [f"node-{i:05d}" for i in range(nodes)]


def bound_pod(name: str, node_name: str, device: int, share: int, memory_mib: int = 0) -> dict:
    the_pod = pod(name, 1, share, memory_mib, node_name=node_name)
    grant = names.Placement(node_name, (names.SliceGrant(device, f"GPU-{node_name}-{device}", share, memory_mib),))
    the_pod["metadata"]["annotations"][names.ANNOTATION_PLACEMENT] = grant.to_json()
    return the_pod


def filled_view(nodes: int, gpus: int, seed: int = 1) -> KubeCluster:
    """NODES x GPUS, about half of the share held by bound pods of mixed shares; the clock stands still."""
    cluster = KubeCluster(clock=lambda: T0)
    for name in node_names(nodes):
        cluster.upsert_node(node(name, gpus, heartbeat=T0))
    rng = random.Random(seed)
    k = 0
    for name in node_names(nodes):
        for device in range(gpus):
            target = rng.choice((0, 0, 300, 500, 700, 1000, 1000))
            used = 0
            while used < target:
                share = min(rng.choice(SHARES), target - used)
                share = max(100, share - share % 100)
                cluster.upsert_pod(bound_pod(f"fill-{k}", name, device, share, 4096))
                used += share
                k += 1
    assert cluster.state is not None
    return cluster


def serve_extender(nodes: int, gpus: int, api_url: str, port: int, pending: list[dict]) -> None:
    """The extender process: its view, the pods waiting to be scheduled, HTTP on loopback."""
    cluster = filled_view(nodes, gpus)
    for the_pod in pending:
        cluster.upsert_pod(the_pod)
    extender = Extender(cluster, KubeClient(api_url) if api_url else None)
    extender.scheduler()  # the policy's tables, as after the first call
    uvicorn.run(create_extender_app(extender), host="127.0.0.1", port=port, log_level="warning")


def serve_api(port_out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    server = FakeApiServer()
    server.start()
    port_out.put(server.url)
    threading.Event().wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(target, *args) -> multiprocessing.Process:  # noqa: ANN001
    # spawn, not fork: a forked child would share the parent's heap copy-on-write and pay for every page it touches
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class RawHttp:
    """A keep-alive HTTP/1.1 client that does nothing but send and read (kube-scheduler's Go client costs little;
    httpx's own parsing would be counted as the extender's otherwise)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: extender\r\nContent-Type: application/json\r\n"
        self.sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(1 << 20)
        header, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(rest) < length:
            rest += self.sock.recv(1 << 20)
        return rest

    def close(self) -> None:
        self.sock.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(nodes: int, gpus: int, pods: int) -> None:
    everyone = node_names(nodes)
    port = free_port()
    server = start(serve_extender, nodes, gpus, "", port, [])
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        remote, with_httpx = [], []
        raw = RawHttp(port)
        for k, share in enumerate(SHARES):  # one pod of each shape first: the policy's score cache fills
            warm = {"pod": pod(f"w{k}", 1, share), "nodenames": everyone}
            raw.post("/prioritize", json.dumps(warm).encode())
        for k in range(pods):
            # Each round trip timed from the request's first byte sent to the answer's last byte read; the
            # client's own JSON work (kube-scheduler's, in Go) is left out.
            the_pod = pod(f"h{k}", 1, SHARES[k % len(SHARES)])
            request = json.dumps({"pod": the_pod, "nodenames": everyone}).encode()
            began = time.perf_counter()
            answer = raw.post("/filter", request)
            filtered = time.perf_counter() - began
            request = json.dumps({"pod": the_pod, "nodenames": json.loads(answer)["NodeNames"]}).encode()
            began = time.perf_counter()
            raw.post("/prioritize", request)
            remote.append(filtered + time.perf_counter() - began)
        raw.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for k in range(pods):
                body = {"pod": pod(f"x{k}", 1, SHARES[k % len(SHARES)]), "nodenames": everyone}
                began = time.perf_counter()
                passed = client.post("/filter", json=body).json()["NodeNames"]
                client.post("/prioritize", json={**body, "nodenames": passed}).json()
                with_httpx.append(time.perf_counter() - began)
            handled = client.get("/metrics").text
    finally:
        server.kill()
    # The benchmark's own client in this process: built after, so that its heap does not slow the client down.
    start_build = time.perf_counter()
    cluster = filled_view(nodes, gpus)
    built = time.perf_counter() - start_build
    extender = Extender(cluster, assume_ttl_s=0)  # no binds follow here: nothing to hold
    local = []
    for k, share in enumerate(SHARES):
        extender.prioritize({"pod": pod(f"w{k}", 1, share), "nodenames": everyone})
    for k in range(pods):
        body = {"pod": pod(f"q{k}", 1, SHARES[k % len(SHARES)]), "nodenames": everyone}
        began = time.perf_counter()
        passed = extender.filter(body)["NodeNames"]
        extender.prioritize({**body, "nodenames": passed})
        local.append(time.perf_counter() - began)
    print(f"view of {nodes} nodes x {gpus} GPUs filled to half in {built:.1f} s", flush=True)
    runs = (("in-process", local), ("HTTP round trips", remote), ("HTTP, httpx client, its JSON included", with_httpx))
    for label, samples in runs:
        print(
            f"filter + prioritize over {nodes} nodes ({label}): median {statistics.median(samples) * 1000:.1f} ms, "
            f"p99 {percentile(samples, 0.99) * 1000:.1f} ms ({pods} pods)",
            flush=True,
        )
    print(f"  time inside the extender's handlers, mean per call: {handler_means(handled)}", flush=True)


def handler_means(metrics: str) -> str:
    """Mean time per call of each verb, from the extender's flexai_decision_latency_seconds histogram."""
    sums = dict(re.findall(r'flexai_decision_latency_seconds_sum\{verb="(\w+)"\} ([0-9.e+-]+)', metrics))
    counts = dict(re.findall(r'flexai_decision_latency_seconds_count\{verb="(\w+)"\} ([0-9.e+-]+)', metrics))
    return ", ".join(
        f"{v} {float(sums[v]) / float(counts[v]) * 1000:.1f} ms" for v in sorted(sums) if float(counts.get(v, 0))
    )


def sustained(nodes: int, gpus: int, decisions: int) -> None:
    everyone = node_names(nodes)
    pending = [pod(f"s{k}", 1, SHARES[k % len(SHARES)], 2048) for k in range(decisions)]
    for k, the_pod in enumerate(pending):  # as kube-scheduler sends them: from its cache, with a version
        the_pod["metadata"]["resourceVersion"] = str(1000 + k)
    urls: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    api = start(serve_api, urls)
    api_url = urls.get(timeout=60)
    with httpx.Client(base_url=api_url) as client:
        for the_pod in pending:
            client.post("/api/v1/namespaces/default/pods", json=the_pod).raise_for_status()
    port = free_port()
    extender = start(serve_extender, nodes, gpus, api_url, port, pending)
    refused = 0
    lock = threading.Lock()
    local = threading.local()
    names_json = json.dumps(everyone).encode()

    def bind(args: bytes) -> None:
        nonlocal refused
        if not hasattr(local, "client"):
            local.client = RawHttp(port)
        if json.loads(local.client.post("/bind", args))["Error"]:
            with lock:
                refused += 1

    def decide(raw: RawHttp, pod_json: bytes) -> str | None:
        """kube-scheduler's cycle for one pod, its JSON work done on bytes (as cheap as Go's would be)."""
        answer = raw.post("/filter", b'{"pod":' + pod_json + b',"nodes":null,"nodenames":' + names_json + b"}")
        start = answer.find(b'"NodeNames":[') + len(b'"NodeNames":')
        passed = answer[start : answer.find(b"]", start) + 1]
        if passed == b"[]":
            return None
        scores = raw.post("/prioritize", b'{"pod":' + pod_json + b',"nodes":null,"nodenames":' + passed + b"}")
        top = scores.find(b'"Score":10}')
        if top < 0:
            return max(json.loads(scores), key=lambda s: s["Score"])["Host"]
        host = scores.rfind(b'"Host":', 0, top) + len(b'"Host":')
        return json.loads(scores[host : scores.find(b",", host)])

    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        assert extender.pid is not None
        encoded = [json.dumps(p).encode() for p in pending]
        raw = RawHttp(port)
        with ThreadPoolExecutor(16) as pool:
            cpu_before, began = cpu_seconds(extender.pid), time.perf_counter()
            for the_pod, pod_json in zip(pending, encoded, strict=True):
                best = decide(raw, pod_json)
                if best is None:
                    continue
                meta = the_pod["metadata"]
                args = {"podName": meta["name"], "podNamespace": "default", "podUID": meta["uid"], "node": best}
                pool.submit(bind, json.dumps(args).encode())
            pool.shutdown(wait=True)
            elapsed = time.perf_counter() - began
            cpu = cpu_seconds(extender.pid) - cpu_before
        raw.close()
        handled = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    finally:
        extender.kill()
        api.kill()
    print(
        f"sustained over {nodes} nodes: {decisions} decisions (filter + prioritize + bind) in {elapsed:.1f} s = "
        f"{decisions / elapsed:.0f}/s end to end on this machine; extender CPU {cpu / decisions * 1000:.2f} ms per "
        f"decision = {decisions / cpu:.0f} decisions/s on one core; refused binds {refused}/{decisions}",
        flush=True,
    )
    print(f"  time inside the extender's handlers, mean per call: {handler_means(handled)}", flush=True)


def node_update(nodes: int, gpus: int) -> None:
    cluster = filled_view(nodes, gpus)
    extender = Extender(cluster)
    extender.scheduler()
    name = node_names(nodes)[nodes // 2]
    samples = []
    for k in range(20):
        changed = node(name, gpus, heartbeat=T0, healthy=k % 2 == 0)  # all devices flip health
        began = time.perf_counter()
        cluster.upsert_node(changed)
        extender.scheduler()  # the policy re-reads its per-node tables
        samples.append(time.perf_counter() - began)
    began = time.perf_counter()
    rebuilt = KubeCluster(clock=lambda: T0)
    for entry_name in node_names(nodes):
        rebuilt.upsert_node(node(entry_name, gpus, heartbeat=T0))
    for record in cluster.pods.values():
        rebuilt.upsert_pod(record)
    assert rebuilt.state is not None
    build = time.perf_counter() - began
    print(
        f"one node's inventory changes at {nodes} nodes: median {statistics.median(samples) * 1000:.2f} ms, "
        f"max {max(samples) * 1000:.2f} ms (rows rewritten in place, {cluster.rebuilds} rebuilds); "
        f"building the view anew: {build:.2f} s",
        flush=True,
    )


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or at its peak (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_child(nodes: int, gpus: int, total: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import gc

    Extender(KubeCluster())  # the libraries an extender loads
    base = rss_mib()
    cluster = KubeCluster(clock=lambda: T0)
    for name in node_names(nodes):
        cluster.upsert_node(node(name, gpus, heartbeat=T0))
    everyone = node_names(nodes)

    def records(seed: int) -> list:
        rng = random.Random(seed)
        made = []
        for k in range(total):
            where = everyone[k % nodes]
            if k % 3 == 0:
                the_pod = bound_pod(f"m{k}", where, rng.randrange(gpus), 100, 1024)
            else:
                the_pod = pod(f"m{k}", 0, cpu="100m", mem="128Mi", node_name=where)
                the_pod["spec"]["containers"][0]["resources"]["limits"] = {}
            the_pod["metadata"]["uid"] = f"{k:08x}-7c1e-4b7a-9d7e-{k:012x}"  # uids as long as real ones
            made.append(slim_pod(the_pod))  # as the informer's transform hands each page over
        return made

    cluster.replace_pods(records(3))
    extender = Extender(cluster)
    extender.scheduler()
    gc.collect()
    steady = rss_mib()
    cluster.replace_pods(records(4))  # a re-list (410 Gone): the new records arrive beside the old ones
    gc.collect()
    out.put((base, steady, rss_mib("VmHWM"), len(cluster.pods)))


def memory(nodes: int, gpus: int, total: int) -> None:
    results: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    child = start(memory_child, nodes, gpus, total, results)
    base, rss, peak, count = results.get(timeout=1800)
    child.join(timeout=60)
    print(
        f"memory: {rss:.0f} MiB resident with {nodes} nodes x {gpus} GPUs and {count} pods "
        f"({rss - base:.0f} MiB over the {base:.0f} MiB of the loaded libraries); peak {peak:.0f} MiB "
        "through a re-list of every pod",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--pods", type=int, default=200, help="pods timed for latency")
    parser.add_argument("--decisions", type=int, default=2000, help="pods decided and bound in the sustained run")
    parser.add_argument("--memory-pods", type=int, default=150_000)
    parser.add_argument("--only", choices=("latency", "sustained", "node-update", "memory"), default=None)
    args = parser.parse_args()
    steps = {
        "latency": lambda: latency(args.nodes, args.gpus, args.pods),
        "sustained": lambda: sustained(args.nodes, args.gpus, args.decisions),
        "node-update": lambda: node_update(args.nodes, args.gpus),
        "memory": lambda: memory(args.nodes, args.gpus, args.memory_pods),
    }
    for name, step in steps.items():
        if args.only in (None, name):
            step()
    print(json.dumps({"machine_cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
