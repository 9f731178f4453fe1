"""Shared pieces of the remote XPU tests: workloads the worker may create (this module is on their allow-list),
certificates, and workers started as real processes (killed by the fixtures, never left behind)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flexai.remote.auth import LeaseSpec, make_token, new_lease_id, new_secret
from flexai.remote.worker import Worker

REPO = Path(__file__).resolve().parents[1]
ALLOW = ["tests.test_remote_support:*"]
OPENSSL = shutil.which("openssl")


# ---------------------------------------------------------------- workloads (created on the worker)
class Model:
    def __init__(self, scale: float = 1.0, weights: dict[str, np.ndarray] | None = None) -> None:
        self.scale = scale
        self.bias = None if weights is None else weights["bias"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x * self.scale
        return y if self.bias is None else y + self.bias

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) * 2

    def total(self, *values: np.ndarray) -> float:
        return float(sum(float(v.sum()) for v in values))

    def echo(self, value: Any) -> Any:
        return value

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def opaque(self) -> object:
        return object()

    def zeros(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, np.uint8)


def build(scale: float = 1.0, weights: dict[str, np.ndarray] | None = None) -> Model:
    return Model(scale, weights)


def torch_module() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())


# ---------------------------------------------------------------- certificates
def make_cert(folder: Path, name: str = "worker") -> tuple[str, str]:
    """A self-signed EC certificate for 127.0.0.1 and localhost (openssl, fast EC keys)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            str(OPENSSL), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if OPENSSL is None:
        pytest.skip("openssl is needed to make the test certificates")
    return make_cert(tmp_path_factory.mktemp("certs"))


# ---------------------------------------------------------------- workers
def spec_for(folder: Path, **overrides: Any) -> LeaseSpec:
    folder.mkdir(parents=True, exist_ok=True)
    spec = LeaseSpec(
        lease=new_lease_id(),
        secret=new_secret(),
        unix=str(folder / "w.sock"),
        allow=list(ALLOW),
        ttl_s=5.0,
        stats=str(folder / "stats.json"),
        connect_timeout_s=30.0,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def token_of(spec: LeaseSpec) -> str:
    return make_token(spec.secret, spec.lease, spec.epoch)


class WorkerProcess:
    def __init__(self, spec: LeaseSpec, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.spec, self.path, self.process = spec, path, process

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(Path(self.spec.stats or "").read_text())
        except (OSError, ValueError):
            return {}

    @property
    def tls_endpoint(self) -> str:
        return f"tls://127.0.0.1:{self.stats()['tcp_port']}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def start_worker(folder: Path, **overrides: Any) -> WorkerProcess:
    spec = spec_for(folder, **overrides)
    path = folder / "lease.json"
    spec.save(path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(folder / "worker.log", "wb")  # noqa: SIM115  (the child holds it)
    process = subprocess.Popen([sys.executable, "-m", "flexai.remote.worker", str(path)], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    log.close()
    worker = WorkerProcess(spec, path, process)
    deadline = time.monotonic() + 20
    while worker.stats().get("state") != "ready":
        if process.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise AssertionError(f"worker did not start: {(folder / 'worker.log').read_text()[-2000:]}")
        time.sleep(0.02)
    return worker


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    """``workers(**spec)`` starts a worker process; every one is killed at the end of the test."""
    started: list[WorkerProcess] = []

    def start(**overrides: Any) -> WorkerProcess:
        worker = start_worker(tmp_path / f"w{len(started)}", **overrides)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


class InProcessWorker:
    """A worker on threads of the test process (fast to start: for the many connections of the fuzz tests)."""

    def __init__(self, folder: Path, **overrides: Any) -> None:
        self.spec = spec_for(folder, stats=None, **overrides)
        self.worker = Worker(self.spec)
        self.worker.listen()
        self.thread = threading.Thread(target=self.worker.supervise, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"unix:{self.spec.unix}"

    def stop(self) -> None:
        self.worker.stopping.set()
        self.thread.join(5)
