"""flexai's kubelet device plugin (API v1beta1): advertise virtual slots, answer Allocate from placements.

**Slots.** Each physical device is advertised as ``1000 // share_step_milli`` virtual slots with IDs
``"<uuid>::<k>"`` (k = 0, 1, ...) under the extended resource ``flexai.io/vxpu``. A pod asks for
``flexai.io/vxpu: N`` (N devices); the kubelet hands it N slots, so the kubelet's own accounting never lets
more slices onto a device than it has steps.

**Placements.** The scheduler extender records its decision on the pod (``flexai.io/placement``, see
``names.Placement``: the pod's slices, one per device, and their split per container) when it binds it. The
kubelet calls Allocate once per container that asks for ``flexai.io/vxpu`` (init containers first, then the
app containers, each in spec order, one pod at a time), and the AllocateRequest carries only the slot IDs it
chose, so ``Allocate`` finds the pod and the container by those devices. The plugin asks ``placement_lookup()``
for the pods bound to this node that carry a placement and have not started yet (``PendingPlacement``: pod,
uid, placement; the node agent lists them from the API server, in bind order), remembers how many of each
pod's containers it has allocated, and applies this **matching rule** to each container request:

1. every requested ID must be a slot this plugin advertises (else INVALID_ARGUMENT);
2. the next container of a pod whose allocation is under way, when the requested slots are exactly one on
   each of that container's devices;
3. else the first container of a pod not started yet, same condition, the first pod in bind order winning
   (two pods placed on the same devices are served in the order they were bound, as HAMi does);
4. else a container already allocated with exactly the same slot IDs is answered again (the kubelet repeats
   an Allocate it did not record, e.g. after its own restart);
5. else the next container of a pod under way when the slots are as many as that container's slices and all
   on the pod's devices (the kubelet hands an init container's devices on to the containers after it in
   its own order);
6. anything else is refused with FAILED_PRECONDITION ``no flexai placement for devices ...``.

Two pods placed on the same devices with different shares can be swapped if the kubelet admits them out of
bind order; the extender should avoid binding two such pods at once on one node.

``GetPreferredAllocation`` steers the kubelet to those devices: for the container that rule 2 or 3 would
match next (the slots it must include on that container's devices) it prefers one slot on each of the
container's devices; else it packs, taking slots from the devices with the most slots already in use
(fewest distinct devices).

**Allocate's answer** for one container: ``envs`` = ``slice_environment(backend, job_id, slices)`` with job id
= the pod's ``namespace/name`` (its uid when the name is empty) and the container's slices in their order,
each slice's ``device`` index read from this node's device list by UUID (UUIDs are stable, indices may move);
plus the mounts and device nodes of ``AllocateExtras`` (none by default; ``nvidia_extras()`` adds
``/dev/nvidia*``). On NVIDIA devices the container runtime is told which GPUs to give the container by the
**device-list strategy**, as NVIDIA's own device plugin does: ``envvar`` (default) sets
``NVIDIA_VISIBLE_DEVICES=<uuid>,...`` for the NVIDIA container runtime; ``cdi-annotations`` sets the
annotation ``cdi.k8s.io/flexai_<id>`` (``<id>``: the pod's uid and the container's number) to
``nvidia.com/gpu=<uuid>,...`` for a CDI-enabled runtime (the CDI spec from ``nvidia-ctk cdi generate``).
``CUDA_VISIBLE_DEVICES`` names the same UUIDs in both.

**Lifecycle.** ``start()`` serves ``<socket_dir>/flexai.sock``, registers at ``<socket_dir>/kubelet.sock``
and starts a watcher thread that polls the kubelet socket's identity (device, inode, ctime) every
``poll_interval_s``: when the kubelet restarts (its socket is removed and created again; it also wipes the
plugin sockets) the plugin serves a fresh socket and registers again. A failed registration is retried
every ``register_retry_s``. ``stop()`` ends it all and removes the socket.

**Health.** ``ListAndWatch`` sends the full slot list, then a new list whenever health changes:
``set_health(uuid, healthy)`` (the node agent's own checks) or ``refresh_health()`` (re-read the backend;
also run by the watcher every ``health_interval_s`` when given).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc

from flexai.k8s import names
from flexai.k8s.deviceplugin import api_pb2, api_pb2_grpc
from flexai.node.devices import DeviceBackend, DeviceInfo, DiscoveryError, one_line
from flexai.node.environment import slice_environment

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins/"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
SLOT_SEPARATOR = "::"
MAX_DEVICE_ID_CHARS = 63
"""The kubelet's limit on a device ID's length."""
MAX_REMEMBERED_ALLOCATIONS = 4096
"""Allocated containers the plugin remembers (oldest forgotten first); far more than a node starts at once."""
DEVICE_LIST_STRATEGIES = ("envvar", "cdi-annotations")
"""How the NVIDIA container runtime learns a container's GPUs (the names of NVIDIA's device plugin)."""
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
CDI_PLUGIN_NAME = "flexai"
CDI_KIND = "nvidia.com/gpu"
"""The CDI device kind of NVIDIA GPUs (``nvidia-ctk cdi generate`` names each GPU by its UUID in it)."""


@dataclass(frozen=True)
class PendingPlacement:
    """A pod bound to this node with a flexai placement, not started yet (what ``placement_lookup`` lists)."""

    pod: str
    """``namespace/name``: the job id the slices are granted to."""
    uid: str
    placement: names.Placement

    @property
    def key(self) -> str:
        return self.uid or self.pod

    @property
    def job_id(self) -> str:
        return self.pod or self.uid


PlacementLookup = Callable[[], Iterable[PendingPlacement]]
"""Lists the pending placements on this node, oldest bind first; may raise if the API server cannot be read."""


@dataclass(frozen=True)
class MountSpec:
    container_path: str
    host_path: str
    read_only: bool = True


@dataclass(frozen=True)
class DeviceNode:
    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class AllocateExtras:
    """What Allocate adds beside the environment: mounts and device nodes, fixed or per allocated device."""

    mounts: tuple[MountSpec, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    per_device: Callable[[DeviceInfo], Sequence[DeviceNode]] | None = None


def nvidia_extras() -> AllocateExtras:
    """``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools`` and ``/dev/nvidia<index>`` per device.

    Assumes the device's minor number equals its NVML index, true unless the driver was told otherwise.
    Not needed where the NVIDIA container runtime injects the devices itself from the visibility variable.
    """
    fixed = tuple(DeviceNode(p, p) for p in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"))

    def per_device(device: DeviceInfo) -> Sequence[DeviceNode]:
        path = f"/dev/nvidia{device.index}"
        return (DeviceNode(path, path),)

    return AllocateExtras(device_nodes=fixed, per_device=per_device)


def cdi_annotation_key(match: PendingPlacement, number: int) -> str:
    """``cdi.k8s.io/flexai_<id>``: the id names the pod (uid, else name) and the container, within CDI's limit of
    63 characters of letters, digits, ``_``, ``-`` and ``.`` after the prefix (alphanumeric at both ends)."""
    base = "".join(c if c.isalnum() or c in "-." else "-" for c in (match.uid or match.pod))
    suffix = f"-{number}"
    name = f"{CDI_PLUGIN_NAME}_{base}"[: 63 - len(suffix)].rstrip("-._") + suffix
    return CDI_ANNOTATION_PREFIX + name


def slot_id(uuid: str, slot: int) -> str:
    return f"{uuid}{SLOT_SEPARATOR}{slot}"


def parse_slot_id(device_id: str) -> tuple[str, int]:
    """``"<uuid>::<k>"`` -> (uuid, k); raises ``ValueError`` naming the ID for any other form."""
    uuid, sep, slot = device_id.rpartition(SLOT_SEPARATOR)
    if not sep or not uuid or not slot.isdigit():
        raise ValueError(f"device ID {device_id!r} is not a flexai slot: use <uuid>{SLOT_SEPARATOR}<k>")
    return uuid, int(slot)


def _identity(path: str) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of a file, or None when it is absent: a recreated file has a new identity."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


class DevicePluginServer(api_pb2_grpc.DevicePluginServicer):
    """The ``flexai.io/vxpu`` device plugin of one node; see the module docstring for what it answers."""

    def __init__(
        self,
        backend: DeviceBackend,
        devices: Sequence[DeviceInfo],
        *,
        placement_lookup: PlacementLookup,
        share_step_milli: int = 100,
        socket_dir: str | os.PathLike[str] = DEVICE_PLUGIN_DIR,
        node_name: str | None = None,
        extras: AllocateExtras | None = None,
        poll_interval_s: float = 0.5,
        health_interval_s: float | None = None,
        register_timeout_s: float = 5.0,
        register_retry_s: float = 5.0,
        max_workers: int = 8,
        device_list_strategy: str = "envvar",
    ) -> None:
        if device_list_strategy not in DEVICE_LIST_STRATEGIES:
            raise ValueError(
                f"device_list_strategy={device_list_strategy!r} is not allowed: use one of "
                + ", ".join(DEVICE_LIST_STRATEGIES)
            )
        self.device_list_strategy = device_list_strategy
        if not 1 <= share_step_milli <= 1000:
            raise ValueError(f"share_step_milli={share_step_milli} is not allowed: use 1 to 1000")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s={poll_interval_s} is not allowed: use a positive number of seconds")
        if health_interval_s is not None and health_interval_s <= 0:
            raise ValueError(f"health_interval_s={health_interval_s} is not allowed: use a positive number or None")
        self.slots_per_device = 1000 // share_step_milli
        ordered = sorted(devices, key=lambda d: d.index)
        self._devices: dict[str, DeviceInfo] = {}
        for device in ordered:
            if device.uuid in self._devices:
                raise ValueError(f"device uuid {device.uuid!r} appears twice: each device needs its own uuid")
            longest = slot_id(device.uuid, self.slots_per_device - 1)
            if SLOT_SEPARATOR in device.uuid or len(longest) > MAX_DEVICE_ID_CHARS:
                raise ValueError(
                    f"device uuid {device.uuid!r} cannot name slots: slot IDs like {longest!r} must have at most "
                    f"{MAX_DEVICE_ID_CHARS} characters and the uuid no {SLOT_SEPARATOR!r}"
                )
            self._devices[device.uuid] = device
        self._backend = backend
        self._lookup = placement_lookup
        self.share_step_milli = share_step_milli
        self.socket_dir = os.fspath(socket_dir)
        self.socket_path = os.path.join(self.socket_dir, names.DEVICE_PLUGIN_SOCKET)
        self.kubelet_socket_path = os.path.join(self.socket_dir, KUBELET_SOCKET)
        self.node_name = node_name
        self._extras = extras or AllocateExtras()
        self._poll_interval_s = poll_interval_s
        self._health_interval_s = health_interval_s
        self._register_timeout_s = register_timeout_s
        self._register_retry_s = register_retry_s
        self._max_workers = max_workers

        self._cond = threading.Condition()
        self._health = {uuid: d.healthy for uuid, d in self._devices.items()}
        self._version = 0  # bumped on every health change: ListAndWatch sends a new list
        self._generation = 0  # bumped when the server stops or restarts: its streams end
        self._allocated: OrderedDict[tuple[str, int], frozenset[str]] = OrderedDict()
        """(pod key, container number) -> the slot IDs it was allocated."""
        self._progress: OrderedDict[str, int] = OrderedDict()
        """Pod key -> how many of its containers are allocated (most recently advanced last)."""

        self._life = threading.Lock()  # start, stop and the watcher's restarts
        self._server: grpc.Server | None = None
        self._socket_identity: tuple[int, int, int] | None = None
        self._kubelet_identity: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._retry_at = 0.0
        self.registered = False
        self.registrations = 0
        """Successful Register calls since construction (one per kubelet start seen)."""

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the plugin socket, register with the kubelet if it is there, and watch for kubelet restarts."""
        with self._life:
            if self._server is not None:
                raise RuntimeError("the device plugin is already started")
            self._stop.clear()
            self._serve()
            self._kubelet_identity = _identity(self.kubelet_socket_path)
            if self._kubelet_identity is None:
                log.warning("kubelet socket %s is absent: will register when it appears", self.kubelet_socket_path)
            else:
                self._register()
            self._watcher = threading.Thread(target=self._watch, name="flexai-device-plugin-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop watching and serving, end the ListAndWatch streams and remove the plugin socket."""
        self._stop.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.join()
        with self._life:
            self._shutdown()
            self.registered = False

    def __enter__(self) -> DevicePluginServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)  # left by an earlier run: binding would fail
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="flexai-device-plugin")
        )
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{os.path.abspath(self.socket_path)}")
        server.start()
        self._server = server
        self._socket_identity = _identity(self.socket_path)
        log.info("device plugin serving %s (%d devices)", self.socket_path, len(self._devices))

    def _shutdown(self) -> None:
        server, self._server = self._server, None
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        if server is not None:
            server.stop(grace=None).wait(timeout=5.0)
        if self._socket_identity is not None and _identity(self.socket_path) == self._socket_identity:
            os.unlink(self.socket_path)
        self._socket_identity = None

    def _register(self) -> None:
        request = api_pb2.RegisterRequest(
            version=API_VERSION,
            endpoint=names.DEVICE_PLUGIN_SOCKET,
            resource_name=names.RESOURCE_VXPU,
            options=self._options(),
        )
        target = f"unix://{os.path.abspath(self.kubelet_socket_path)}"
        try:
            with grpc.insecure_channel(target) as channel:
                stub = api_pb2_grpc.RegistrationStub(channel)
                stub.Register(request, timeout=self._register_timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            self.registered = False
            self._retry_at = time.monotonic() + self._register_retry_s
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            log.warning(
                "registering %s with the kubelet at %s failed (%s: %s); retrying in %.0f s",
                names.RESOURCE_VXPU,
                self.kubelet_socket_path,
                code,
                details,
                self._register_retry_s,
            )
            return
        self.registered = True
        self.registrations += 1
        log.info("registered %s with the kubelet at %s", names.RESOURCE_VXPU, self.kubelet_socket_path)

    def _watch(self) -> None:
        next_health = None if self._health_interval_s is None else time.monotonic() + self._health_interval_s
        while not self._stop.wait(self._poll_interval_s):
            try:
                with self._life:
                    if self._stop.is_set():
                        return
                    self._check_sockets()
                if next_health is not None and time.monotonic() >= next_health:
                    assert self._health_interval_s is not None
                    next_health = time.monotonic() + self._health_interval_s
                    self.refresh_health()
            except Exception:  # the watcher must outlive any one failure
                log.exception("device plugin watcher failed; continuing")

    def _check_sockets(self) -> None:
        kubelet = _identity(self.kubelet_socket_path)
        if kubelet is None:
            if self._kubelet_identity is not None:
                log.warning("kubelet socket %s is gone: waiting for the kubelet", self.kubelet_socket_path)
            self._kubelet_identity = None
            self.registered = False
            return
        if kubelet != self._kubelet_identity:
            log.info("kubelet socket %s is new (kubelet restarted): serving again and registering", kubelet)
            self._kubelet_identity = kubelet
            self._restart()
            self._register()
        elif _identity(self.socket_path) != self._socket_identity:
            log.warning("plugin socket %s was removed or replaced: serving again and registering", self.socket_path)
            self._restart()
            self._register()
        elif not self.registered and time.monotonic() >= self._retry_at:
            self._register()

    def _restart(self) -> None:
        self.registered = False
        self._shutdown()
        self._serve()

    # -- health ---------------------------------------------------------------------------------------------------

    def set_health(self, uuid: str, healthy: bool) -> bool:
        """Mark one device healthy or not; True (and a new list on every ListAndWatch stream) when it changed."""
        return self._apply_health({uuid: healthy})

    def refresh_health(self) -> bool:
        """Re-read the backend: a device it no longer lists is unhealthy. True when any health changed.

        When the backend cannot be read, health is kept as it was (the failure is logged).
        """
        try:
            found = {d.uuid: d.healthy for d in self._backend.devices()}
        except DiscoveryError as exc:
            log.warning("cannot re-read %s devices: %s; health unchanged", self._backend.name, one_line(exc))
            return False
        return self._apply_health({uuid: found.get(uuid, False) for uuid in self._devices})

    def _apply_health(self, health: dict[str, bool]) -> bool:
        for uuid in health:
            if uuid not in self._devices:
                known = ", ".join(self._devices) or "none"
                raise ValueError(f"device uuid {uuid!r} is not on this node: known devices are {known}")
        with self._cond:
            changed = {u: h for u, h in health.items() if self._health[u] != bool(h)}
            if not changed:
                return False
            for uuid, healthy in changed.items():
                self._health[uuid] = bool(healthy)
                log.warning("device %s is now %s", uuid, HEALTHY if healthy else UNHEALTHY)
            self._version += 1
            self._cond.notify_all()
        return True

    def virtual_devices(self) -> list[tuple[str, str]]:
        """(slot ID, Healthy|Unhealthy) for every advertised slot, in device order."""
        with self._cond:
            return [
                (slot_id(uuid, k), HEALTHY if self._health[uuid] else UNHEALTHY)
                for uuid in self._devices
                for k in range(self.slots_per_device)
            ]

    # -- DevicePlugin service -------------------------------------------------------------------------------------

    def _options(self) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def GetDevicePluginOptions(self, request: api_pb2.Empty, context: grpc.ServicerContext) -> object:  # noqa: N802
        return self._options()

    def ListAndWatch(self, request: api_pb2.Empty, context: grpc.ServicerContext) -> Iterator[object]:  # noqa: N802
        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)  # runs when the kubelet hangs up or the server stops
        with self._cond:
            generation = self._generation
        sent: int | None = None
        while True:
            with self._cond:
                while self._version == sent and self._generation == generation and context.is_active():
                    self._cond.wait(timeout=1.0)
                if self._generation != generation or not context.is_active():
                    return
                sent = self._version
            devices = [api_pb2.Device(ID=i, health=h) for i, h in self.virtual_devices()]
            yield api_pb2.ListAndWatchResponse(devices=devices)

    def GetPreferredAllocation(  # noqa: N802
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> object:
        pending = self._pending(context)
        responses = [
            api_pb2.ContainerPreferredAllocationResponse(
                deviceIDs=self._prefer(
                    list(r.available_deviceIDs), list(r.must_include_deviceIDs), r.allocation_size, pending
                )
            )
            for r in request.container_requests
        ]
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> object:  # noqa: N802
        pending = self._pending(context)
        with self._cond:
            chosen: list[tuple[PendingPlacement, int, frozenset[str]]] = []
            progress = dict(self._progress)
            for container in request.container_requests:
                ids = list(container.devices_ids)
                match, number = self._match(ids, pending, progress, context)
                progress[match.key] = max(progress.get(match.key, 0), number + 1)
                chosen.append((match, number, frozenset(ids)))
            for match, number, ids in chosen:  # all containers matched: remember them together
                self._allocated[(match.key, number)] = ids
                self._allocated.move_to_end((match.key, number))
                self._progress[match.key] = max(self._progress.get(match.key, 0), number + 1)
                self._progress.move_to_end(match.key)
            for remembered in (self._allocated, self._progress):
                while len(remembered) > MAX_REMEMBERED_ALLOCATIONS:
                    remembered.popitem(last=False)
        responses = [self._container_response(match, number) for match, number, _ in chosen]
        for match, number, ids in chosen:
            log.info("allocated %s to %s container %d (%s)", ", ".join(sorted(ids)), match.job_id, number, match.uid)
        return api_pb2.AllocateResponse(container_responses=responses)

    def PreStartContainer(  # noqa: N802
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> object:
        return api_pb2.PreStartContainerResponse()

    # -- matching -------------------------------------------------------------------------------------------------

    def _pending(self, context: grpc.ServicerContext) -> list[PendingPlacement]:
        try:
            found = list(self._lookup())
        except Exception as exc:  # the API server may be unreachable: the kubelet retries the pod
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot list flexai placements: {one_line(exc)}")
            raise  # abort raises; this keeps type checkers aware
        if self.node_name is None:
            return found
        return [p for p in found if p.placement.node == self.node_name]

    def _match(
        self,
        ids: list[str],
        pending: list[PendingPlacement],
        progress: dict[str, int],
        context: grpc.ServicerContext,
    ) -> tuple[PendingPlacement, int]:
        """(pod, container number) for one container request, by the matching rule of the module docstring."""
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no device IDs in the container request")
        uuids: set[str] = set()
        for device_id in ids:
            try:
                uuid, slot = parse_slot_id(device_id)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if uuid not in self._devices or not 0 <= slot < self.slots_per_device:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"device ID {device_id!r} is not advertised by flexai on this node",
                )
            uuids.add(uuid)
        wanted = frozenset(ids)
        one_each = len(uuids) == len(ids)
        under_way = sorted(
            (p for p in pending if 0 < progress.get(p.key, 0) < len(p.placement.per_container())),
            key=lambda p: -list(self._progress).index(p.key) if p.key in self._progress else 0,
        )
        for p in under_way:  # rule 2
            number = progress[p.key]
            _, slices = p.placement.per_container()[number]
            if one_each and len(slices) == len(ids) and {s.uuid for s in slices} == uuids:
                return p, number
        for p in pending:  # rule 3
            if progress.get(p.key, 0) or (p.key, 0) in self._allocated:
                continue
            containers = p.placement.per_container()
            if not containers:
                continue
            _, slices = containers[0]
            if one_each and len(slices) == len(ids) and {s.uuid for s in slices} == uuids:
                return p, 0
        keys = {p.key: p for p in pending}
        for (key, number), allocated in reversed(self._allocated.items()):  # rule 4
            if allocated == wanted and key in keys:
                return keys[key], number
        for p in under_way:  # rule 5
            number = progress[p.key]
            _, slices = p.placement.per_container()[number]
            if len(slices) == len(ids) and uuids <= {s.uuid for s in p.placement.slices}:
                return p, number
        where = f" on node {self.node_name}" if self.node_name else ""
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"no flexai placement for devices {', '.join(sorted(ids)) or '(none)'}{where}: no pending pod's "
            f"{names.ANNOTATION_PLACEMENT} gives a container exactly the devices "
            f"{', '.join(sorted(uuids)) or '(none)'} with one slot each (was the pod scheduled by the flexai "
            "extender, or already allocated?)",
        )
        raise AssertionError("unreachable")  # context.abort raises

    def _container_response(self, match: PendingPlacement, number: int) -> api_pb2.ContainerAllocateResponse:
        _, grants = match.placement.per_container()[number]
        slices = [
            {
                "device": self._devices[s.uuid].index,
                "uuid": s.uuid,
                "share_milli": s.share_milli,
                "memory_mib": s.memory_mib,
            }
            for s in grants
        ]
        envs = slice_environment(self._backend, match.job_id, slices)
        annotations: dict[str, str] = {}
        uuids = [s.uuid for s in grants]
        if self._backend.name == "nvidia":
            if self.device_list_strategy == "envvar":
                envs["NVIDIA_VISIBLE_DEVICES"] = ",".join(uuids)
            else:
                annotations[cdi_annotation_key(match, number)] = ",".join(f"{CDI_KIND}={u}" for u in uuids)
        extras = self._extras
        nodes = list(extras.device_nodes)
        if extras.per_device is not None:
            for s in grants:
                nodes.extend(extras.per_device(self._devices[s.uuid]))
        return api_pb2.ContainerAllocateResponse(
            envs=envs,
            annotations=annotations,
            mounts=[
                api_pb2.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
                for m in extras.mounts
            ],
            devices=[
                api_pb2.DeviceSpec(container_path=n.container_path, host_path=n.host_path, permissions=n.permissions)
                for n in dict.fromkeys(nodes)  # once each, in order
            ],
        )

    def _prefer(
        self, available: list[str], must_include: list[str], size: int, pending: list[PendingPlacement]
    ) -> list[str]:
        """One container's preferred slots: a pending placement's devices first, else the fullest devices."""
        free: dict[str, list[tuple[int, str]]] = {}
        for device_id in dict.fromkeys(available):
            try:
                uuid, slot = parse_slot_id(device_id)
            except ValueError:
                continue
            if uuid in self._devices:
                free.setdefault(uuid, []).append((slot, device_id))
        in_use = {uuid: self.slots_per_device - len(slots) for uuid, slots in free.items()}
        for slots in free.values():
            slots.sort()
        chosen = list(dict.fromkeys(must_include))
        if len(chosen) >= size:
            return chosen
        must_uuids: dict[str, str] = {}
        for device_id in chosen:
            try:
                must_uuids.setdefault(parse_slot_id(device_id)[0], device_id)
            except ValueError:
                continue

        with self._cond:
            progress = dict(self._progress)
        # The devices of the containers that would be matched next: pods under way first, then new ones.
        under_way: list[list[str]] = []
        fresh: list[list[str]] = []
        for p in pending:
            number = progress.get(p.key, 0)
            containers = p.placement.per_container()
            if number < len(containers):
                _, slices = containers[number]
                (under_way if number else fresh).append([s.uuid for s in slices])
        for slice_uuids in under_way + fresh:
            if len(slice_uuids) != size or len(set(slice_uuids)) != size:
                continue
            if len(must_uuids) != len(chosen) or not set(must_uuids) <= set(slice_uuids):
                continue
            picked: list[str] = []
            for uuid in slice_uuids:
                if uuid in must_uuids:
                    picked.append(must_uuids[uuid])
                else:
                    slot = next((i for _, i in free.get(uuid, []) if i not in chosen), None)
                    if slot is None:
                        break
                    picked.append(slot)
            else:
                return picked

        order = sorted(free, key=lambda u: (u not in must_uuids, -in_use[u], self._devices[u].index))
        for uuid in order:
            for _, device_id in free[uuid]:
                if len(chosen) >= size:
                    return chosen
                if device_id not in chosen:
                    chosen.append(device_id)
        return chosen
