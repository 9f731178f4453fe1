"""Remote XPU on Kubernetes, end to end against the fake API server: one node without devices and two with sim
devices (their agents serving remote leases through their gateways), the webhook, and the flexai scheduler
through the Hi Scheduler. Placement is local first, then the nearest node by topology labels; the lease token
reaches the pod only through its Secret (owned by the pod); a real client calls the worker through the
gateway with TLS; the slice, the worker and the Secret go when the pod goes."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from flexai.hi import HiConfig
from flexai.k8s import names
from flexai.k8s.agent import NodeAgent
from flexai.k8s.apiclient import KubeClient
from flexai.k8s.cluster import KubeCluster, PodRequestError, pod_demand
from flexai.k8s.extender import Extender
from flexai.k8s.leases import RemoteLeases
from flexai.k8s.service import SchedulerService
from flexai.k8s.webhook import inspect_pod
from flexai.node.devices import discover
from flexai.remote.attach import attach
from tests.fake_apiserver import FakeApiServer
from tests.k8s_objects import FakeApi, node, pod
from tests.pool_helpers import wait_for
from tests.test_k8s_end_to_end import admit
from tests.test_remote_support import certs  # noqa: F401  (fixture)

ZONE, RACK = names.LABEL_ZONE, names.LABEL_RACK
TOPOLOGY = {"cpu-1": ("zone-a", "rack-1"), "gpu-1": ("zone-a", "rack-1"), "gpu-2": ("zone-b", "rack-2")}


def remote_pod(name: str, share: int = 300, memory_mib: int = 4096) -> dict:
    limits = {names.RESOURCE_REMOTE: "1", names.RESOURCE_SHARE: str(share), names.RESOURCE_MEMORY: str(memory_mib)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "annotations": {}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "python",
                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": limits},
                }
            ]
        },
        "status": {"phase": "Pending"},
    }


# ---------------------------------------------------------------------- reading remote pods


def test_webhook_routes_a_remote_pod_and_gives_it_the_endpoint_and_a_secret_reference() -> None:
    admitted = admit(remote_pod("w"))
    assert admitted["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert admitted["metadata"]["labels"][names.LABEL_REMOTE] == "true"
    limits = admitted["spec"]["containers"][0]["resources"]["limits"]
    assert names.RESOURCE_VXPU not in limits and limits[names.RESOURCE_REMOTE] == "1"
    secret = admitted["metadata"]["annotations"][names.ANNOTATION_LEASE_SECRET]
    env = {e["name"]: e for e in admitted["spec"]["containers"][0]["env"]}
    endpoint = env["FLEXAI_REMOTE_ENDPOINT"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert endpoint == f"metadata.annotations['{names.ANNOTATION_REMOTE_ENDPOINT}']"
    assert env["FLEXAI_LEASE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "token"}}
    assert all("value" not in e for e in env.values())  # nothing secret is written in the spec
    again = inspect_pod(admitted)  # reinvoked: the same Secret name, nothing added twice
    assert not again.errors and not any("env" in op["path"] or "lease-secret" in op["path"] for op in again.patch)
    bad = remote_pod("b")
    bad["spec"]["containers"][0]["resources"]["limits"][names.RESOURCE_VXPU] = "1"
    assert "without" in inspect_pod(bad).errors[0] or "only" in inspect_pod(bad).errors[0]
    two = remote_pod("t")
    two["spec"]["containers"][0]["resources"]["limits"][names.RESOURCE_REMOTE] = "2"
    assert any("allowed: 1" in e for e in inspect_pod(two).errors)
    demand = pod_demand(admitted)
    assert demand is not None and demand.remote and (demand.count, demand.share_milli, demand.cpu_milli) == (1, 300, 0)
    with pytest.raises(PodRequestError, match="vxpu-remote"):
        pod_demand(bad)


def test_without_hi_the_slice_goes_local_first_then_to_the_nearest_rack() -> None:
    """The extender on its own (``--no-hi``): the remote rule at prioritize and bind."""
    cluster = KubeCluster()
    nodes = [node("gpu-1", 1), node("gpu-2", 1), {"metadata": {"name": "cpu-1", "annotations": {}}, "status": {}}]
    for n in nodes:
        zone, rack = TOPOLOGY[n["metadata"]["name"]]
        n["metadata"]["labels"] = {ZONE: zone, RACK: rack}
        raw = n["metadata"]["annotations"].get(names.ANNOTATION_INVENTORY)
        if raw:
            inventory = json.loads(raw) | {"remote_endpoint": f"tls://{n['metadata']['name']}:8471"}
            n["metadata"]["annotations"][names.ANNOTATION_INVENTORY] = json.dumps(inventory)
        cluster.upsert_node(n)
    pods = [remote_pod("a"), remote_pod("b", 700), remote_pod("c")]
    api = FakeApi(pods, watch=cluster.upsert_pod)
    extender = Extender(cluster, api)
    everywhere = ["cpu-1", "gpu-1", "gpu-2"]

    def place(p: dict, candidates: list[str], node_name: str) -> names.RemotePlacement:
        assert extender.filter({"Pod": p, "NodeNames": candidates})["NodeNames"] == candidates
        extender.prioritize({"Pod": p, "NodeNames": candidates})
        meta = p["metadata"]
        answer = extender.bind(
            {"PodName": meta["name"], "PodNamespace": "default", "PodUID": meta["uid"], "Node": node_name}
        )
        assert answer == {"Error": ""}, answer
        return names.RemotePlacement.from_json(
            api.pods[meta["name"]]["metadata"]["annotations"][names.ANNOTATION_REMOTE]
        )

    scores = {s["Host"]: s["Score"] for s in extender.prioritize({"Pod": pods[0], "NodeNames": everywhere})}
    assert scores == {"gpu-1": 10, "gpu-2": 10, "cpu-1": 7}  # local slices first, then the same rack
    first = place(pods[0], ["cpu-1"], "cpu-1")
    assert (first.node, first.client, first.endpoint) == ("gpu-1", "cpu-1", "tls://gpu-1:8471")  # same rack
    assert first.lease == names.lease_id_of("uid-a")
    second = place(pods[1], ["gpu-1"], "gpu-1")  # gpu-1 has 700 free: local
    assert (second.node, second.client) == ("gpu-1", "gpu-1")
    third = place(pods[2], ["cpu-1"], "cpu-1")  # gpu-1 is full: the other zone
    assert third.node == "gpu-2"
    state = cluster.state
    assert state is not None
    assert int(state.free_share_milli[cluster.index_of["gpu-1"], 0]) == 0
    cluster.delete_pod("uid-b")
    assert int(state.free_share_milli[cluster.index_of["gpu-1"], 0]) == 700


# ---------------------------------------------------------------------- end to end


class Cluster:
    def __init__(self, cert: str, key: str) -> None:
        self.server = FakeApiServer()
        self.server.start()
        self.agents: dict[str, NodeAgent] = {}
        self.service: SchedulerService | None = None
        self.state = Path(tempfile.mkdtemp(dir="/tmp", prefix="flexai-remote-"))
        for name, (zone, rack) in TOPOLOGY.items():
            self.server.add_node(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": {ZONE: zone, RACK: rack}, "annotations": {}},
                    "status": {"allocatable": {"cpu": "64", "memory": "256Gi"}},
                }
            )
            if name == "cpu-1":
                continue  # no devices, no agent
            backend, devices = discover("sim:1xA100-80GB")
            remote = RemoteLeases(
                KubeClient(self.server.url), name, backend, self.state / name, listen="127.0.0.1:0",
                tls_cert=cert, tls_key=key, ca_file=cert, allow=["tests.test_remote_support:*"], ttl_s=5.0,
                interval_s=3600.0,
            )  # fmt: skip
            agent = NodeAgent(
                KubeClient(self.server.url), name, backend, devices, socket_dir=str(self.state / f"{name}-dp"),
                health_interval_s=None, remote=remote,
            )  # fmt: skip
            (self.state / f"{name}-dp").mkdir()
            agent.start()
            self.agents[name] = agent
        config = HiConfig(normal_min_runtime_s=0.0, preempt_backoff_s=0.0)
        self.service = SchedulerService(KubeClient(self.server.url), leader_election=False, hi_config=config)
        self.service.start()
        assert self.service.wait_synced(10)

        def known() -> bool:
            with self.service.extender.lock:
                cluster = self.service.cluster
                built = cluster.state is not None
                return built and len(cluster.index_of) == 2 and cluster.labels_of("cpu-1").get(RACK) == "rack-1"

        wait_for(known)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        for agent in self.agents.values():
            agent.stop()
        self.server.stop()

    def settle(self) -> None:
        def same() -> bool:
            with self.server.lock:
                want = {p["metadata"]["uid"]: p["spec"].get("nodeName") or "" for p in self.server.pods.values()}
            assert self.service is not None
            with self.service.extender.lock:
                have = {k: r.node for k, r in self.service.cluster.pods.items()}
            return want == have

        wait_for(same, timeout_s=10)

    def schedule(self, p: dict, candidates: list[str]) -> str:
        """kube-scheduler's part for one pod whose own filters passed ``candidates``: filter, prioritize, bind."""
        assert self.service is not None
        extender = self.service.extender
        self.server.add_pod(p)
        self.settle()
        stored = self.server.pods[f"default/{p['metadata']['name']}"]
        passed = extender.filter({"Pod": stored, "NodeNames": candidates})["NodeNames"]
        assert passed, f"{p['metadata']['name']} fits nowhere"
        scores = extender.prioritize({"Pod": stored, "NodeNames": passed})
        best = max(scores, key=lambda s: (s["Score"], -passed.index(s["Host"])))["Host"]
        meta = p["metadata"]
        answer = extender.bind(
            {"PodName": meta["name"], "PodNamespace": "default", "PodUID": meta["uid"], "Node": best}
        )
        assert answer == {"Error": ""}, answer
        self.settle()
        return best

    def remote_of(self, name: str) -> names.RemotePlacement:
        raw = self.server.pods[f"default/{name}"]["metadata"]["annotations"][names.ANNOTATION_REMOTE]
        return names.RemotePlacement.from_json(raw)

    def free_share(self, node_name: str) -> int:
        assert self.service is not None
        with self.service.extender.lock:
            cluster = self.service.cluster
            state = cluster.state
            assert state is not None
            return int(state.free_share_milli[cluster.index_of[node_name]].sum())


@pytest.fixture
def kube(certs):  # noqa: ANN001, ANN201, F811
    cluster = Cluster(*certs)
    yield cluster
    cluster.stop()


def test_remote_pods_end_to_end(kube: Cluster, certs) -> None:  # noqa: F811
    server = kube.server
    # Local first: a pod that runs on gpu-1 gets a slice of gpu-1.
    assert kube.schedule(admit(remote_pod("r-local")), ["gpu-1"]) == "gpu-1"
    local = kube.remote_of("r-local")
    assert (local.node, local.client) == ("gpu-1", "gpu-1")
    # On gpu-2 too, although the Hi Scheduler packs onto gpu-1: the bind moves its slice to the local one.
    assert kube.schedule(admit(remote_pod("r-two")), ["gpu-2"]) == "gpu-2"
    two = kube.remote_of("r-two")
    assert (two.node, two.client) == ("gpu-2", "gpu-2")
    assert kube.service is not None and kube.service.extender.bridge is not None
    with kube.service.extender.lock:  # Hi's ledger follows: the slice is on gpu-2 there too
        hi = kube.service.extender.bridge.hi
        assert hi is not None and hi.running["uid-r-two"].placement.node_index == kube.service.cluster.index_of["gpu-2"]
    # A pod on the node without devices: the nearest node with a free slice (same rack) over gpu-2 (other zone).
    assert kube.schedule(admit(remote_pod("r-cpu")), ["cpu-1"]) == "cpu-1"
    near = kube.remote_of("r-cpu")
    assert (near.node, near.client) == ("gpu-1", "cpu-1")
    # gpu-1 full (a plain pod takes the rest): a pod on gpu-1 goes remote, to gpu-2.
    kube.schedule(pod("fill", 1, 400, 1024, cpu="1", mem="1Gi") | {}, ["gpu-1"])
    assert kube.free_share("gpu-1") == 0
    assert kube.schedule(admit(remote_pod("r-far")), ["gpu-1"]) == "gpu-1"
    far = kube.remote_of("r-far")
    assert (far.node, far.client) == ("gpu-2", "gpu-1")
    assert kube.free_share("gpu-2") == 400

    # The agents start the workers and write each pod's Secret, owned by the pod.
    for agent in kube.agents.values():
        assert agent.remote is not None
        agent.remote.sync()
    secrets = {}
    for name in ("r-local", "r-cpu", "r-far"):
        stored = server.pods[f"default/{name}"]
        secret_name = stored["metadata"]["annotations"][names.ANNOTATION_LEASE_SECRET]
        secret = server.secrets[f"default/{secret_name}"]
        assert secret["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
        secrets[name] = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert secrets[name]["token"].startswith(names.lease_id_of(stored["metadata"]["uid"]) + ".")
    # The token is in the Secrets only: not in any pod, binding or node.
    with server.lock:
        seen = json.dumps([list(server.pods.values()), server.bindings, list(server.nodes.values())])
    assert not any(s["token"] in seen or s["token"].split(".")[2] in seen for s in secrets.values())

    # The pod on cpu-1 calls its slice as its environment says (endpoint annotation, Secret's token and CA).
    gpu1 = kube.agents["gpu-1"].remote
    assert gpu1 is not None
    wait_for(lambda: gpu1.ready(near.lease), timeout_s=20)
    stored = server.pods["default/r-cpu"]
    endpoint = stored["metadata"]["annotations"][names.ANNOTATION_REMOTE_ENDPOINT]
    assert endpoint == gpu1.endpoint
    with attach(endpoint, secrets["r-cpu"]["token"], secrets["r-cpu"]["ca.crt"]) as xpu:
        net = xpu.create("tests.test_remote_support:build", scale=2.0)
        x = np.arange(6, dtype=np.float32)
        np.testing.assert_array_equal(net(x), x * 2)
        env = net.call("echo", "ok")
        assert env == "ok"
    # Another lease's token is refused by this worker.
    from flexai.remote import AuthError, RemoteError

    with pytest.raises((AuthError, RemoteError, OSError)):
        with attach(
            endpoint, secrets["r-local"]["token"].replace(local.lease, near.lease, 1), secrets["r-cpu"]["ca.crt"]
        ) as bad:
            bad.create("tests.test_remote_support:build")

    # The pod goes: its slice returns, its worker stops, its Secret is gone.
    before = kube.free_share("gpu-1")
    process = gpu1.leases[near.lease].process
    assert process is not None and process.poll() is None
    server.delete_pod("default", "r-cpu")
    kube.settle()
    assert kube.free_share("gpu-1") == before + 300
    gpu1.sync()
    assert near.lease not in gpu1.leases and process.poll() is not None
    secret_name = stored["metadata"]["annotations"][names.ANNOTATION_LEASE_SECRET]
    assert f"default/{secret_name}" not in server.secrets
    assert local.lease in gpu1.leases  # the others keep theirs
    assert kube.service is not None
    bridge = kube.service.extender.bridge
    assert bridge is not None and bridge.hi is not None
    with kube.service.extender.lock:
        bridge.sync()  # what the next filter does first
        assert "uid-r-cpu" not in bridge.hi.running and "uid-r-local" in bridge.hi.running
        assert int(bridge.hi.state.free_share_milli[kube.service.cluster.index_of["gpu-1"]].sum()) == before + 300
