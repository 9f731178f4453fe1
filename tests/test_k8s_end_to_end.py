"""End to end without a control plane: a fake API server, the flexai scheduler (extender), the admission
webhook, and two node agents on sim devices with their device plugins over real gRPC. 60 pods with mixed
shares, a third written in HAMi's names, are all bound, none over capacity, and every Allocate answer
matches the pod's placement."""

from __future__ import annotations

import base64
import json
import tempfile

import grpc

from flexai.k8s import names
from flexai.k8s.agent import NodeAgent
from flexai.k8s.apiclient import KubeClient
from flexai.k8s.deviceplugin import api_pb2, api_pb2_grpc
from flexai.k8s.service import SchedulerService
from flexai.k8s.webhook import review
from flexai.node.devices import discover
from tests.fake_apiserver import FakeApiServer
from tests.k8s_objects import apply_json_patch, hami_pod, pod
from tests.pool_helpers import wait_for


def admit(the_pod: dict) -> dict:
    request = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "r-" + the_pod["metadata"]["name"],
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": the_pod,
        },
    }
    answer = review(request, "mutate")["response"]
    assert answer["allowed"], answer
    if "patch" in answer:
        the_pod = apply_json_patch(the_pod, json.loads(base64.b64decode(answer["patch"])))
    assert review({**request, "request": {**request["request"], "object": the_pod}}, "validate")["response"]["allowed"]
    return the_pod


def test_sixty_pods_bound_and_allocated_as_placed() -> None:
    server = FakeApiServer()
    server.start()
    agents = []
    service = SchedulerService(KubeClient(server.url), leader_election=False)
    try:
        for name in ("node-a", "node-b"):
            server.add_node(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "annotations": {}},
                    "status": {"allocatable": {"cpu": "128", "memory": "1024Gi"}},
                }
            )
            backend, devices = discover("sim:16xA100-80GB")
            agent = NodeAgent(
                KubeClient(server.url),
                name,
                backend,
                devices,
                socket_dir=tempfile.mkdtemp(dir="/tmp"),
                health_interval_s=None,
            )
            agent.start()
            agents.append(agent)
        service.start()
        assert service.wait_synced(10)

        def both_nodes_known() -> bool:
            with service.extender.lock:
                return service.cluster.state is not None and len(service.cluster.index_of) == 2

        wait_for(both_nodes_known)

        shares = [100, 200, 300, 500, 700, 1000]
        pods = []
        for i in range(60):
            share = shares[i % len(shares)]
            if i % 3 == 0:
                the_pod = hami_pod(f"p{i:02d}", share // 10, 4096)
            else:
                the_pod = pod(f"p{i:02d}", 1, share, 4096)
            pods.append(admit(the_pod))
        assert all(p["spec"]["schedulerName"] == names.SCHEDULER_NAME for p in pods)
        assert sum(names.RESOURCE_VXPU in p["spec"]["containers"][0]["resources"]["limits"] for p in pods) == 60
        # 60 pods ask for 28 devices' worth of share; the two nodes have 32 devices.
        for p in pods:
            server.add_pod(p)
        wait_for(lambda: len(service.cluster.pods) == 60)
        bound = 0
        for p in pods:
            extender = service.extender
            passed = extender.filter({"Pod": p, "NodeNames": ["node-a", "node-b"]})["NodeNames"]
            assert passed, f"{p['metadata']['name']} fits nowhere"
            scores = extender.prioritize({"Pod": p, "NodeNames": passed})
            best = max(scores, key=lambda s: (s["Score"], -passed.index(s["Host"])))["Host"]
            meta = p["metadata"]
            result = extender.bind(
                {"PodName": meta["name"], "PodNamespace": "default", "PodUID": meta["uid"], "Node": best}
            )
            assert result == {"Error": ""}
            bound += 1
        share_used: dict[tuple[str, str], int] = {}
        memory_used: dict[tuple[str, str], int] = {}
        for stored in server.pods.values():
            raw = stored["metadata"]["annotations"].get(names.ANNOTATION_PLACEMENT)
            if raw:
                placement = names.Placement.from_json(raw)
                assert placement.node == stored["spec"]["nodeName"]
                for s in placement.slices:
                    key = (placement.node, s.uuid)  # sim devices repeat their UUIDs from node to node
                    share_used[key] = share_used.get(key, 0) + s.share_milli
                    memory_used[key] = memory_used.get(key, 0) + s.memory_mib
        assert max(share_used.values()) <= 1000 and max(memory_used.values()) <= 81920
        assert bound == 60 == sum(1 for s in server.pods.values() if s["spec"].get("nodeName"))
        assert sum(share_used.values()) == sum(shares[i % len(shares)] for i in range(60))

        # The kubelet of each node asks its agent's device plugin, as it would when starting the pods.
        for agent in agents:
            with grpc.insecure_channel(f"unix://{agent.plugin.socket_path}") as channel:
                stub = api_pb2_grpc.DevicePluginStub(channel)
                for pending in agent.pending_placements():
                    uuids = [s.uuid for s in pending.placement.slices]
                    preferred = stub.GetPreferredAllocation(
                        api_pb2.PreferredAllocationRequest(
                            container_requests=[
                                api_pb2.ContainerPreferredAllocationRequest(
                                    available_deviceIDs=[f"{u}::{k}" for u in uuids for k in range(10)],
                                    allocation_size=len(uuids),
                                )
                            ]
                        )
                    )
                    chosen = list(preferred.container_responses[0].deviceIDs)
                    answer = stub.Allocate(
                        api_pb2.AllocateRequest(
                            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]
                        )
                    )
                    envs = answer.container_responses[0].envs
                    slices = json.loads(envs["FLEXAI_SLICES"])
                    assert [s["uuid"] for s in slices] == uuids
                    assert [s["share_milli"] for s in slices] == [g.share_milli for g in pending.placement.slices]
                    assert envs["FLEXAI_JOB_ID"] == pending.pod
                    assert envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "4096m"
    finally:
        service.stop()
        for agent in agents:
            agent.stop()
        server.stop()
