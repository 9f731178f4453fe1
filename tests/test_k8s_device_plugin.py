"""The device plugin over real gRPC on unix sockets, against a fake kubelet in this process.

The fake kubelet serves ``Registration`` on ``<dir>/kubelet.sock``; the tests then talk to the plugin's
``<dir>/flexai.sock`` as the kubelet would. Waits are bounded polls of real sockets (the plugin's watcher
polls every 20 ms here).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import asdict

import grpc
import pytest

from flexai.k8s import names
from flexai.k8s.deviceplugin import api_pb2, api_pb2_grpc
from flexai.k8s.deviceplugin.plugin import (
    HEALTHY,
    UNHEALTHY,
    AllocateExtras,
    DevicePluginServer,
    MountSpec,
    PendingPlacement,
    nvidia_extras,
    parse_slot_id,
    slot_id,
)
from flexai.node.devices import DeviceBackend, DeviceInfo, discover
from flexai.node.environment import slice_environment

NODE = "node-a"
GPU0 = "SIM-A100-0"
GPU1 = "SIM-A100-1"
WAIT_S = 5.0


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration service on ``<dir>/kubelet.sock``; records every RegisterRequest."""

    def __init__(self, socket_dir: str) -> None:
        self.path = os.path.join(socket_dir, "kubelet.sock")
        self.requests: queue.Queue[api_pb2.RegisterRequest] = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.path}")
        self.server.start()

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:  # noqa: N802
        self.requests.put(request)
        return api_pb2.Empty()

    def next_request(self) -> api_pb2.RegisterRequest:
        return self.requests.get(timeout=WAIT_S)

    def stop(self) -> None:
        self.server.stop(grace=None).wait(timeout=WAIT_S)
        if os.path.lexists(self.path):
            os.unlink(self.path)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="fx", dir="/tmp")  # unix socket paths must stay under ~107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sim() -> tuple[DeviceBackend, list[DeviceInfo]]:
    return discover("sim:2xA100-80GB")


@pytest.fixture
def pods() -> dict[str, PendingPlacement]:
    """The dict-backed placement lookup: pods bound to this node with a placement, in bind order."""
    return {}


@pytest.fixture
def kubelet(socket_dir: str) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(socket_dir)
    yield fake
    fake.stop()


@pytest.fixture
def make_plugin(
    socket_dir: str, sim: tuple[DeviceBackend, list[DeviceInfo]], pods: dict[str, PendingPlacement]
) -> Iterator[Callable[..., DevicePluginServer]]:
    started: list[DevicePluginServer] = []

    def make(**kwargs: object) -> DevicePluginServer:
        backend, devices = sim
        options: dict[str, object] = {
            "placement_lookup": lambda: list(pods.values()),
            "socket_dir": socket_dir,
            "node_name": NODE,
            "poll_interval_s": 0.02,
            "register_timeout_s": 2.0,
        }
        options.update(kwargs)
        plugin = DevicePluginServer(backend, devices, **options)  # type: ignore[arg-type]
        plugin.start()
        started.append(plugin)
        return plugin

    yield make
    for plugin in started:
        plugin.stop()


@pytest.fixture
def plugin(kubelet: FakeKubelet, make_plugin: Callable[..., DevicePluginServer]) -> DevicePluginServer:
    started = make_plugin()
    kubelet.next_request()
    return started


@pytest.fixture
def stub(plugin: DevicePluginServer) -> Iterator[api_pb2_grpc.DevicePluginStub]:
    """A client on the plugin's socket, as the kubelet dials it after Register."""
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)


def place(pods: dict[str, PendingPlacement], pod: str, *slices: tuple[int, int, int], node: str = NODE) -> None:
    """Record the extender's placement of ``pod``: slices as (device index, share_milli, memory_mib)."""
    grants = tuple(names.SliceGrant(d, f"SIM-A100-{d}", share, mib) for d, share, mib in slices)
    uid = f"uid-{pod.replace('/', '-')}"
    pods[uid] = PendingPlacement(pod=pod, uid=uid, placement=names.Placement(node=node, slices=grants))


def allocate(stub: api_pb2_grpc.DevicePluginStub, *ids: str) -> api_pb2.ContainerAllocateResponse:
    request = api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))])
    response = stub.Allocate(request, timeout=WAIT_S)
    assert len(response.container_responses) == 1
    return response.container_responses[0]


def prefer(
    stub: api_pb2_grpc.DevicePluginStub, available: list[str], size: int, must: tuple[str, ...] = ()
) -> list[str]:
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=list(must), allocation_size=size
            )
        ]
    )
    return list(stub.GetPreferredAllocation(request, timeout=WAIT_S).container_responses[0].deviceIDs)


def eventually(condition: Callable[[], bool]) -> bool:
    """Poll ``condition`` every 10 ms for at most WAIT_S (the plugin updates its counters after Register returns)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def all_slots(*uuids: str) -> list[str]:
    return [slot_id(u, k) for u in uuids for k in range(10)]


# -- registration and options ----------------------------------------------------------------------------------


def test_registers_with_the_kubelet_after_serving_its_socket(
    kubelet: FakeKubelet, make_plugin: Callable[..., DevicePluginServer], socket_dir: str
) -> None:
    plugin = make_plugin()
    request = kubelet.next_request()
    assert request.version == "v1beta1"
    assert request.endpoint == names.DEVICE_PLUGIN_SOCKET == "flexai.sock"
    assert request.resource_name == names.RESOURCE_VXPU
    assert request.options.get_preferred_allocation_available is True
    assert request.options.pre_start_required is False
    assert plugin.socket_path == os.path.join(socket_dir, "flexai.sock")
    assert os.path.exists(plugin.socket_path)
    assert plugin.registered and plugin.registrations == 1
    plugin.stop()
    assert not os.path.exists(plugin.socket_path)


def test_options_and_pre_start(stub: api_pb2_grpc.DevicePluginStub) -> None:
    options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=WAIT_S)
    assert options.get_preferred_allocation_available and not options.pre_start_required
    assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=[f"{GPU0}::0"]), timeout=WAIT_S) == (
        api_pb2.PreStartContainerResponse()
    )


# -- ListAndWatch and health -----------------------------------------------------------------------------------


def test_list_and_watch_streams_slots_and_health_changes(
    plugin: DevicePluginServer, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)
    first = next(stream)
    assert [d.ID for d in first.devices] == all_slots(GPU0, GPU1)  # 1000 // 100 slots per device
    assert {d.health for d in first.devices} == {HEALTHY}

    assert plugin.set_health(GPU1, False) is True
    second = next(stream)
    health = {d.ID: d.health for d in second.devices}
    assert {health[i] for i in all_slots(GPU0)} == {HEALTHY}
    assert {health[i] for i in all_slots(GPU1)} == {UNHEALTHY}

    assert plugin.set_health(GPU1, False) is False  # no change, no message
    assert plugin.set_health(GPU1, True) is True
    assert {d.health for d in next(stream).devices} == {HEALTHY}
    stream.cancel()


def test_refresh_health_rereads_the_backend(plugin: DevicePluginServer) -> None:
    plugin.set_health(GPU0, False)
    assert plugin.refresh_health() is True  # sim devices are always healthy
    assert {h for _, h in plugin.virtual_devices()} == {HEALTHY}
    assert plugin.refresh_health() is False


def test_watcher_rereads_health_when_asked(
    kubelet: FakeKubelet, make_plugin: Callable[..., DevicePluginServer]
) -> None:
    plugin = make_plugin(health_interval_s=0.02)
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        stream = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)
        next(stream)
        plugin.set_health(GPU0, False)
        assert UNHEALTHY in {d.health for d in next(stream).devices}
        assert {d.health for d in next(stream).devices} == {HEALTHY}  # the backend says it is healthy again
        stream.cancel()


def test_bad_health_uuid_and_share_step(
    plugin: DevicePluginServer, sim: tuple[DeviceBackend, list[DeviceInfo]], socket_dir: str
) -> None:
    with pytest.raises(ValueError, match="'GPU-nope' is not on this node"):
        plugin.set_health("GPU-nope", False)
    backend, devices = sim
    quarter = DevicePluginServer(backend, devices, placement_lookup=list, share_step_milli=250, socket_dir=socket_dir)
    assert [i for i, _ in quarter.virtual_devices()] == [slot_id(u, k) for u in (GPU0, GPU1) for k in range(4)]
    with pytest.raises(ValueError, match="share_step_milli=0"):
        DevicePluginServer(backend, devices, placement_lookup=list, share_step_milli=0)
    assert parse_slot_id("GPU-a::b::7") == ("GPU-a::b", 7)
    with pytest.raises(ValueError, match="not a flexai slot"):
        parse_slot_id("GPU-a")


# -- Allocate --------------------------------------------------------------------------------------------------


def test_allocate_answers_the_pending_placement_on_those_devices(
    plugin: DevicePluginServer,
    stub: api_pb2_grpc.DevicePluginStub,
    pods: dict[str, PendingPlacement],
    sim: tuple[DeviceBackend, list[DeviceInfo]],
) -> None:
    backend, _ = sim
    place(pods, "default/train", (1, 300, 20480))
    answer = allocate(stub, f"{GPU1}::7")
    expected = slice_environment(
        backend, "default/train", [asdict(s) for s in pods["uid-default-train"].placement.slices]
    )
    assert dict(answer.envs) == expected
    assert answer.envs["FLEXAI_SIM_VISIBLE_DEVICES"] == "1"
    assert answer.envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "20480m"
    assert answer.envs["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert json.loads(answer.envs["FLEXAI_SLICES"]) == [
        {"device": 1, "uuid": GPU1, "share_milli": 300, "memory_mib": 20480}
    ]
    assert not answer.mounts and not answer.devices  # no extras unless configured

    assert dict(allocate(stub, f"{GPU1}::7").envs) == expected  # the kubelet repeating itself gets the same answer
    with pytest.raises(grpc.RpcError) as refused:  # the placement is used up: another slot on GPU1 has no pod
        allocate(stub, f"{GPU1}::8")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_allocate_two_pods_on_one_device_in_bind_order_and_multi_device(
    plugin: DevicePluginServer,
    stub: api_pb2_grpc.DevicePluginStub,
    pods: dict[str, PendingPlacement],
    sim: tuple[DeviceBackend, list[DeviceInfo]],
) -> None:
    backend, _ = sim
    place(pods, "ml/a", (0, 500, 1024))
    place(pods, "ml/b", (0, 200, 0))
    place(pods, "ml/gang", (1, 1000, 0), (0, 400, 4096))
    assert allocate(stub, f"{GPU0}::0").envs["FLEXAI_JOB_ID"] == "ml/a"
    assert allocate(stub, f"{GPU0}::1").envs["FLEXAI_JOB_ID"] == "ml/b"
    gang = allocate(stub, f"{GPU0}::2", f"{GPU1}::0")
    expected = slice_environment(backend, "ml/gang", [asdict(s) for s in pods["uid-ml-gang"].placement.slices])
    assert dict(gang.envs) == expected
    assert gang.envs["FLEXAI_SIM_VISIBLE_DEVICES"] == "1,0"  # the placement's order
    assert gang.envs["CUDA_DEVICE_MEMORY_LIMIT_1"] == "4096m" and "CUDA_DEVICE_MEMORY_LIMIT_0" not in gang.envs


def test_allocate_without_placement_is_refused_clearly(
    plugin: DevicePluginServer, stub: api_pb2_grpc.DevicePluginStub, pods: dict[str, PendingPlacement]
) -> None:
    place(pods, "other/pod", (0, 300, 0), node="node-b")  # another node's pod
    place(pods, "two/devices", (0, 300, 0), (1, 300, 0))  # needs both devices, one slot each
    for ids in ([f"{GPU0}::0"], [f"{GPU0}::0", f"{GPU0}::1"]):
        with pytest.raises(grpc.RpcError) as refused:
            allocate(stub, *ids)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details().startswith(f"no flexai placement for devices {ids[0]}")
    with pytest.raises(grpc.RpcError) as bad:
        allocate(stub, "GPU-unknown::0")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'GPU-unknown::0' is not advertised" in bad.value.details()
    with pytest.raises(grpc.RpcError) as empty:
        allocate(stub)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_allocate_when_the_lookup_fails(kubelet: FakeKubelet, make_plugin: Callable[..., DevicePluginServer]) -> None:
    def broken() -> list[PendingPlacement]:
        raise ConnectionError("API server unreachable")

    plugin = make_plugin(placement_lookup=broken)
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            allocate(api_pb2_grpc.DevicePluginStub(channel), f"{GPU0}::0")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "API server unreachable" in failed.value.details()


def test_allocate_adds_configured_mounts_and_device_nodes(
    kubelet: FakeKubelet, make_plugin: Callable[..., DevicePluginServer], pods: dict[str, PendingPlacement]
) -> None:
    nvidia = nvidia_extras()
    extras = AllocateExtras(
        mounts=(MountSpec("/usr/local/flexai", "/opt/flexai"),),
        device_nodes=nvidia.device_nodes,
        per_device=nvidia.per_device,
    )
    plugin = make_plugin(extras=extras)
    place(pods, "default/infer", (1, 100, 0))
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        answer = allocate(api_pb2_grpc.DevicePluginStub(channel), f"{GPU1}::0")
    assert [(m.container_path, m.host_path, m.read_only) for m in answer.mounts] == [
        ("/usr/local/flexai", "/opt/flexai", True)
    ]
    assert [d.host_path for d in answer.devices] == [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia1",
    ]
    assert {d.permissions for d in answer.devices} == {"rw"}


# -- GetPreferredAllocation ------------------------------------------------------------------------------------


def test_preferred_allocation_follows_a_pending_placement(
    plugin: DevicePluginServer, stub: api_pb2_grpc.DevicePluginStub, pods: dict[str, PendingPlacement]
) -> None:
    place(pods, "default/train", (1, 300, 0))
    available = all_slots(GPU0, GPU1)
    available.remove(f"{GPU1}::0")
    assert prefer(stub, available, 1) == [f"{GPU1}::1"]
    place(pods, "default/gang", (1, 500, 0), (0, 500, 0))
    assert prefer(stub, available, 2) == [f"{GPU1}::1", f"{GPU0}::0"]
    assert prefer(stub, available, 2, must=(f"{GPU0}::4",)) == [f"{GPU1}::1", f"{GPU0}::4"]


def test_preferred_allocation_packs_on_the_fullest_device(
    plugin: DevicePluginServer, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    available = all_slots(GPU0, GPU1)
    for used in (f"{GPU1}::0", f"{GPU1}::1", f"{GPU0}::0"):
        available.remove(used)
    assert prefer(stub, available, 2) == [f"{GPU1}::2", f"{GPU1}::3"]
    assert prefer(stub, available, 9) == [slot_id(GPU1, k) for k in range(2, 10)] + [f"{GPU0}::1"]
    assert prefer(stub, available, 2, must=(f"{GPU0}::5",)) == [f"{GPU0}::5", f"{GPU0}::1"]


# -- kubelet restart -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wipe_plugin_socket", [True, False])
def test_registers_again_after_a_kubelet_restart(
    make_plugin: Callable[..., DevicePluginServer],
    socket_dir: str,
    pods: dict[str, PendingPlacement],
    wipe_plugin_socket: bool,
) -> None:
    first = FakeKubelet(socket_dir)
    try:
        plugin = make_plugin()
        first.next_request()
    finally:
        first.stop()  # the kubelet goes away with its socket ...
    if wipe_plugin_socket:
        os.unlink(plugin.socket_path)  # ... and, starting again, wipes the plugin sockets (a real kubelet does)
    second = FakeKubelet(socket_dir)
    try:
        request = second.next_request()
        assert request.endpoint == "flexai.sock" and request.resource_name == names.RESOURCE_VXPU
        assert eventually(lambda: plugin.registrations == 2 and plugin.registered)
        assert os.path.exists(plugin.socket_path)  # served again before registering
        place(pods, "default/after", (0, 300, 0))
        with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            assert len(next(stub.ListAndWatch(api_pb2.Empty(), timeout=WAIT_S)).devices) == 20
            assert allocate(stub, f"{GPU0}::3").envs["FLEXAI_JOB_ID"] == "default/after"
    finally:
        second.stop()


def test_registers_when_the_kubelet_appears_later(
    make_plugin: Callable[..., DevicePluginServer], socket_dir: str
) -> None:
    plugin = make_plugin()
    assert not plugin.registered and os.path.exists(plugin.socket_path)
    late = FakeKubelet(socket_dir)
    try:
        assert late.next_request().version == "v1beta1"
        assert eventually(lambda: plugin.registrations == 1 and plugin.registered)
    finally:
        late.stop()


# -- pods with devices in several containers, placed by the extender ------------------------------------------


class MiniKubelet:
    """The kubelet's device manager as far as admitting one pod goes: per container (init containers first),
    the slots an init container held are handed on first (lowest IDs first), the rest are chosen with
    GetPreferredAllocation among the free slots, then Allocate is called for that container alone."""

    def __init__(self, stub: api_pb2_grpc.DevicePluginStub, slots: list[str]) -> None:
        self.stub = stub
        self.free = set(slots)

    def admit(self, containers: list[tuple[str, int, bool]]) -> list[api_pb2.ContainerAllocateResponse]:
        reusable: set[str] = set()
        answers = []
        for _, count, init in containers:
            got = sorted(reusable)[:count]
            if len(got) < count:
                preferred = prefer(self.stub, sorted(self.free | set(got)), count, must=tuple(got))
                got += [d for d in preferred if d in self.free][: count - len(got)]
            self.free -= set(got)
            answers.append(allocate(self.stub, *got))
            reusable = reusable | set(got) if init else reusable - set(got)
        return answers


def placed_by_the_extender(the_pod: dict) -> tuple[PendingPlacement, list[int]]:
    """Filter, prioritize and bind ``the_pod`` with the extender on NODE (the sim devices); its placement."""
    from flexai.k8s.cluster import KubeCluster
    from flexai.k8s.extender import Extender
    from tests.k8s_objects import FakeApi

    inventory = names.Inventory(
        tuple(names.InventoryDevice(i, f"SIM-A100-{i}", "A100", 81920) for i in range(2)), heartbeat=time.time()
    )
    cluster = KubeCluster()
    cluster.upsert_node(
        {
            "metadata": {"name": NODE, "annotations": {names.ANNOTATION_INVENTORY: inventory.to_json()}},
            "status": {"allocatable": {"cpu": "64", "memory": "256Gi"}},
        }
    )
    api = FakeApi([the_pod], watch=cluster.upsert_pod)
    extender = Extender(cluster, api)
    meta = the_pod["metadata"]
    assert extender.filter({"pod": the_pod, "nodenames": [NODE]})["NodeNames"] == [NODE]
    bound = extender.bind({"podName": meta["name"], "podNamespace": "default", "podUID": meta["uid"], "node": NODE})
    assert bound == {"Error": ""}
    state = cluster.state
    assert state is not None
    held = [1000 - int(v) for v in state.free_share_milli[cluster.index_of[NODE], :2]]
    raw = api.pods[meta["name"]]["metadata"]["annotations"][names.ANNOTATION_PLACEMENT]
    return PendingPlacement(f"default/{meta['name']}", meta["uid"], names.Placement.from_json(raw)), held


def multi_container_pod(init: list[int], apps: list[int], share: int) -> dict:
    def container(name: str, count: int) -> dict:
        limits = {names.RESOURCE_VXPU: str(count), names.RESOURCE_SHARE: str(share)}
        return {"name": name, "image": "busybox", "resources": {"limits": limits}}

    return {
        "metadata": {"name": "multi", "namespace": "default", "uid": "uid-multi", "annotations": {}},
        "spec": {
            "schedulerName": names.SCHEDULER_NAME,
            "initContainers": [container(f"init{i}", n) for i, n in enumerate(init)],
            "containers": [container(f"app{i}", n) for i, n in enumerate(apps)],
        },
        "status": {"phase": "Pending"},
    }


@pytest.mark.parametrize(
    ("init", "apps", "held"),
    [
        ([], [1, 1], [500, 500]),  # two app containers: one device each
        ([1], [1, 1], [500, 500]),  # max(1, 1 + 1) = 2 devices; the init container's device goes on to app0
        ([2], [1], [500, 500]),  # max(2, 1) = 2 devices; app0 gets one of the init container's
    ],
    ids=["two-apps", "init-then-two-apps", "init-larger-than-apps"],
)
def test_devices_in_several_containers_are_allocated_container_by_container(
    plugin: DevicePluginServer,
    stub: api_pb2_grpc.DevicePluginStub,
    pods: dict[str, PendingPlacement],
    init: list[int],
    apps: list[int],
    held: list[int],
) -> None:
    pending, ledger = placed_by_the_extender(multi_container_pod(init, apps, 500))
    assert ledger == held  # Kubernetes' effective request: max(largest init container, sum of app containers)
    pods[pending.uid] = pending
    containers = [(f"init{i}", n, True) for i, n in enumerate(init)] + [
        (f"app{i}", n, False) for i, n in enumerate(apps)
    ]
    answers = MiniKubelet(stub, all_slots(GPU0, GPU1)).admit(containers)
    devices = [[s["uuid"] for s in json.loads(a.envs["FLEXAI_SLICES"])] for a in answers]
    assert [len(d) for d in devices] == [n for _, n, _ in containers]
    assert all(a.envs["FLEXAI_JOB_ID"] == "default/multi" for a in answers)
    assert all(s["share_milli"] == 500 for a in answers for s in json.loads(a.envs["FLEXAI_SLICES"]))
    app_devices = [u for d in devices[len(init) :] for u in d]
    assert len(app_devices) == len(set(app_devices))  # app containers never share a slice
    for d in devices[: len(init)]:
        assert set(d) <= {GPU0, GPU1}  # init containers run on the pod's own devices
    if init:
        assert devices[len(init)][0] in devices[0]  # the init container's device is handed on


# -- NVIDIA visibility --------------------------------------------------------------------------------------------


class FakeNvidia(DeviceBackend):
    """Two NVIDIA GPUs, as NVML would list them (no NVML here)."""

    name = "nvidia"
    visibility_variable = "CUDA_VISIBLE_DEVICES"
    uuids = ("GPU-8a1b2c3d-0000-4000-8000-000000000000", "GPU-8a1b2c3d-0000-4000-8000-000000000001")

    def available(self) -> tuple[bool, str]:
        return True, ""

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo("nvidia", i, u, "A100-SXM4-80GB", 81920, True) for i, u in enumerate(self.uuids)]

    def process_memory_mib(self, device: int | DeviceInfo) -> dict[int, int]:
        return {}

    def visibility_env(self, indices: Sequence[int], uuids: Sequence[str]) -> dict[str, str]:
        return {self.visibility_variable: ",".join(uuids)}


@pytest.mark.parametrize("strategy", ["envvar", "cdi-annotations"])
def test_nvidia_containers_are_given_their_gpus_by_the_device_list_strategy(
    kubelet: FakeKubelet, socket_dir: str, pods: dict[str, PendingPlacement], strategy: str
) -> None:
    backend = FakeNvidia()
    gpu = backend.uuids[1]
    plugin = DevicePluginServer(
        backend,
        backend.devices(),
        placement_lookup=lambda: list(pods.values()),
        socket_dir=socket_dir,
        node_name=NODE,
        device_list_strategy=strategy,
    )
    plugin.start()
    try:
        kubelet.next_request()
        grant = names.Placement(NODE, (names.SliceGrant(1, gpu, 300, 8192),))
        pods["uid-train"] = PendingPlacement("default/train", "uid-train", grant)
        with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
            answer = allocate(api_pb2_grpc.DevicePluginStub(channel), slot_id(gpu, 4))
    finally:
        plugin.stop()
    assert answer.envs["CUDA_VISIBLE_DEVICES"] == gpu
    if strategy == "envvar":  # for the NVIDIA container runtime, as NVIDIA's device plugin does by default
        assert answer.envs["NVIDIA_VISIBLE_DEVICES"] == gpu and not answer.annotations
    else:  # for a CDI-enabled runtime: the CDI device of that GPU (from `nvidia-ctk cdi generate`)
        assert "NVIDIA_VISIBLE_DEVICES" not in answer.envs
        assert dict(answer.annotations) == {"cdi.k8s.io/flexai_uid-train-0": f"nvidia.com/gpu={gpu}"}


def test_the_device_list_strategy_is_checked(sim: tuple[DeviceBackend, list[DeviceInfo]]) -> None:
    from typer.testing import CliRunner

    from flexai.cli.main import app

    backend, devices = sim
    with pytest.raises(ValueError, match="device_list_strategy='volume-mounts' is not allowed"):
        DevicePluginServer(backend, devices, placement_lookup=list, device_list_strategy="volume-mounts")
    done = CliRunner().invoke(app, ["k8s", "agent", "--node-name", "n1", "--device-list-strategy", "volume-mounts"])
    assert done.exit_code == 2 and "--device-list-strategy 'volume-mounts' is not allowed" in done.output
