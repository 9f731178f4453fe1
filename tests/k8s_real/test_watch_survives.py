"""The extender's list+watch survives an etcd compaction (its watch answered 410 Gone, then a re-list) and an API
server restart. Runs last (it restarts the API server under every component of the session)."""

from __future__ import annotations

import signal

from tests.k8s_real.controlplane import ControlPlane
from tests.k8s_real.helpers import (
    DEVICES,
    clear_pods,
    container,
    create_pod,
    pod_body,
    vxpu,
    wait_bound,
)


def whole_device_pods(cluster: ControlPlane, prefix: str) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(DEVICES)]
    for name in names:
        create_pod(cluster, pod_body(name, [container("main", vxpu())]))
    for name in names:
        wait_bound(cluster, name, timeout_s=120)
    return names


def test_the_extender_relists_after_compaction_and_an_api_server_restart(cluster: ControlPlane) -> None:
    clear_pods(cluster)
    whole_device_pods(cluster, "before")  # every device is now held
    extender = cluster.processes["flexai-extender"]
    log_before = extender.log.read_text(errors="replace")
    extender.signal(signal.SIGSTOP)  # it misses everything from here on
    # kube-scheduler exits when it cannot renew its leader Lease while the API server is down (in a cluster its
    # pod restarts): stop it first and start it again after, as its pod would.
    cluster.processes["kube-scheduler"].stop()
    try:
        # A stopped process still receives into its socket buffer: events sent before the restart (the old API
        # server's deletes, or the bookmark it sends its watchers as it shuts down) would reach the extender when it
        # resumes. So the API server goes first, and etcd's revision moves on before the new one starts: its watch
        # cache begins past anything the extender saw.
        cluster.stop_apiserver()
        cluster.etcd_bump_revision()
        cluster.start_apiserver()
        clear_pods(cluster)  # the DELETE events it would need, on the new API server only
        cluster.etcd_compact()  # and etcd's history before now is gone
    finally:
        extender.signal(signal.SIGCONT)
        cluster.start_scheduler(cluster.extender_ports[0])
    # Resuming from its old resourceVersion is impossible now: only a re-list tells it the devices are free.
    whole_device_pods(cluster, "after")
    relisted = extender.log.read_text(errors="replace")[len(log_before):]
    assert "410" in relisted and "listing again" in relisted, relisted[-2000:]
