"""`flexai k8s agent|scheduler|webhook`: the Kubernetes components (run in the cluster by the Helm chart)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from flexai.cli.main import app, console, fail

k8s_app = typer.Typer(
    help="Kubernetes components: node agent, scheduler extender, admission webhook.", no_args_is_help=True
)
app.add_typer(k8s_app, name="k8s")


def _client(  # noqa: ANN202
    api_server: str | None,
    token_file: Path | None,
    insecure: bool,
    kubeconfig: Path | None = None,
    context: str | None = None,
):
    """The API server from --api-server, else --kubeconfig (or $KUBECONFIG), else the pod's service account."""
    from flexai.k8s.apiclient import KubeClient, KubeConfigError

    if api_server:
        if context:
            fail("--context picks a context of --kubeconfig; it does not go with --api-server")
        token = token_file.read_text().strip() if token_file else None
        return KubeClient(api_server, token, verify=not insecure)
    if kubeconfig is not None and str(kubeconfig):
        try:
            return KubeClient.from_kubeconfig(kubeconfig, context)
        except KubeConfigError as exc:
            fail(str(exc))
    if context:
        fail("--context needs --kubeconfig (or KUBECONFIG)")
    if "KUBERNETES_SERVICE_HOST" not in os.environ:
        fail(
            "--api-server or --kubeconfig (or KUBECONFIG) is needed outside a cluster "
            "(in a pod the service account is used)"
        )
    return KubeClient.in_cluster()


ApiServerOption = Annotated[
    str | None, typer.Option(help="API server URL (before --kubeconfig; default: in-cluster service account).")
]
TokenOption = Annotated[Path | None, typer.Option(help="Bearer token file for --api-server.")]
InsecureOption = Annotated[bool, typer.Option(help="Skip TLS verification of --api-server (tests only).")]
KubeconfigOption = Annotated[
    Path | None,
    typer.Option(
        envvar="KUBECONFIG",
        help="kubeconfig to reach the API server from outside the cluster (client certificate or token; "
        "one file).",
    ),
]
ContextOption = Annotated[str | None, typer.Option(help="Context of --kubeconfig (default: its current-context).")]


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


@k8s_app.command()
def agent(
    node_name: Annotated[str, typer.Option(envvar="NODE_NAME", help="This node's name (from the downward API).")],
    devices: Annotated[str, typer.Option(help="auto, a vendor name, or sim:SPEC.")] = "auto",
    share_step: Annotated[int, typer.Option(help="Slice step in milli (100 = 10 %).")] = 100,
    heartbeat: Annotated[float, typer.Option(help="Seconds between inventory heartbeats.")] = 30.0,
    socket_dir: Annotated[str, typer.Option(help="kubelet device-plugin folder.")] = "/var/lib/kubelet/device-plugins/",
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics (0 = off).")] = 9400,
    device_list_strategy: Annotated[
        str,
        typer.Option(
            help="How NVIDIA containers get their GPUs: envvar (NVIDIA_VISIBLE_DEVICES, for the NVIDIA container "
            "runtime) or cdi-annotations (cdi.k8s.io/ annotations, for a CDI-enabled runtime)."
        ),
    ] = "envvar",
    remote_listen: Annotated[
        str, typer.Option(help="HOST:PORT of the gateway serving remote XPU leases (TLS; '' = none).")
    ] = "",
    remote_advertise: Annotated[
        str, typer.Option(envvar="FLEXAI_REMOTE_ADVERTISE", help="tls://HOST:PORT clients reach the gateway at.")
    ] = "",
    remote_tls_cert: Annotated[str, typer.Option(help="TLS certificate (PEM) of the lease workers.")] = "",
    remote_tls_key: Annotated[str, typer.Option(help="TLS private key (PEM) of the lease workers.")] = "",
    remote_ca: Annotated[str, typer.Option(help="CA (PEM) given to remote pods in their Secret.")] = "",
    remote_server_name: Annotated[
        str, typer.Option(help="Name in the workers' certificate, when clients connect by IP.")
    ] = "",
    remote_allow: Annotated[
        list[str] | None, typer.Option("--remote-allow", help="Entry-point glob the workers may create objects from.")
    ] = None,
    remote_state: Annotated[str, typer.Option(help="Folder for the lease files.")] = "/var/lib/flexai/leases",
    api_server: ApiServerOption = None,
    token_file: TokenOption = None,
    insecure: InsecureOption = False,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Node agent: inventory with heartbeat on the Node, kubelet device plugin for flexai.io/vxpu, and (with
    --remote-listen) lease workers for the remote slices placed on this node."""
    from flexai.k8s.agent import NodeAgent
    from flexai.k8s.deviceplugin.plugin import DEVICE_LIST_STRATEGIES
    from flexai.node.devices import DiscoveryError, discover

    if device_list_strategy not in DEVICE_LIST_STRATEGIES:
        fail(
            f"--device-list-strategy {device_list_strategy!r} is not allowed: use "
            + " or ".join(DEVICE_LIST_STRATEGIES)
        )
    try:
        backend, found = discover(devices)
    except (DiscoveryError, ValueError) as exc:
        fail(str(exc))
    connection = (api_server, token_file, insecure, kubeconfig, context)
    remote = None
    if remote_listen:
        from flexai.k8s.leases import RemoteLeases

        try:
            remote = RemoteLeases(
                _client(*connection), node_name, backend, remote_state, listen=remote_listen,
                advertise=remote_advertise, tls_cert=remote_tls_cert, tls_key=remote_tls_key, ca_file=remote_ca,
                server_name=remote_server_name, allow=remote_allow or [],
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            fail(f"--remote-listen: {exc}")
    node_agent = NodeAgent(
        _client(*connection),
        node_name,
        backend,
        found,
        share_step,
        heartbeat,
        socket_dir,
        device_list_strategy=device_list_strategy,
        remote=remote,
    )
    node_agent.start()
    if metrics_port:
        _serve_agent_metrics(node_agent, metrics_port)
    console.print(
        f"flexai agent on {node_name}: {len(found)} {backend.name} device(s), {1000 // share_step} slots each"
    )
    _wait_for_signal()
    node_agent.stop()


def _serve_agent_metrics(node_agent, port: int) -> None:  # noqa: ANN001
    from prometheus_client import start_http_server

    from flexai.k8s.metrics import AgentMetrics

    metrics = AgentMetrics()

    def refresh() -> None:
        while True:
            try:
                for d in node_agent.backend.devices():
                    label = str(d.index)
                    metrics.memory_total.labels(label).set(d.memory_mib * 2**20)
                    metrics.healthy.labels(label).set(1 if d.healthy else 0)
                    if d.memory_used_mib is not None:
                        metrics.memory_used.labels(label).set(d.memory_used_mib * 2**20)
                    if d.utilisation_pct is not None:
                        metrics.utilisation.labels(label).set(d.utilisation_pct / 100)
            except Exception:  # noqa: BLE001, S110  (metrics are best effort)
                pass
            threading.Event().wait(10)

    start_http_server(port, registry=metrics.registry)
    threading.Thread(target=refresh, daemon=True).start()


@k8s_app.command()
def scheduler(
    port: Annotated[int, typer.Option(help="Port of the extender (filter, prioritize, bind, /metrics).")] = 8888,
    host: Annotated[
        str, typer.Option(help="Address to listen on (kube-scheduler runs in the same pod).")
    ] = "127.0.0.1",
    namespace: Annotated[
        str, typer.Option(envvar="POD_NAMESPACE", help="Namespace of the leader Lease.")
    ] = "flexai-system",
    policy: Annotated[str, typer.Option(help="Scoring policy.")] = "flex",
    leader_election: Annotated[bool, typer.Option(help="Bind only while holding the Lease.")] = True,
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics on all addresses (0 = off).")] = 9401,
    assume_ttl: Annotated[
        float, typer.Option(help="Seconds the node chosen in prioritize stays held for the pod until its bind.")
    ] = 30.0,
    inventory_timeout: Annotated[
        float, typer.Option(help="Seconds without an agent heartbeat before a node takes no new pods.")
    ] = 120.0,
    hi: Annotated[
        bool, typer.Option(help="Decide through the Hi Scheduler (queues, priority classes, preemption, gangs).")
    ] = True,
    nominate: Annotated[
        bool,
        typer.Option(
            help="With --hi: write where Hi placed each pending pod into its status.nominatedNodeName as it arrives, "
            "which kube-scheduler tries alone before sampling nodes."
        ),
    ] = True,
    queues: Annotated[
        Path | None, typer.Option(help="Queue configuration (queues.yaml of the flexai-queues ConfigMap).")
    ] = None,
    api_server: ApiServerOption = None,
    token_file: TokenOption = None,
    insecure: InsecureOption = False,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Scheduler extender: keeps the cluster from list+watch and places pods with the engine."""
    import uvicorn

    from flexai.k8s.extender import create_extender_app
    from flexai.k8s.service import SchedulerService

    if assume_ttl < 0 or inventory_timeout <= 0:
        fail("--assume-ttl must be 0 or more and --inventory-timeout more than 0 (seconds)")
    from flexai.k8s.workload import QueueConfigError, parse_queues

    queue_specs = []
    if queues is not None:
        try:
            queue_specs = parse_queues(queues.read_text())
        except OSError as exc:
            fail(f"--queues {queues}: cannot read it ({exc})")
        except QueueConfigError as exc:
            fail(f"--queues {queues}: {exc}")
    service = SchedulerService(
        _client(api_server, token_file, insecure, kubeconfig, context),
        namespace,
        policy=policy,
        leader_election=leader_election,
        assume_ttl_s=assume_ttl,
        inventory_timeout_s=inventory_timeout,
        hi=hi,
        queues=queue_specs,
        nominate=nominate,
    )
    service.start()
    if metrics_port:
        # Only /metrics on the pod network; filter, prioritize and bind stay on --host.
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=service.extender.prometheus.registry)

        def refresh() -> None:
            while True:
                service.extender.refresh_gauges()
                threading.Event().wait(10)

        threading.Thread(target=refresh, name="flexai-metrics", daemon=True).start()
    console.print(f"flexai scheduler extender on {host}:{port} (policy {policy})")
    uvicorn.run(create_extender_app(service.extender), host=host, port=port, log_level="warning")
    service.stop()


@k8s_app.command()
def webhook(
    port: Annotated[int, typer.Option(help="HTTPS port.")] = 8443,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS key (PEM).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",  # noqa: S104
    share_step: Annotated[int, typer.Option(help="Slice step in milli (100 = 10 %).")] = 100,
    max_devices: Annotated[int, typer.Option(help="Most devices one pod may ask for.")] = 16,
    max_memory_mib: Annotated[int, typer.Option(help="Largest device memory in MiB (0 = no check).")] = 0,
    device_memory_mib: Annotated[
        int, typer.Option(help="Device memory for HAMi's gpumem-percentage (0 = unknown).")
    ] = 0,
    default_share: Annotated[int, typer.Option(help="Share in milli when a pod names none (0 = whole device).")] = 0,
    translate_bare_gpu: Annotated[bool, typer.Option(help="Also translate a bare nvidia.com/gpu request.")] = False,
) -> None:
    """Admission webhook: translates HAMi/Volcano/Huawei requests, routes pods to flexai, refuses the impossible.

    The TLS certificate is re-read when its files change (cert-manager renewals need no restart)."""
    import ssl

    import uvicorn

    from flexai.k8s.tls import ReloadingServerTLS, uvicorn_config
    from flexai.k8s.webhook import WebhookOptions, create_webhook_app

    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together (the API server only calls webhooks over HTTPS)")
    try:
        options = WebhookOptions.from_flags(
            share_step, max_devices, max_memory_mib, device_memory_mib, default_share, translate_bare_gpu
        )
    except ValueError as exc:
        fail(str(exc))
    tls = None
    if tls_cert is not None and tls_key is not None:
        try:
            tls = ReloadingServerTLS(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            fail(f"--tls-cert {tls_cert} / --tls-key {tls_key}: cannot load them ({exc})")
    uvicorn.Server(uvicorn_config(create_webhook_app(options), host, port, tls, log_level="warning")).run()
