"""A real Kubernetes control plane on loopback, for tests/k8s_real and benchmarks/k8s_scale.py.

etcd, kube-apiserver (generated certificates, an admin client certificate), kube-controller-manager (service
accounts, PodDisruptionBudgets, garbage collection, namespaces), kube-scheduler with the Helm chart's own
KubeSchedulerConfiguration, and kwok keeping simulated nodes alive and moving bound pods to Running; flexai's
webhook (registered through the chart's MutatingWebhookConfiguration and ValidatingWebhookConfiguration, called by
the API server over TLS), extender and agents run as local processes that reach the API server from a kubeconfig,
as users' deployments outside a cluster do.

Binaries come from ``bash tests/k8s_real/build.sh`` into ``$FLEXAI_K8S_BINARIES`` (default ``.cache/k8s-bin``), as
controller-runtime's envtest finds its own through ``KUBEBUILDER_ASSETS``. Every process runs in its own session
and is ended (SIGTERM, then SIGKILL) by ``stop()``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from flexai.k8s import names as flexai_names
from flexai.k8s.apiclient import tls_context
from flexai.node.devices import discover

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "flexai"
SYSTEM_NAMESPACE = "flexai-system"
BINARIES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm",
    "kwok-stages.yaml",
)  # fmt: skip
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# kube-scheduler's client rate limit as Kubernetes' own 5,000-node scalability tests set it
# (SCHEDULER_TEST_ARGS=--kube-api-qps=100; burst stays at its default, 100), and as the chart ships it.
SCHEDULER_QPS = 100
SCHEDULER_BURST = 100


def binaries_dir() -> Path:
    configured = os.environ.get("FLEXAI_K8S_BINARIES", "")
    path = Path(configured) if configured else REPO / ".cache" / "k8s-bin"
    return path if path.is_absolute() else REPO / path


def missing_binaries(folder: Path | None = None) -> list[str]:
    folder = folder or binaries_dir()
    return [b for b in BINARIES if not (folder / b).exists()]


def kubernetes_version(folder: Path | None = None) -> str:
    try:
        return ((folder or binaries_dir()) / "KUBERNETES_VERSION").read_text().strip()
    except OSError:
        return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControlPlaneError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- certificates
def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()[-500:]}")


@dataclass
class Certificates:
    """A CA, the API server's serving certificate, an admin client certificate (group system:masters), a
    serving certificate for local webhooks/gateways, and the service-account signing key pair."""

    folder: Path

    def __post_init__(self) -> None:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        os.chmod(f, 0o700)
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=flexai-test-ca",
                 "-keyout", "ca.key", "-out", "ca.crt", cwd=f)  # fmt: skip
        for name, subject, extensions in (
            ("apiserver", "/CN=kube-apiserver",
             "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc,IP:10.0.0.1"),
            ("admin", "/O=system:masters/CN=flexai-test-admin", "extendedKeyUsage=clientAuth"),
            ("serving", "/CN=flexai-local", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ):  # fmt: skip
            _openssl("req", *ec, "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=f)
            (f / f"{name}.ext").write_text(extensions + "\n")
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=f)  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=f)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=f)
        for key in f.glob("*.key"):
            os.chmod(key, 0o600)

    def path(self, name: str) -> Path:
        return self.folder / name

    def ca_bundle_b64(self) -> str:
        return base64.b64encode(self.path("ca.crt").read_bytes()).decode()


# ------------------------------------------------------------------------------------------------ processes
@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(  # noqa: S603  (our own binaries, argv lists)
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self.env,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        try:  # whatever the process group left behind
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def peak_rss_mib(pid: int) -> float:
    """VmHWM (the resident high-water mark) of a live process, in MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# -------------------------------------------------------------------------------------------- control plane
@dataclass
class ControlPlane:
    workdir: Path
    bin_dir: Path = field(default_factory=binaries_dir)
    scheduler_qps: int = SCHEDULER_QPS
    scheduler_burst: int = SCHEDULER_BURST
    apiserver_args: Sequence[str] = ()

    def __post_init__(self) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ControlPlaneError(
                f"missing {', '.join(missing)} in {self.bin_dir}: build them with `bash tests/k8s_real/build.sh`"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.processes: dict[str, Process] = {}
        self.certs: Certificates | None = None
        self.apiserver_port = 0
        self.etcd_port = 0
        self.extender_ports: list[int] = []
        self.webhook_port = 0
        self._http: httpx.Client | None = None

    # ------------------------------------------------------------------------------ basics
    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        old = self.processes.get(name)
        if old is not None and old.alive():
            raise ControlPlaneError(f"{name} is already running")
        process = Process(name, argv, self.logs / f"{name}.log", env).start()
        self.processes[name] = process
        return process

    def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float, process: Process | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise ControlPlaneError(f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError, ControlPlaneError):
                pass
            time.sleep(0.2)
        tail = f":\n{process.tail()}" if process is not None else ""
        raise ControlPlaneError(f"{what} not ready after {timeout_s:.0f} s{tail}")

    @property
    def http(self) -> httpx.Client:
        """An admin client (the admin certificate, verifying the API server against the test CA)."""
        if self._http is None:
            assert self.certs is not None
            # One context with the client certificate, as flexai's own client builds it (httpx ignores ``cert=``
            # beside a CA path).
            cert = self.certs.path
            context = tls_context(str(cert("ca.crt")), (cert("admin.crt"), cert("admin.key")))
            self._http = httpx.Client(
                base_url=self.url,
                verify=context,
                timeout=60,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            )
        return self._http

    # ------------------------------------------------------------------------------ start
    def start(self, controller_manager: bool = True) -> ControlPlane:
        """etcd, kube-apiserver and (by default) kube-controller-manager; the rest is started on demand."""
        self.certs = Certificates(self.workdir / "pki")
        self._write_kubeconfig()
        self.start_etcd()
        self.start_apiserver()
        if controller_manager:
            self.start_controller_manager()
        return self

    def _write_kubeconfig(self) -> None:
        assert self.certs is not None
        self.apiserver_port = self.apiserver_port or free_port()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": str(self.certs.path("ca.crt"))}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.certs.path("admin.crt")),
                "client-key": str(self.certs.path("admin.key"))}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }  # fmt: skip
        self.kubeconfig.write_text(yaml.safe_dump(config))
        os.chmod(self.kubeconfig, 0o600)

    def start_etcd(self) -> None:
        self.etcd_port = self.etcd_port or free_port()
        peer = free_port()
        data = self.workdir / "etcd"
        process = self._spawn("etcd", [
            self.binary("etcd"), "--name", "flexai-test", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"flexai-test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(8 << 30), "--log-level", "warn",
        ])  # fmt: skip
        self._wait("etcd", lambda: httpx.get(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2).status_code
                   == 200, 60, process)  # fmt: skip

    def etcd_compact(self) -> int:
        """Compact etcd's history up to its current revision (through its gRPC gateway); returns the revision."""
        base = f"http://127.0.0.1:{self.etcd_port}/v3"
        header = httpx.post(f"{base}/kv/range", json={"key": base64.b64encode(b"/").decode()}, timeout=10).json()
        revision = int(header["header"]["revision"])
        response = httpx.post(f"{base}/kv/compaction", json={"revision": revision, "physical": True}, timeout=30)
        response.raise_for_status()
        return revision

    def start_apiserver(self, timeout_s: float = 180) -> None:
        assert self.certs is not None
        c = self.certs.path
        process = self._spawn("kube-apiserver", [
            self.binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={c('apiserver.crt')}", f"--tls-private-key-file={c('apiserver.key')}",
            f"--client-ca-file={c('ca.crt')}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={c('sa.pub')}", f"--service-account-signing-key-file={c('sa.key')}",
            "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",  # the kubernetes Service may not point at loopback
            "--profiling=false", "--v=0", *self.apiserver_args,
        ])  # fmt: skip

        def ready() -> bool:
            return self.http.get("/readyz").status_code == 200

        self._wait("kube-apiserver", ready, timeout_s, process)

    def stop_apiserver(self) -> None:
        self.processes["kube-apiserver"].stop()
        if self._http is not None:
            self._http.close()
            self._http = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def etcd_bump_revision(self) -> int:
        """Write one key outside the API server's prefix, so etcd's revision moves on; returns the new revision."""
        base = f"http://127.0.0.1:{self.etcd_port}/v3"
        body = {"key": base64.b64encode(b"/flexai-test/bump").decode(), "value": base64.b64encode(b"1").decode()}
        response = httpx.post(f"{base}/kv/put", json=body, timeout=10)
        response.raise_for_status()
        return int(response.json()["header"]["revision"])

    def start_controller_manager(self) -> None:
        assert self.certs is not None
        process = self._spawn("kube-controller-manager", [
            self.binary("kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            "--controllers=serviceaccount,serviceaccount-token,disruption,garbagecollector,namespace,nodelifecycle",
            "--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=false",
            f"--root-ca-file={self.certs.path('ca.crt')}",
            f"--service-account-private-key-file={self.certs.path('sa.key')}", "--v=0",
        ])  # fmt: skip
        self._wait("the default service account", lambda: self.http.get(
            "/api/v1/namespaces/default/serviceaccounts/default").status_code == 200, 120, process)  # fmt: skip

    def start_kwok(self) -> None:
        """kwok manages the nodes annotated ``kwok.x-k8s.io/node: fake``: keeps them Ready through node leases and
        moves pods bound to them to Running."""
        self._spawn("kwok", [
            self.binary("kwok"), f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--cidr=10.128.0.0/9", "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
            "--server-address=",
        ])  # fmt: skip

    # ------------------------------------------------------------------------------ objects
    def request(self, method: str, path: str, body: Any = None, ok: Iterable[int] = (200, 201, 202)) -> dict:
        headers = {}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        response = self.http.request(method, path, content=None if body is None else json.dumps(body), headers=headers)
        if response.status_code not in tuple(ok):
            raise ControlPlaneError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else {}

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def apply_manifests(self, documents: Iterable[dict]) -> None:
        """Server-side apply of whole objects (kubectl's field manager is ours)."""
        for doc in documents:
            path = resource_path(doc)
            response = self.http.patch(
                f"{path}?fieldManager=flexai-test&force=true",
                content=json.dumps(doc),
                headers={"Content-Type": "application/apply-patch+yaml"},
            )
            if response.status_code >= 300:
                raise ControlPlaneError(f"apply {doc.get('kind')} {path}: {response.status_code} {response.text}")

    def ensure_namespace(self, name: str) -> None:
        self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}}, ok=(201, 409))  # fmt: skip

    def kubectl(self, *args: str, input_text: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip

    def add_nodes(
        self,
        names: Sequence[str],
        devices: int = 8,
        slots_per_device: int = 10,
        labels: dict[str, str] | None = None,
        workers: int = 16,
    ) -> None:
        """Nodes kwok manages, each with ``devices`` GPUs as the flexai device plugin (``flexai.io/vxpu``: one slot
        per share step) and as whole GPUs (``nvidia.com/gpu``, the plain-Kubernetes baseline) would advertise."""
        resources = {
            "cpu": "256", "memory": "2Ti", "pods": "1000",
            "flexai.io/vxpu": str(devices * slots_per_device), "nvidia.com/gpu": str(devices),
        }  # fmt: skip

        def create(name: str) -> None:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok",
                               **(labels or {})},
                },
                "spec": {},
                "status": {"capacity": resources, "allocatable": resources},
            }  # fmt: skip
            self.request("POST", "/api/v1/nodes", body, ok=(201, 409))

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, names))

    # ------------------------------------------------------------------------------ flexai components
    def flexai(self, *args: str) -> list[str]:
        """The ``flexai`` command of this interpreter's environment."""
        script = Path(sys.executable).with_name("flexai")
        if script.exists():
            return [str(script), *args]
        return [sys.executable, "-c", "from flexai.cli.main import app; app()", *args]

    def render_chart(self, *sets: str, release: str = "flexai") -> list[dict]:
        """``helm template`` of the project's chart, as a user installs it (certificates given, not cert-manager)."""
        assert self.certs is not None
        result = subprocess.run(
            [self.binary("helm"), "template", release, str(CHART), "--namespace", SYSTEM_NAMESPACE,
             "--set", "webhook.certManager.enabled=false", "--set", "webhook.tls.secretName=flexai-webhook-tls",
             "--set", f"webhook.tls.caBundle={self.certs.ca_bundle_b64()}",
             *[a for s in sets for a in ("--set", s)]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode:
            raise ControlPlaneError(f"helm template failed: {result.stderr.strip()}")
        return [d for d in yaml.safe_load_all(result.stdout) if d]

    def start_webhook(self, *extra: str) -> None:
        """flexai's admission webhook on loopback (TLS, the test CA), registered through the chart's webhook
        configurations with the client config pointed at it by URL (the API server calls it over TLS)."""
        assert self.certs is not None
        self.webhook_port = free_port()
        process = self._spawn("flexai-webhook", self.flexai(
            "k8s", "webhook", "--host", "127.0.0.1", "--port", str(self.webhook_port),
            "--tls-cert", str(self.certs.path("serving.crt")), "--tls-key", str(self.certs.path("serving.key")),
            *extra))  # fmt: skip
        self._wait("flexai webhook", lambda: _tls_port_open(self.webhook_port), 60, process)
        configurations = [d for d in self.render_chart() if d["kind"].endswith("WebhookConfiguration")]
        for doc in configurations:
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}{path}",
                                        "caBundle": self.certs.ca_bundle_b64()}  # fmt: skip
        self.ensure_namespace(SYSTEM_NAMESPACE)
        self.apply_manifests(configurations)

    def start_extender(self, name: str = "flexai-extender", *extra: str) -> int:
        """``flexai k8s scheduler`` (the extender), reaching the API server from the admin kubeconfig; its port."""
        port = free_port()
        self.ensure_namespace(SYSTEM_NAMESPACE)
        process = self._spawn(name, self.flexai(
            "k8s", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--namespace", SYSTEM_NAMESPACE, "--kubeconfig", str(self.kubeconfig), *extra))  # fmt: skip
        self._wait(name, lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code < 500,
                   60, process)  # fmt: skip
        self.extender_ports.append(port)
        return port

    def scheduler_config(
        self, extender_port: int | None, scheduler_name: str = "flexai-scheduler", leader_elect: bool | None = None
    ) -> dict:
        """The chart's KubeSchedulerConfiguration (rendered by helm), with this machine's kubeconfig and the
        client rate limit written down in SCHEDULER_QPS/SCHEDULER_BURST; without ``extender_port``, the same
        scheduler with no extender and kube-scheduler's default plugins (the plain-Kubernetes baseline)."""
        sets = [f"scheduler.extender.port={extender_port or 8888}"]
        rendered = self.render_chart(*sets)
        configmap = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(
            "-scheduler-config"))  # fmt: skip
        config = yaml.safe_load(configmap["data"]["config.yaml"])
        config.setdefault("clientConnection", {}).update(
            kubeconfig=str(self.kubeconfig), qps=self.scheduler_qps, burst=self.scheduler_burst
        )
        config["leaderElection"]["resourceNamespace"] = SYSTEM_NAMESPACE
        if leader_elect is not None:
            config["leaderElection"]["leaderElect"] = leader_elect
        config["profiles"][0]["schedulerName"] = scheduler_name
        if extender_port is None:
            config.pop("extenders", None)
            config["profiles"][0].pop("plugins", None)  # kube-scheduler's own plugins, preemption included
        return config

    def start_scheduler(
        self,
        extender_port: int | None,
        name: str = "kube-scheduler",
        scheduler_name: str = "flexai-scheduler",
        leader_elect: bool | None = None,
    ) -> Process:
        """kube-scheduler with the chart's configuration (``leader_elect`` None keeps the chart's choice)."""
        config = self.scheduler_config(extender_port, scheduler_name, leader_elect)
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.ensure_namespace(SYSTEM_NAMESPACE)
        return self._spawn(name, [self.binary("kube-scheduler"), f"--config={path}", "--secure-port=0", "--v=1"])

    def start_agent(self, node: str, devices: str = "sim:8xA100-80GB", heartbeat_s: float = 5.0) -> Process:
        socket_dir = self.workdir / "device-plugins" / node
        socket_dir.mkdir(parents=True, exist_ok=True)
        return self._spawn(f"agent-{node}", self.flexai(
            "k8s", "agent", "--node-name", node, "--devices", devices, "--heartbeat", str(heartbeat_s),
            "--socket-dir", f"{socket_dir}/", "--metrics-port", "0", "--kubeconfig", str(self.kubeconfig),
        ))  # fmt: skip

    # ------------------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Ends every process, flexai's first, etcd last."""
        order = ["kube-apiserver", "etcd"]
        for name, process in reversed(list(self.processes.items())):
            if name not in order:
                process.stop()
        for name in order:
            if name in self.processes:
                self.processes[name].stop()
        if self._http is not None:
            self._http.close()
            self._http = None


def _tls_port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


_PLURALS = {"PodDisruptionBudget": "poddisruptionbudgets", "PriorityClass": "priorityclasses"}


def resource_path(doc: dict) -> str:
    """The REST path of one object (namespaced or not) from its apiVersion, kind and metadata."""
    api_version, kind = doc["apiVersion"], doc["kind"]
    meta = doc.get("metadata") or {}
    plural = _PLURALS.get(kind) or (kind.lower() + ("es" if kind.endswith("s") else "s"))
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = meta.get("namespace")
    middle = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{middle}/{plural}/{meta['name']}"


def sim_inventory_json(devices: str = "sim:8xA100-80GB", share_step_milli: int = 100) -> str:
    """What ``flexai k8s agent --devices <devices>`` publishes in its node's inventory annotation (every device
    healthy, heartbeat now): for nodes without an agent process of their own."""
    backend, found = discover(devices)
    inventory = flexai_names.Inventory(
        devices=tuple(flexai_names.InventoryDevice(d.index, d.uuid, d.model, d.memory_mib, True) for d in found),
        share_step_milli=share_step_milli,
        heartbeat=time.time(),
        vendor=backend.name,
    )
    return inventory.to_json()
