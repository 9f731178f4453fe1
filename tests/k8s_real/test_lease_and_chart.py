"""Two extender replicas contending through a real coordination.k8s.io Lease, and the chart's manifests checked by
the real API server (``kubectl apply --dry-run=server``)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flexai.k8s import names
from tests.k8s_real.controlplane import SYSTEM_NAMESPACE, ControlPlane
from tests.k8s_real.helpers import container, create_pod, pod_body, vxpu, wait_bound, wait_until

LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NAMESPACE}/leases/flexai-scheduler"


def binds_done(port: int) -> float:
    """The extender's own count of the pods it bound (``flexai_scheduling_attempts_total``, verb bind, scheduled)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "flexai_scheduling_attempts_total" and labels.get("verb") == "bind" \
                    and labels.get("result") == "scheduled":  # fmt: skip
                return sample.value
    return 0.0


def test_two_extender_replicas_contend_through_a_real_lease_and_exactly_one_binds(cluster: ControlPlane) -> None:
    # Two scheduler pods as the chart runs them with replicas: 2, but with kube-scheduler's own leader election off
    # so that both kube-schedulers really ask their extenders to bind the same pods. The session's own scheduler
    # pauses meanwhile (it serves the same scheduler name).
    cluster.processes["kube-scheduler"].stop()
    try:
        ports = {name: cluster.start_extender(f"extender-{name}", "--leader-election") for name in ("a", "b")}
        for name, port in ports.items():
            cluster.start_scheduler(port, name=f"kube-scheduler-{name}", leader_elect=False)
        wait_until("a holder of the extenders' Lease", lambda: lease_spec(cluster).get("holderIdentity"), 60)

        # flexai-system is outside the webhook's namespaces: these pods name their scheduler themselves. A round
        # counts only when the Lease did not change hands during it (a starved machine may let it expire; the
        # next holder then confirms the binds already done, and the counts mix): up to three rounds.
        clean_rounds: list[dict[str, float]] = []
        for round_ in range(3):
            before = {name: binds_done(port) for name, port in ports.items()}
            lease_before = lease_spec(cluster)
            pods = [f"ha-{round_}-{i}" for i in range(4)]
            for name in pods:
                create_pod(cluster, ha_pod(name))
            for name in pods:
                wait_bound(cluster, name, SYSTEM_NAMESPACE)
            lease_after = lease_spec(cluster)
            done = {name: binds_done(port) - before[name] for name, port in ports.items()}
            if (lease_after.get("holderIdentity"), lease_after.get("leaseTransitions")) == (
                lease_before.get("holderIdentity"), lease_before.get("leaseTransitions")):  # fmt: skip
                clean_rounds.append(done)
                break
        assert clean_rounds, "the Lease changed hands in every round"
        done = clean_rounds[0]
        assert sorted(done.values()) == [0.0, 4.0], done  # the holder bound all four, the other none

        # The leader goes away: the other replica takes the Lease over and binds the next pod.
        leader = max(done, key=lambda n: done[n])
        other = "b" if leader == "a" else "a"
        cluster.processes[f"extender-{leader}"].stop()
        binds_before = binds_done(ports[other])
        create_pod(cluster, ha_pod("ha-after"))
        wait_bound(cluster, "ha-after", SYSTEM_NAMESPACE, timeout_s=120)
        assert binds_done(ports[other]) == binds_before + 1
    finally:
        for name in ("a", "b"):
            for process in (f"kube-scheduler-{name}", f"extender-{name}"):
                if process in cluster.processes:
                    cluster.processes[process].stop()
        cluster.start_scheduler(cluster.extender_ports[0])


def lease_spec(cluster: ControlPlane) -> dict:
    return cluster.request("GET", LEASE, ok=(200, 404)).get("spec") or {}


def ha_pod(name: str) -> dict:
    return pod_body(name, [container("main", vxpu(200))], namespace=SYSTEM_NAMESPACE,
                    schedulerName=names.SCHEDULER_NAME)  # fmt: skip


def test_the_charts_rendered_manifests_pass_a_server_side_dry_run(cluster: ControlPlane) -> None:
    """Every object ``helm template`` renders (certificates given, as without cert-manager) is accepted by the real
    API server's validation and admission (``kubectl apply --dry-run=server``)."""
    import yaml

    documents = cluster.render_chart(release="dry-run")  # names apart from the session's own webhook objects
    kinds = sorted({d["kind"] for d in documents})
    assert {"DaemonSet", "Deployment", "ConfigMap", "MutatingWebhookConfiguration", "ClusterRole"} <= set(kinds)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                             input_text=yaml.safe_dump_all(documents))  # fmt: skip
    assert result.returncode == 0, result.stderr
    accepted = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(accepted) == len(documents), result.stdout
    # kube-scheduler's client rate limit ships as its production users at scale set it.
    (configmap,) = [d for d in documents if d["metadata"]["name"].endswith("-scheduler-config")]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert (config["clientConnection"]["qps"], config["clientConnection"]["burst"]) == (100, 100)
