"""Remote XPU overhead, bandwidth, compute ratio and fault detection (acceptance of the Remote XPU issue).

    python benchmarks/remote.py --link loopback --json remote-loopback.json
    python benchmarks/remote.py --link netns:2.5gbit --json remote-netns.json     (root: ip netns, tc tbf)

``loopback``: the client here, the lease worker on 127.0.0.1. ``netns:RATE``: two network namespaces made for
the run (flexai-bA, flexai-bB) joined by a veth pair shaped with ``tc tbf`` to RATE in both directions; the
worker runs in B, the measuring client in A; both are deleted afterwards. Every remote call goes over TLS 1.3.

Figures (JSON keys as the issue fixes them):
- link_gbps: plain TCP bulk throughput on the same link, in the client-to-worker direction, measured just
  before each throughput figure with the same number of bytes (the top-level figure is the one before 64 MiB);
  throughput[size] also carries that link_gbps and tls_stream_gbps, a bare stream of Python's ssl with the same
  bytes (the ceiling of any TLS transport written with it on this machine at that moment);
- rtt_us: median plain TCP round trip of one byte on the link;
- local_call_us / remote_4k_us: a call with a 4 KiB array in and out, as a Python call here and remotely;
- throughput: uploads of 1 MiB (8 pipelined) and 64 MiB arrays to a resident object, and link_fraction =
  gbps / link_gbps;
- compute_ratio: remote / local wall time of about 1 s of numpy work on resident state (median of 3);
- kill9_detect_s: from kill -9 of a worker during a call to the client's WorkerLostError;
- leaked_slices: lease workers of this run still alive after their clients are gone and the TTL has passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NS_A, NS_B = "flexai-bA", "flexai-bB"
ADDR_A, ADDR_B = "10.213.7.1", "10.213.7.2"
"""Addresses inside the two namespaces this benchmark makes (and deletes): nothing outside them is reached."""
SINK_PORT = 47011


# ------------------------------------------------------------------ workloads (created on the worker)
class Bench:
    def __init__(self, n: int = 768) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((n, n))
        self.b = rng.standard_normal((n, n)) / n

    def echo(self, x: np.ndarray) -> np.ndarray:
        return x

    def size(self, x: np.ndarray) -> int:
        return int(x.nbytes)

    def work(self, iterations: int) -> float:
        """Compute-heavy work on resident state: repeated matrix products (no data in or out)."""
        x = self.a
        for _ in range(iterations):
            x = np.tanh(x @ self.b)
        return float(x[0, 0])

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def bench(n: int = 768) -> Bench:
    return Bench(n)


# ------------------------------------------------------------------ helpers
def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50": round(ordered[len(ordered) // 2] * 1e6, 1),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1),
    }


def make_cert(folder: Path, host: str) -> tuple[str, str]:
    cert, key = folder / "worker.crt", folder / "worker.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days",
         "2", "-subj", "/CN=flexai-bench", "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out",
         str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def ns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def start_worker(folder: Path, host: str, cert: str, key: str, ns: str | None, ttl_s: float = 30.0) -> Any:
    from flexai.remote.auth import LeaseSpec, new_lease_id, new_secret

    folder.mkdir(parents=True, exist_ok=True)
    spec = LeaseSpec(lease=new_lease_id(), secret=new_secret(), tcp=f"{host}:0", tls_cert=cert, tls_key=key,
                     allow=["remote:bench"], ttl_s=ttl_s, stats=str(folder / "stats.json"))
    spec.save(folder / "lease.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "src")])}
    log = open(folder / "worker.log", "wb")  # noqa: SIM115  (the child holds it)
    command = [*ns_prefix(ns), sys.executable, "-m", "flexai.remote.worker", str(folder / "lease.json")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            stats = json.loads((folder / "stats.json").read_text())
            if stats.get("state") == "ready":
                return spec, process, stats["pid"], stats["tcp_port"]
        except (OSError, ValueError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start: {(folder / 'worker.log').read_text()[-2000:]}")
        time.sleep(0.02)


# ------------------------------------------------------------------ plain TCP: the link itself
def tcp_sink(host: str, port: int, cert: str | None = None, key: str | None = None) -> None:
    """Accepts connections; echoes 1-byte pings, swallows bulk data (run on the worker's side of the link). A
    connection that starts with b"t" is bulk data over TLS (the bare TLS stream, for comparison)."""
    server = socket.create_server((host, port), reuse_port=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_sink_one, args=(conn, cert, key), daemon=True).start()


def _sink_one(conn: socket.socket, cert: str | None, key: str | None) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"t" and cert and key:
            from flexai.remote.auth import server_context

            conn = server_context(cert, key).wrap_socket(conn, server_side=True)  # noqa: PLW2901
            mode = b"b"
        buffer = bytearray(1 << 20)
        if mode == b"p":
            while conn.recv(1):
                conn.sendall(b"p")
        else:  # bulk: an 8-byte length, then that many bytes; the answer is the count received
            want = int.from_bytes(_recv_exact(conn, 8), "big")
            total = 0
            while total < want and (n := conn.recv_into(buffer, min(len(buffer), want - total))):
                total += n
            conn.sendall(str(total).encode())


def _recv_exact(conn: Any, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := conn.recv(n - len(data))):
        data += chunk
    return data


def measure_rtt(host: str, port: int) -> float:
    """Median plain TCP round trip (us) of one byte to the sink."""
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"p")
        times = []
        for _ in range(2000):
            start = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(1)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure_stream(host: str, port: int, nbytes: int, ca: str | None = None) -> float:
    """Gbit/s of ``nbytes`` sent to the sink in the client's direction (as the uploads measured): plain TCP, or
    with ``ca`` a bare TLS stream (Python's ``ssl``, the same context as the client's) without any framing."""
    chunk = memoryview(bytearray(4 << 20))
    with socket.create_connection((host, port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(b"t" if ca else b"b")
        sock: Any = raw
        if ca:
            from flexai.remote.auth import client_context

            sock = client_context(ca).wrap_socket(raw, server_hostname=host)
        sent = 0
        start = time.perf_counter()
        sock.sendall(nbytes.to_bytes(8, "big"))
        while sent < nbytes:
            sock.sendall(chunk[: min(len(chunk), nbytes - sent)])
            sent += min(len(chunk), nbytes - sent)
        received = int(sock.recv(64))
        elapsed = time.perf_counter() - start
    return received * 8 / elapsed / 1e9


# ------------------------------------------------------------------ the client's measurements
def client_run(host: str, port: int, lease: str, token: str, ca: str, calls: int) -> dict[str, Any]:
    from flexai.remote import connect

    rtt_us = measure_rtt(host, SINK_PORT)
    session = connect(f"tls://{host}:{port}", lease, token, ca=ca)
    net = session.create("remote:bench")
    local = Bench()
    x4k = np.ones(1024, np.float32)
    for _ in range(200):
        net.call("echo", x4k)
    local_s, remote_s = [], []
    for _ in range(calls):
        start = time.perf_counter()
        local.echo(x4k.copy())  # a local call that hands back its own array, as the remote one does
        local_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        net.call("echo", x4k)
        remote_s.append(time.perf_counter() - start)
    throughput = {}
    links, tls_streams = [], []
    for label, nbytes, count, depth in (("1MiB", 1 << 20, 400, 8), ("64MiB", 64 << 20, 8, 2)):
        # The link just before, the same bytes in the same direction: plain TCP (the link) and a bare TLS
        # stream (what Python's ssl alone moves here: the ceiling of any TLS transport written with it).
        link_gbps = measure_stream(host, SINK_PORT, nbytes * count)
        links.append(link_gbps)
        tls_streams.append(measure_stream(host, SINK_PORT, nbytes * count, ca))
        data = np.ones(nbytes, np.uint8)
        net.call("size", data)
        start = time.perf_counter()
        inflight = []
        for _ in range(count):
            inflight.append(net.call_async("size", data))
            if len(inflight) >= depth:
                inflight.pop(0).result()
        for future in inflight:
            future.result()
        gbps = nbytes * count * 8 / (time.perf_counter() - start) / 1e9
        throughput[label] = {"gbps": round(gbps, 3), "link_fraction": round(gbps / link_gbps, 3),
                             "link_gbps": round(link_gbps, 3), "tls_stream_gbps": round(tls_streams[-1], 3)}
    iterations = 1
    while True:  # about 1 s of work
        start = time.perf_counter()
        local.work(iterations)
        if time.perf_counter() - start > 0.25:
            iterations = max(1, int(iterations / (time.perf_counter() - start)))
            break
        iterations *= 2
    local_runs, remote_runs = [], []
    for _ in range(3):
        start = time.perf_counter()
        local.work(iterations)
        local_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        net.call("work", iterations)
        remote_runs.append(time.perf_counter() - start)
    session.close()
    return {
        "rtt_us": round(rtt_us, 1),
        "link_gbps": round(links[-1], 3),
        "local_call_us": percentiles(local_s),
        "remote_4k_us": percentiles(remote_s),
        "throughput": throughput,
        "compute_ratio": round(statistics.median(remote_runs) / statistics.median(local_runs), 3),
        "compute_s": round(statistics.median(local_runs), 3),
    }


def kill9_detect(host: str, port: int, lease: str, token: str, ca: str, pid: int) -> float:
    from flexai.remote import WorkerLostError, connect

    session = connect(f"tls://{host}:{port}", lease, token, ca=ca)
    future = session.create("remote:bench").call_async("sleep", 30.0)
    time.sleep(0.2)
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    try:
        future.result(10)
    except WorkerLostError:
        pass
    detect_s = time.perf_counter() - start
    session.close()
    return detect_s


# ------------------------------------------------------------------ links
def netns_up(rate: str) -> None:
    netns_down()
    for cmd in (
        f"ip netns add {NS_A}",
        f"ip netns add {NS_B}",
        f"ip link add fxb-a netns {NS_A} type veth peer name fxb-b netns {NS_B}",
        f"ip -n {NS_A} addr add {ADDR_A}/30 dev fxb-a",
        f"ip -n {NS_B} addr add {ADDR_B}/30 dev fxb-b",
        f"ip -n {NS_A} link set lo up",
        f"ip -n {NS_B} link set lo up",
        f"ip -n {NS_A} link set fxb-a up",
        f"ip -n {NS_B} link set fxb-b up",
        f"ip netns exec {NS_A} tc qdisc add dev fxb-a root tbf rate {rate} burst 256kb latency 50ms",
        f"ip netns exec {NS_B} tc qdisc add dev fxb-b root tbf rate {rate} burst 256kb latency 50ms",
    ):
        subprocess.run(cmd.split(), check=True, capture_output=True)


def netns_down() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", default="loopback", help="loopback or netns:RATE (like netns:2.5gbit)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--calls", type=int, default=3000, help="4 KiB calls timed")
    parser.add_argument("--client", nargs=5, metavar=("HOST", "PORT", "LEASE", "TOKEN", "CA"), help=argparse.SUPPRESS)
    parser.add_argument("--sink", nargs=3, metavar=("HOST", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        tcp_sink(args.sink[0], SINK_PORT, args.sink[1], args.sink[2])
        return
    if args.client:
        host, port, lease, token, ca = args.client
        print(json.dumps(client_run(host, int(port), lease, token, ca, args.calls)))
        return
    from flexai.remote.auth import make_token

    if args.link == "loopback":
        host, ns_worker, ns_client = "127.0.0.1", None, None
    elif args.link.startswith("netns:"):
        host, ns_worker, ns_client = ADDR_B, NS_B, NS_A
        netns_up(args.link.split(":", 1)[1])
    else:
        parser.error(f"--link={args.link!r} is not allowed: loopback or netns:RATE (like netns:2.5gbit)")
    here = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "src")])}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="flexai-bench-") as tmp:
            folder = Path(tmp)
            cert, key = make_cert(folder, host)
            sink = subprocess.Popen([*ns_prefix(ns_worker), *here, "--sink", host, cert, key], env=env)
            processes.append(sink)
            time.sleep(0.5)
            spec, worker, _, port = start_worker(folder / "main", host, cert, key, ns_worker, ttl_s=2.0)
            processes.append(worker)
            token = make_token(spec.secret, spec.lease, spec.epoch)
            run = subprocess.run([*ns_prefix(ns_client), *here, "--calls", str(args.calls), "--client", host, str(port),
                                  spec.lease, token, cert], env=env, capture_output=True, text=True, timeout=600)
            if run.returncode:
                raise SystemExit(f"the client failed: {run.stderr[-3000:]}")
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            # kill -9 of a second worker during a call, seen from here (the worker's side of the link for
            # netns: the reset crosses no shaping, which is what the client sees when its peer's process dies).
            spec2, worker2, pid2, port2 = start_worker(folder / "killed", host, cert, key, ns_worker, ttl_s=1.0)
            processes.append(worker2)
            token2 = make_token(spec2.secret, spec2.lease, spec2.epoch)
            detect = subprocess.run([*ns_prefix(ns_client), sys.executable, "-c",
                                     "import sys; sys.path[:0] = sys.argv[1:3]; import remote; "
                                     "print(remote.kill9_detect(sys.argv[3], int(sys.argv[4]), sys.argv[5], "
                                     "sys.argv[6], sys.argv[7], int(sys.argv[8])))",
                                     str(HERE), str(REPO / "src"), host, str(port2), spec2.lease, token2, cert,
                                     str(pid2)], env=env, capture_output=True, text=True, timeout=60)
            if detect.returncode:
                raise SystemExit(f"the kill -9 check failed: {detect.stderr[-3000:]}")
            kill9_s = float(detect.stdout.strip().splitlines()[-1])
            # The main worker's client is gone: its lease expires after the TTL and the worker ends itself.
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1.0)
            leaked = sum(1 for p in (worker, worker2) if p.poll() is None)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if args.link.startswith("netns:"):
            netns_down()
    result = {
        "link": args.link,
        "link_gbps": figures["link_gbps"],
        "rtt_us": figures["rtt_us"],
        "local_call_us": figures["local_call_us"],
        "remote_4k_us": figures["remote_4k_us"],
        "throughput": figures["throughput"],
        "compute_ratio": figures["compute_ratio"],
        "kill9_detect_s": round(kill9_s, 3),
        "leaked_slices": leaked,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
