"""KubeClient.from_kubeconfig: a kubeconfig's server, CA, client certificate and token, as kubectl reads them;
what flexai does not support is refused naming the field. One server, over TLS that requires a client
certificate, checks that both request paths (http.client for pods/binding, httpx for the rest) present it."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flexai.cli.main import app
from flexai.k8s import apiclient
from flexai.k8s.apiclient import KubeClient, KubeConfigError
from flexai.k8s.extender import ApiError

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is needed to make the test certificates")


# ----------------------------------------------------------------- certificates (openssl, EC keys: fast)
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([str(OPENSSL), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip


def make_signed(folder: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """NAME.crt / NAME.key signed by CA, with the given X.509 extensions."""
    (folder / f"{name}.ext").write_text(extensions)
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", subject,
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (the cluster's), server (SAN IP 127.0.0.1), admin (O=system:masters client), other-ca (a stranger)."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_signed(folder, "server", "/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_signed(folder, "admin", "/O=system:masters/CN=admin", "extendedKeyUsage=clientAuth\n")
    return folder


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(
    folder: Path,
    cluster: dict[str, Any],
    user: dict[str, Any] | None = None,
    current: str | None = "main",
    extra_contexts: dict[str, dict] | None = None,
) -> Path:
    """A kubeconfig file in FOLDER: cluster "c" and user "u" under context "main" (the current one)."""
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}] if user is not None else [],
        "contexts": [{"name": "main", "context": {"cluster": "c", **({"user": "u"} if user is not None else {})}}],
    }
    for name, context in (extra_contexts or {}).items():
        config["contexts"].append({"name": name, "context": context})
    if current:
        config["current-context"] = current
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def ca_subjects(client: KubeClient) -> set[str]:
    assert client.ssl_context is not None
    return {dict(x[0] for x in ca["subject"])["commonName"] for ca in client.ssl_context.get_ca_certs()}


# ----------------------------------------------------------------- scenarios without a connection
SERVER = "https://127.0.0.1:6443"


def admin_files(pki: Path) -> dict[str, str]:
    return {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}


def admin_data(pki: Path) -> dict[str, str]:
    return {"client-certificate-data": b64(pki / "admin.crt"), "client-key-data": b64(pki / "admin.key")}


Check = Callable[[KubeClient], None]


def verified_by_ca(client: KubeClient) -> None:
    assert client.ssl_context is not None and client.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert ca_subjects(client) == {"ca"} and client.ssl_context.check_hostname


def bearer(token: str) -> Check:
    def check(client: KubeClient) -> None:
        assert client.headers == {"Authorization": f"Bearer {token}"}

    return check


def no_auth_header(client: KubeClient) -> None:
    assert client.headers == {}


def unverified(client: KubeClient) -> None:
    assert client.ssl_context is not None and client.ssl_context.verify_mode == ssl.CERT_NONE


def no_tls(client: KubeClient) -> None:
    assert client.ssl_context is None


OK_SCENARIOS: dict[str, tuple[Callable[[Path, Path], tuple[dict, dict | None]], list[Check]]] = {
    "CA file": (lambda pki, d: ({"server": SERVER, "certificate-authority": str(pki / "ca.crt")}, None),
                [verified_by_ca, no_auth_header]),
    "CA data": (lambda pki, d: ({"server": SERVER, "certificate-authority-data": b64(pki / "ca.crt")}, None),
                [verified_by_ca]),
    "CA file relative to the kubeconfig": (lambda pki, d: ({"server": SERVER, "certificate-authority": "ca.crt"},
                                                           None), [verified_by_ca]),
    "client certificate files": (lambda pki, d: ({"server": SERVER, "certificate-authority": str(pki / "ca.crt")},
                                                 admin_files(pki)), [verified_by_ca, no_auth_header]),
    "client certificate data": (lambda pki, d: ({"server": SERVER, "certificate-authority": str(pki / "ca.crt")},
                                                admin_data(pki)), [verified_by_ca, no_auth_header]),
    "token": (lambda pki, d: ({"server": SERVER, "certificate-authority": str(pki / "ca.crt")}, {"token": "t0k"}),
              [bearer("t0k")]),
    "tokenFile (relative)": (lambda pki, d: ({"server": SERVER, "certificate-authority": "ca.crt"},
                                             {"tokenFile": "token"}), [bearer("from-file")]),
    "token before tokenFile": (lambda pki, d: ({"server": SERVER, "insecure-skip-tls-verify": True},
                                               {"token": "t0k", "tokenFile": "token"}), [bearer("t0k")]),
    "token and client certificate": (lambda pki, d: ({"server": SERVER, "certificate-authority-data":
                                                      b64(pki / "ca.crt")}, {**admin_data(pki), "token": "t0k"}),
                                     [verified_by_ca, bearer("t0k")]),
    "insecure-skip-tls-verify": (lambda pki, d: ({"server": SERVER, "insecure-skip-tls-verify": True},
                                                 admin_files(pki)), [unverified]),
    "plain http": (lambda pki, d: ({"server": "http://127.0.0.1:8080"}, None), [no_tls]),
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(OK_SCENARIOS))
def test_from_kubeconfig_reads(scenario: str, pki: Path, tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    shutil.copytree(pki, folder)
    (folder / "token").write_text("from-file\n")
    make, checks = OK_SCENARIOS[scenario]
    cluster, user = make(pki, folder)
    client = KubeClient.from_kubeconfig(kubeconfig(folder, cluster, user))
    try:
        assert client.base_url == cluster["server"]
        for check in checks:
            check(client)
    finally:
        client.close()


def test_client_certificate_data_is_written_private_and_removed(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-data goes to a 0700 folder as 0600 files for OpenSSL, removed once loaded (before the client exists)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    seen: list[tuple[int, list[int]]] = []
    real_rmtree = shutil.rmtree

    def spy(path: str, *args: Any, **kwargs: Any) -> None:
        files = [stat.S_IMODE(p.stat().st_mode) for p in Path(path).iterdir()]
        seen.append((stat.S_IMODE(os.stat(path).st_mode), files))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(apiclient.shutil, "rmtree", spy)
    path = kubeconfig(tmp_path, {"server": SERVER, "certificate-authority": str(pki / "ca.crt")}, admin_data(pki))
    KubeClient.from_kubeconfig(path).close()
    assert seen == [(0o700, [0o600, 0o600])]
    assert list(temp.iterdir()) == []


def test_the_current_context_or_the_one_named(pki: Path, tmp_path: Path) -> None:
    other = {"cluster": "c", "user": "u"}
    path = kubeconfig(tmp_path, {"server": SERVER, "insecure-skip-tls-verify": True}, {"token": "t0k"},
                      current=None, extra_contexts={"other": other})  # fmt: skip
    with pytest.raises(KubeConfigError, match=r"no current-context; name a context \(it has: main, other\)"):
        KubeClient.from_kubeconfig(path)
    client = KubeClient.from_kubeconfig(path, context="other")
    assert client.headers == {"Authorization": "Bearer t0k"}
    client.close()


def test_the_default_path_is_KUBECONFIG(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = kubeconfig(tmp_path, {"server": "http://127.0.0.1:1"}, None)
    monkeypatch.setenv("KUBECONFIG", str(path))
    client = KubeClient.from_kubeconfig()
    assert client.base_url == "http://127.0.0.1:1"
    client.close()
    monkeypatch.setenv("KUBECONFIG", f"{path}{os.pathsep}{path}")
    with pytest.raises(KubeConfigError, match="a list of files is not supported"):
        KubeClient.from_kubeconfig()


def ca(pki: Path) -> dict[str, str]:
    return {"server": SERVER, "certificate-authority": str(pki / "ca.crt")}


REFUSED: dict[str, tuple[Callable[[Path], tuple[dict, dict | None]], str]] = {
    "exec plugin": (lambda pki: (ca(pki), {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                    "command": "aws"}}), "user 'u' field 'exec' is not supported"),
    "auth-provider": (lambda pki: (ca(pki), {"auth-provider": {"name": "oidc"}}), "field 'auth-provider'"),
    "basic auth": (lambda pki: (ca(pki), {"username": "a", "password": "b"}), "field 'password' is not supported"),
    "impersonation": (lambda pki: (ca(pki), {"token": "t", "as": "someone"}), "field 'as' is not supported"),
    "tls-server-name": (lambda pki: ({**ca(pki), "tls-server-name": "kubernetes"}, None),
                        "cluster 'c' field 'tls-server-name' is not supported"),
    "proxy-url": (lambda pki: ({**ca(pki), "proxy-url": "http://proxy:3128"}, None), "field 'proxy-url'"),
    "no server": (lambda pki: ({"certificate-authority": str(pki / "ca.crt")}, None), "cluster 'c' has no server"),
    "CA file and data": (lambda pki: ({**ca(pki), "certificate-authority-data": b64(pki / "ca.crt")}, None),
                         "certificate-authority and certificate-authority-data are both set"),
    "insecure with a CA": (lambda pki: ({**ca(pki), "insecure-skip-tls-verify": True}, None),
                           "insecure-skip-tls-verify with a certificate-authority"),
    "CA file missing": (lambda pki: ({"server": SERVER, "certificate-authority": "/nonexistent/ca.crt"}, None),
                        "certificate-authority /nonexistent/ca.crt: cannot load it"),
    "CA data not base64": (lambda pki: ({"server": SERVER, "certificate-authority-data": "not base64!"}, None),
                           "certificate-authority-data: not base64"),
    "certificate without key": (lambda pki: (ca(pki), {"client-certificate": str(pki / "admin.crt")}),
                                "client-certificate without client-key"),
    "key without certificate": (lambda pki: (ca(pki), {"client-key-data": b64(pki / "admin.key")}),
                                "client-key without client-certificate"),
    "certificate file and data": (lambda pki: (ca(pki), {**admin_files(pki), "client-certificate-data":
                                                         b64(pki / "admin.crt")}),
                                  "client-certificate and client-certificate-data are both set"),
    "key of another certificate": (lambda pki: (ca(pki), {"client-certificate": str(pki / "admin.crt"),
                                                          "client-key": str(pki / "server.key")}),
                                   "admin.crt / client-key PKI/server.key: cannot load them"),
    "key data not base64": (lambda pki: (ca(pki), {"client-certificate": str(pki / "admin.crt"),
                                                   "client-key-data": "%%%"}), "client-key-data: not base64"),
    "tokenFile missing": (lambda pki: (ca(pki), {"tokenFile": "/nonexistent/token"}),
                          "tokenFile /nonexistent/token: cannot read it"),
    "typo in a field": (lambda pki: (ca(pki), {"client-certficate": "x"}), "field 'client-certficate'"),
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(REFUSED))
def test_from_kubeconfig_refuses_with_one_clear_error(scenario: str, pki: Path, tmp_path: Path) -> None:
    make, message = REFUSED[scenario]
    message = message.replace("PKI", str(pki))
    path = kubeconfig(tmp_path, *make(pki))
    with pytest.raises(KubeConfigError) as refused:
        KubeClient.from_kubeconfig(path)
    assert str(refused.value).startswith(f"kubeconfig {path}, context 'main': ")
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("- just\n- a list\n", "not a kubeconfig"),
        ("clusters: [\n", "not YAML"),
        ("clusters:\n- cluster: {server: https://x}\ncontexts: []\n", "not a kubeconfig (KeyError: 'name')"),
        ("clusters: []\ncontexts: []\ncurrent-context: main\n", "no context 'main' (it has: none)"),
        ("clusters: [{name: c, cluster: {server: 'https://x', insecure-skip-tls-verify: maybe}}]\ncontexts: []\n",
         "not a kubeconfig (ValidationError: Expected `bool`, got `str` - at `$.insecure-skip-tls-verify`)"),
        ("clusters: []\ncontexts: [{name: main, context: {cluster: gone}}]\ncurrent-context: main\n",
         "context 'main' names cluster 'gone', not defined"),
        ("clusters: [{name: c, cluster: {server: 'https://x'}}]\ncontexts: [{name: main, context: {cluster: c, "
         "user: nobody}}]\ncurrent-context: main\n", "context 'main' names user 'nobody', not defined"),
    ],
    ids=["missing file", "not a mapping", "not YAML", "malformed", "unknown context", "wrong type",
         "unknown cluster", "unknown user"],
)  # fmt: skip
def test_a_bad_kubeconfig_names_the_file(content: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeConfigError) as refused:
        KubeClient.from_kubeconfig(path)
    assert str(refused.value).startswith(f"kubeconfig {path}: ") and message in str(refused.value)


def test_an_unknown_context_is_named(pki: Path, tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, ca(pki), {"token": "t"})
    with pytest.raises(KubeConfigError, match=r"no context 'prod' \(it has: main\)"):
        KubeClient.from_kubeconfig(path, context="prod")


# ----------------------------------------------------------------- a TLS server that requires a client certificate
class TinyApiServer(http.server.ThreadingHTTPServer):
    """Answers GET pods/NAME, GET pods (a list) and POST pods/NAME/binding; only over TLS with a client
    certificate from the cluster's CA. Records each request's client certificate CN and Authorization."""

    daemon_threads = True

    def __init__(self, pki: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
        context.load_verify_locations(str(pki / "ca.crt"))
        context.verify_mode = ssl.CERT_REQUIRED
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.requests: list[tuple[str, str, str, str]] = []
        self.bindings: list[dict] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5
    server: TinyApiServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> None:
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(x[0] for x in cert["subject"]) if cert else {}
        self.server.requests.append(
            (self.command, self.path, subject.get("commonName", ""), self.headers.get("Authorization", ""))
        )

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        if self.path.startswith("/api/v1/pods"):
            pod = {"metadata": {"name": "p", "namespace": "default"}}
            self._answer(200, {"kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": [pod]})
        elif self.path == "/api/v1/namespaces/default/pods/p":
            self._answer(200, {"kind": "Pod", "metadata": {"name": "p", "namespace": "default"}})
        else:
            self._answer(404, {"kind": "Status", "code": 404, "message": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bindings.append(body)
        self._answer(201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})


@pytest.fixture(scope="module")
def tls_server(pki: Path) -> Iterator[TinyApiServer]:
    server = TinyApiServer(pki)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


CONNECTIONS: dict[str, Callable[[Path], tuple[dict, dict]]] = {
    "files": lambda pki: ({"certificate-authority": str(pki / "ca.crt")}, admin_files(pki)),
    "data and a token": lambda pki: ({"certificate-authority-data": b64(pki / "ca.crt")},
                                     {**admin_data(pki), "token": "t0k"}),
    "insecure, certificate data": lambda pki: ({"insecure-skip-tls-verify": True}, admin_data(pki)),
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(CONNECTIONS))
def test_both_paths_present_the_client_certificate(
    scenario: str, pki: Path, tls_server: TinyApiServer, tmp_path: Path
) -> None:
    cluster, user = CONNECTIONS[scenario](pki)
    client = KubeClient.from_kubeconfig(kubeconfig(tmp_path, {"server": tls_server.url, **cluster}, user))
    tls_server.requests.clear()
    try:
        client.bind_pod("default", "p", "uid-p", "node-1", {"flexai.io/placement": "{}"})  # http.client
        assert client.get_pod("default", "p")["metadata"]["name"] == "p"  # httpx
        items, version = client.list("/api/v1/pods", limit=10)  # httpx
    finally:
        client.close()
    assert [i["metadata"]["name"] for i in items] == ["p"] and version == "7"
    assert tls_server.bindings[-1]["target"] == {"apiVersion": "v1", "kind": "Node", "name": "node-1"}
    token = "Bearer t0k" if "token" in user else ""
    assert [(method, cn, auth) for method, _, cn, auth in tls_server.requests] == [
        ("POST", "admin", token),
        ("GET", "admin", token),
        ("GET", "admin", token),
    ]


@pytest.mark.parametrize("scenario", ["no client certificate", "server not signed by the CA"])
def test_both_paths_fail_without_the_certificate_or_the_right_ca(
    scenario: str, pki: Path, tls_server: TinyApiServer, tmp_path: Path
) -> None:
    if scenario == "no client certificate":
        cluster, user = {"certificate-authority": str(pki / "ca.crt")}, {"token": "t0k"}
    else:
        cluster, user = {"certificate-authority": str(pki / "other-ca.crt")}, admin_files(pki)
    client = KubeClient.from_kubeconfig(kubeconfig(tmp_path, {"server": tls_server.url, **cluster}, user))
    tls_server.requests.clear()
    try:
        with pytest.raises(ApiError) as bind:
            client.bind_pod("default", "p", "uid-p", "node-1")
        with pytest.raises(ApiError) as get:
            client.get_pod("default", "p")
    finally:
        client.close()
    assert bind.value.status == 503 and get.value.status == 503
    assert tls_server.requests == []


# ----------------------------------------------------------------- CLI: --kubeconfig / KUBECONFIG, --context
@pytest.fixture
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)


def run_scheduler(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = CliRunner().invoke(app, ["k8s", "scheduler", "--metrics-port", "0", *args], env=env)
    return done.exit_code, done.output


def test_cli_a_bad_kubeconfig_is_one_line(outside_a_cluster: None, pki: Path, tmp_path: Path) -> None:
    code, output = run_scheduler("--kubeconfig", str(tmp_path / "missing"))
    assert code == 2 and output == f"error: kubeconfig {tmp_path / 'missing'}: no such file\n"
    path = kubeconfig(tmp_path, ca(pki), {"exec": {"apiVersion": "v1", "command": "gcloud"}})
    code, output = run_scheduler(env={"KUBECONFIG": str(path)})
    assert code == 2 and output.count("\n") == 1 and "user 'u' field 'exec' is not supported" in output


def test_cli_without_any_server_names_the_options(outside_a_cluster: None) -> None:
    code, output = run_scheduler()
    assert code == 2 and "--api-server or --kubeconfig (or KUBECONFIG) is needed outside a cluster" in output
    code, output = run_scheduler("--context", "prod")
    assert code == 2 and "--context needs --kubeconfig" in output


def test_cli_precedence(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--api-server > --kubeconfig / KUBECONFIG > the in-cluster service account."""
    from flexai.cli.k8s_cmds import _client

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod: the kubeconfig still wins
    path = kubeconfig(tmp_path, {"server": "http://127.0.0.1:1"}, {"token": "t"},
                      extra_contexts={"other": {"cluster": "c"}})  # fmt: skip
    first = _client("http://127.0.0.1:2", None, False, tmp_path / "missing", None)
    second = _client(None, None, False, path, None)
    third = _client(None, None, False, path, "other")
    assert (first.base_url, second.base_url, second.headers, third.headers) == (
        "http://127.0.0.1:2",
        "http://127.0.0.1:1",
        {"Authorization": "Bearer t"},
        {},
    )
    for client in (first, second, third):
        client.close()
