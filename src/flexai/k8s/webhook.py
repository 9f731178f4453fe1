"""Admission webhook for pods (AdmissionReview v1): translate, route, refuse.

**Mutate** (``POST /mutate``): a pod that asks for flexai's slices gets ``spec.schedulerName:
flexai-scheduler``. Requests written in conventions users already have are translated per container
to ``flexai.io/vxpu`` (devices), ``flexai.io/vxpu-share`` (milli per device) and ``flexai.io/vxpu-memory``
(MiB per device), the original keys are removed, and the source is recorded in the pod annotation
``flexai.io/translated-from`` (``hami``, ``volcano``, ``huawei``; several comma-separated, sorted, when the
containers of one pod use different ones). The full table of translations and defaults, with the reason
for each, is in docs/kubernetes.md ("The translation"); in short:

===========  ==========================  ===============================  ==================================
convention   devices (missing: 1)        compute share per device         memory per device
===========  ==========================  ===============================  ==================================
flexai       ``flexai.io/vxpu``          ``flexai.io/vxpu-share`` (milli, ``flexai.io/vxpu-memory`` (MiB;
                                         on the step; missing: 1000)      missing: no quota)
hami         ``nvidia.com/gpu``          ``nvidia.com/gpucores`` (%)      ``nvidia.com/gpumem`` (MiB) or
                                                                          ``nvidia.com/gpumem-percentage``
volcano      ``volcano.sh/vgpu-number``  ``volcano.sh/vgpu-cores`` (%)    ``volcano.sh/vgpu-memory`` (MiB) or
                                                                          ``volcano.sh/vgpu-memory-percentage``
huawei       ``huawei.com/vgpu-number``  ``huawei.com/vgpu-cores`` (%)    ``huawei.com/vgpu-memory.1Gi`` (GiB)
huawei vNPU  ``huawei.com/Ascend<chip>-<N>c[.<M>cpu][.<G>g]``: the value is the number of vNPUs; share =
             N AI cores of the chip's (910: 30, 910B: 20, 310P: 8); memory = G GiB, else the same fraction
             of the device memory; device model ``Ascend<chip>*``
===========  ==================================================================================================

Rules of the translation (each one a decision, written down here and in docs/kubernetes.md):

* A percent becomes milli (``gpucores: 30`` -> ``vxpu-share: 300``) rounded **up** to the share step
  (``gpucores: 25`` -> 300 with the 10 % step): the pod gets at least what it asked for.
* Cores 0 or missing mean "no core limit" (HAMi's and Volcano's documented default): flexai reserves shares,
  so that is the whole device (1000), unless ``WebhookOptions.default_share_milli`` sets another default
  for a missing key.
* Memory missing (neither MiB nor percentage) means the whole device's memory (HAMi's and Volcano's
  documented default): 100 %. A percentage is resolved to MiB when ``WebhookOptions.device_memory_mib``
  names the device memory of a uniform cluster; otherwise it is kept in the pod annotation
  ``flexai.io/vxpu-memory-percentage`` (``{"<container>": percent}``), which the extender resolves against
  each node's device memory.
* A share below the whole device on several devices is allowed (as HAMi allows it): each device gets it.
* ``nvidia.com/priority`` (HAMi's task priority) is removed from the resources and given to the container as
  ``CUDA_TASK_PRIORITY`` (what HAMi's webhook does; HAMi-core reads it), in any container.
* ``huawei.com/vgpu-type.<model>`` is removed and restricts the pod to device models matching ``*<model>*``
  (annotation ``flexai.io/model``, unless the pod already has one).
* A bare ``nvidia.com/gpu: N`` (no sharing key) is the plain NVIDIA device plugin's resource on most
  clusters and is left alone unless ``WebhookOptions.translate_bare_gpu`` is true (what HAMi does).
* Memory quantities: a plain number is in the key's unit (MiB, or GiB for ``huawei.com/vgpu-memory.1Gi``);
  a number with a byte suffix (``8Gi``, ``500Mi``, ``2G``) is bytes and is rounded up to whole MiB.
  flexai's own keys written as byte quantities are rewritten as plain MiB.
* Every device of one pod gets the same slice: containers of one pod asking for different shares or memory
  are refused (the extender places one slice shape per pod).

**Validate** (``POST /validate``): the same analysis, without patching; impossible requests are refused
with one message per problem naming the container, the field, the value and what is allowed.

Only ``CREATE`` of pods is looked at; everything else is allowed unchanged. Serving TLS is the caller's
job (``flexai k8s webhook`` uses ``flexai.k8s.tls``, which reloads a renewed certificate).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from flexai.k8s.names import (
    ANNOTATION_LEASE_SECRET,
    ANNOTATION_MEMORY_PERCENTAGE,
    ANNOTATION_MODEL,
    ANNOTATION_REMOTE_ENDPOINT,
    ANNOTATION_TRANSLATED,
    LABEL_REMOTE,
    RESOURCE_MEMORY,
    RESOURCE_REMOTE,
    RESOURCE_SHARE,
    RESOURCE_VXPU,
    SCHEDULER_NAME,
)

# One quantity parser for all of flexai.k8s (re-exported here for the webhook's callers and tests).
from flexai.k8s.quantity import QuantityError
from flexai.k8s.quantity import parse_quantity_with_suffix as parse_quantity
from flexai.model.units import FULL_SHARE_MILLI

__all__ = ["ANNOTATION_MEMORY_PERCENTAGE", "QuantityError", "parse_quantity"]

ReviewKind = Literal["mutate", "validate"]
MIB = 1 << 20
HAMI_PRIORITY = "nvidia.com/priority"
TASK_PRIORITY_ENV = "CUDA_TASK_PRIORITY"
"""HAMi-core's task priority variable (0 high, 1 low): what HAMi's webhook turns nvidia.com/priority into."""
HUAWEI_TYPE_PREFIX = "huawei.com/vgpu-type."
ASCEND_VNPU = re.compile(r"^huawei\.com/Ascend(?P<chip>910B?|310P)-(?P<cores>[0-9]+)c(?P<rest>(\.[0-9A-Za-z_]+)*)$")
ASCEND_AI_CORES = {"910": 30, "910B": 20, "310P": 8}
"""AI cores of one chip, for the share of a vNPU template (the smallest of each family: the share is never
less than the template's cores)."""


@dataclass(frozen=True)
class WebhookOptions:
    """What the webhook allows and how it translates; one instance per webhook server."""

    share_step_milli: int = 100
    """Share step of the cluster's agents (100 = 10 %); must divide 1000."""
    max_devices: int = 16
    """Most devices one container may ask for."""
    max_memory_mib: int | None = None
    """Largest device memory in the cluster (MiB); a request above it is refused. None: no upper check."""
    translate_bare_gpu: bool = False
    """Translate ``nvidia.com/gpu: N`` without a sharing key to ``flexai.io/vxpu: N`` (HAMi does)."""
    device_memory_mib: int | None = None
    """Memory of every device (uniform cluster): resolves memory percentages to MiB."""
    default_share_milli: int | None = None
    """Share given to a translated request without a cores key; None: the whole device."""

    def __post_init__(self) -> None:
        step = self.share_step_milli
        if not 1 <= step <= FULL_SHARE_MILLI or FULL_SHARE_MILLI % step:
            raise ValueError(f"share_step_milli {step}: allowed a divisor of 1000 from 1 to 1000")
        if self.max_devices < 1:
            raise ValueError(f"max_devices {self.max_devices}: allowed 1 or more")
        if self.max_memory_mib is not None and self.max_memory_mib < 1:
            raise ValueError(f"max_memory_mib {self.max_memory_mib}: allowed 1 or more, or None")
        if self.device_memory_mib is not None and self.device_memory_mib < 1:
            raise ValueError(f"device_memory_mib {self.device_memory_mib}: allowed 1 or more, or None")
        dflt = self.default_share_milli
        if dflt is not None and (not 1 <= dflt <= FULL_SHARE_MILLI or dflt % step):
            raise ValueError(f"default_share_milli {dflt}: allowed a multiple of {step} from {step} to 1000")

    @classmethod
    def from_flags(
        cls,
        share_step: int = 100,
        max_devices: int = 16,
        max_memory_mib: int = 0,
        device_memory_mib: int = 0,
        default_share: int = 0,
        translate_bare_gpu: bool = False,
    ) -> WebhookOptions:
        """Options from the flags the Helm chart passes to ``flexai k8s webhook`` (``--share-step``,
        ``--max-devices``, ``--max-memory-mib``, ``--device-memory-mib``, ``--default-share``,
        ``--translate-bare-gpu``), where 0 means "not set"."""
        return cls(
            share_step_milli=share_step,
            max_devices=max_devices,
            max_memory_mib=max_memory_mib or None,
            translate_bare_gpu=translate_bare_gpu,
            device_memory_mib=device_memory_mib or None,
            default_share_milli=default_share or None,
        )


@dataclass(frozen=True)
class Convention:
    """The resource names of one way of asking for device slices."""

    name: str
    count: str
    share: str
    share_milli_per_unit: int
    """1 for flexai (milli), 10 for the percent-valued cores keys."""
    memory: str
    memory_mib_per_unit: int
    memory_percentage: str | None = None
    model_prefix: str | None = None
    """Keys ``<prefix><model>`` restrict the device model (Huawei's ``huawei.com/vgpu-type.``)."""

    @property
    def keys(self) -> tuple[str, ...]:
        keys = (self.count, self.share, self.memory, self.memory_percentage)
        return tuple(k for k in keys if k)

    def owns(self, key: str) -> bool:
        return key in self.keys or bool(self.model_prefix and key.startswith(self.model_prefix))


FLEXAI = Convention("flexai", RESOURCE_VXPU, RESOURCE_SHARE, 1, RESOURCE_MEMORY, 1)
HAMI = Convention(
    "hami", "nvidia.com/gpu", "nvidia.com/gpucores", 10, "nvidia.com/gpumem", 1, "nvidia.com/gpumem-percentage"
)
VOLCANO = Convention(
    "volcano",
    "volcano.sh/vgpu-number",
    "volcano.sh/vgpu-cores",
    10,
    "volcano.sh/vgpu-memory",
    1,
    "volcano.sh/vgpu-memory-percentage",
)
HUAWEI = Convention(
    "huawei",
    "huawei.com/vgpu-number",
    "huawei.com/vgpu-cores",
    10,
    "huawei.com/vgpu-memory.1Gi",
    1024,
    model_prefix=HUAWEI_TYPE_PREFIX,
)
ASCEND = Convention("huawei", "", "", 0, "", 0)
"""Huawei's Ascend vNPU templates (``huawei.com/Ascend910-4c``): keys matched by ``ASCEND_VNPU``."""
CONVENTIONS: tuple[Convention, ...] = (FLEXAI, HAMI, VOLCANO, HUAWEI)


# ------------------------------------------------------------------------------------------------ analysis


@dataclass(frozen=True)
class _Value:
    key: str
    raw: object
    number: int

    def __str__(self) -> str:
        return f"{self.key}={_show(self.raw)}"


def _show(raw: object) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw)


@dataclass(frozen=True)
class ContainerSlices:
    """What one container asks for, in flexai's terms."""

    container: str
    convention: str
    count: int
    share_milli: int | None
    memory_mib: int | None
    memory_percentage: int | None = None
    models: tuple[str, ...] = ()
    """Device-model patterns the container's keys ask for (``flexai.io/model`` syntax)."""

    @property
    def slice_shape(self) -> tuple[int, int, int]:
        """(share, MiB, percent) as the extender reads them (a missing share is the whole device)."""
        return (self.share_milli or FULL_SHARE_MILLI, self.memory_mib or 0, self.memory_percentage or 0)


@dataclass
class PodReview:
    """The webhook's reading of one pod: what it asks for, the patch that rewrites it, what is wrong."""

    asks_flexai: bool = False
    slices: list[ContainerSlices] = field(default_factory=list)
    translated_from: tuple[str, ...] = ()
    patch: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    malformed: bool = False
    """True when an error is about syntax (an unparsable quantity, a pod that is not an object)."""
    remote: bool = False
    """The pod asks for a remote slice (``flexai.io/vxpu-remote``)."""


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class _ContainerReader:
    """Reads one container's resources; collects errors in the pod review."""

    def __init__(self, review: PodReview, options: WebhookOptions, where: str) -> None:
        self.review = review
        self.options = options
        self.where = where

    def error(self, text: str, malformed: bool = False) -> None:
        self.review.errors.append(f"{self.where}: {text}")
        self.review.malformed = self.review.malformed or malformed

    def integer(self, key: str, raw: object, what: str) -> _Value | None:
        try:
            number, _ = parse_quantity(raw)
        except QuantityError:
            self.error(f"{key}={_show(raw)} is not a Kubernetes quantity (allowed: {what})", malformed=True)
            return None
        if number != number.to_integral_value():
            self.error(f"{key}={_show(raw)} is not a whole number (allowed: {what})", malformed=True)
            return None
        return _Value(key, raw, int(number))

    def memory(self, key: str, raw: object, mib_per_unit: int) -> _Value | None:
        unit = "MiB" if mib_per_unit == 1 else f"units of {mib_per_unit // 1024} GiB"
        example = "8192" if mib_per_unit == 1 else "8"
        what = f"a whole number of {unit} such as {example}, or a byte quantity such as 8Gi or 500Mi"
        try:
            number, suffixed = parse_quantity(raw)
        except QuantityError:
            self.error(f"{key}={_show(raw)} is not a Kubernetes quantity (allowed: {what})", malformed=True)
            return None
        if suffixed:
            mib = math.ceil(number / MIB)
        else:
            scaled = number * mib_per_unit
            if scaled != scaled.to_integral_value():
                self.error(f"{key}={_show(raw)} is not a whole number of MiB (allowed: {what})", malformed=True)
                return None
            mib = int(scaled)
        return _Value(key, raw, int(mib))


def _resource_dicts(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    resources = container.get("resources")
    if not isinstance(resources, Mapping):
        return {}
    return {part: dict(resources[part]) for part in ("limits", "requests") if isinstance(resources.get(part), Mapping)}


def _both(
    reader: _ContainerReader, dicts: dict[str, dict[str, Any]], key: str, read: Any
) -> tuple[_Value | None, bool]:
    """One key read from limits and requests (they must agree where both are set): (value, ok)."""
    seen: list[_Value] = []
    ok = True
    for part in ("limits", "requests"):
        if key not in dicts.get(part, {}):
            continue
        value = read(key, dicts[part][key])
        if value is None:
            ok = False
        else:
            seen.append(value)
    if len(seen) == 2 and seen[0].number != seen[1].number:
        reader.error(
            f"{key} is {_show(seen[0].raw)} in limits but {_show(seen[1].raw)} in requests "
            "(allowed: the same value in both)"
        )
        return None, False
    return (seen[0] if seen else None), ok


@dataclass
class _ContainerResult:
    slices: ContainerSlices | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)
    remote: bool = False


def _rewrite_resources(
    dicts: dict[str, dict[str, Any]], path: tuple[str | int, ...], drop: set[str], wanted: dict[str, str]
) -> list[dict[str, Any]]:
    ops = []
    for part, current in dicts.items():
        if not set(current) & (drop | set(wanted)):
            continue
        updated = {k: v for k, v in current.items() if k not in drop}
        updated.update(wanted)
        if updated != current:
            ops.append({"op": "replace", "path": _pointer(*path, "resources", part), "value": updated})
    return ops


def _priority_ops(
    container: Mapping[str, Any], path: tuple[str | int, ...], reader: _ContainerReader, value: _Value | None
) -> list[dict[str, Any]]:
    """HAMi's task priority as the container's CUDA_TASK_PRIORITY (unless the container sets it itself)."""
    if value is None:
        return []
    if value.number < 0:
        reader.error(f"{value} is negative (allowed: 0 for high priority, 1 for low)")
        return []
    env = container.get("env")
    entry = {"name": TASK_PRIORITY_ENV, "value": str(value.number)}
    if not isinstance(env, list):
        return [{"op": "add", "path": _pointer(*path, "env"), "value": [entry]}]
    if any(isinstance(e, Mapping) and e.get("name") == TASK_PRIORITY_ENV for e in env):
        return []
    return [{"op": "add", "path": _pointer(*path, "env", "-"), "value": entry}]


def _read_container(
    container: Mapping[str, Any], path: tuple[str | int, ...], review: PodReview, options: WebhookOptions
) -> _ContainerResult:
    """Slices asked for by one container and the patch operations that rewrite it."""
    name = str(container.get("name", path[-1]))
    reader = _ContainerReader(review, options, f"container '{name}'")
    dicts = _resource_dicts(container)
    present = {key for d in dicts.values() for key in d}
    result = _ContainerResult()
    errors_before = len(review.errors)

    # HAMi's priority is no device request: strip it wherever it is, or the pod waits for it forever.
    priority = None
    if HAMI_PRIORITY in present:
        priority, _ = _both(reader, dicts, HAMI_PRIORITY, lambda k, r: reader.integer(k, r, "0 (high) or 1 (low)"))
    if RESOURCE_REMOTE in present:
        return _read_remote(container, path, reader, dicts, present, review, options)
    vnpu = sorted(k for k in present if ASCEND_VNPU.match(k))
    used = [c for c in CONVENTIONS if any(c.owns(k) for k in present)] + ([ASCEND] if vnpu else [])
    if len(used) > 1:
        keys = ", ".join(sorted(k for k in present if any(c.owns(k) for c in used) or k in vnpu))
        names_ = " and ".join("huawei vNPU" if c is ASCEND else c.name for c in used)
        reader.error(f"{keys} mix the {names_} conventions (allowed: one convention per container)")
        return result
    result.ops += _priority_ops(container, path, reader, priority)
    if not used:
        if HAMI_PRIORITY in present:
            result.ops += _rewrite_resources(dicts, path, {HAMI_PRIORITY}, {})
        return result
    conv = used[0]
    own = {k for k in present if conv.owns(k)}
    if conv is HAMI and own == {HAMI.count} and not options.translate_bare_gpu:
        result.ops += _rewrite_resources(dicts, path, {HAMI_PRIORITY}, {})
        return result  # the plain NVIDIA device plugin's resource

    if conv is ASCEND:
        checked = _check_vnpu(reader, dicts, vnpu, options)
    else:
        values: dict[str, _Value] = {}
        for key in conv.keys:
            if key == conv.memory:
                read: Any = lambda k, r: reader.memory(k, r, conv.memory_mib_per_unit)  # noqa: E731
            elif key == conv.memory_percentage:
                read = lambda k, r: reader.integer(k, r, "a whole percent from 1 to 100")  # noqa: E731
            elif key == conv.share:
                what = "a whole percent such as 30" if conv.share_milli_per_unit == 10 else "a whole number of milli"
                read = lambda k, r, what=what: reader.integer(k, r, what)  # noqa: E731
            else:
                read = lambda k, r: reader.integer(k, r, f"a whole number of devices from 1 to {options.max_devices}")  # noqa: E731
            value, _ = _both(reader, dicts, key, read)
            if value is not None:
                values[key] = value
        prefix = conv.model_prefix or ""
        models = tuple(sorted(f"*{k[len(prefix) :]}*" for k in own if prefix and k.startswith(prefix)))
        checked = None if len(review.errors) > errors_before else _check(reader, conv, values, options)
        if checked is not None:
            checked = (*checked, models)
    if checked is None or len(review.errors) > errors_before:
        return result
    count, share, memory, percentage, models = checked
    result.slices = ContainerSlices(name, conv.name, count, share, memory, percentage, models)

    # The container's new resources: the convention's keys out, flexai's canonical keys in.
    wanted = {RESOURCE_VXPU: str(count)}
    if share is not None:
        wanted[RESOURCE_SHARE] = str(share)
    if memory is not None:
        wanted[RESOURCE_MEMORY] = str(memory)
    result.ops += _rewrite_resources(dicts, path, own | set(vnpu) | {HAMI_PRIORITY}, wanted)
    return result


def _read_remote(
    container: Mapping[str, Any],
    path: tuple[str | int, ...],
    reader: _ContainerReader,
    dicts: dict[str, dict[str, Any]],
    present: set[str],
    review: PodReview,
    options: WebhookOptions,
) -> _ContainerResult:
    """A container that asks for a remote slice (``flexai.io/vxpu-remote: 1`` with flexai's share and memory)."""
    result = _ContainerResult()
    errors_before = len(review.errors)
    if path[1] != "containers":
        reader.error(f"{RESOURCE_REMOTE} is not allowed in an init container (allowed: in one app container)")
        return result
    others = sorted(k for k in present if k == RESOURCE_VXPU or any(c.owns(k) for c in CONVENTIONS if c is not FLEXAI))
    if others:
        reader.error(
            f"{RESOURCE_REMOTE} with {', '.join(others)} (allowed: a remote slice asks only for "
            f"{RESOURCE_REMOTE}: 1, {RESOURCE_SHARE} and {RESOURCE_MEMORY})"
        )
        return result
    remote, _ = _both(reader, dicts, RESOURCE_REMOTE, lambda k, r: reader.integer(k, r, "1"))
    if remote is not None and remote.number != 1:
        reader.error(f"{remote} is not allowed (allowed: 1, one remote slice per pod)")
    values: dict[str, _Value] = {}
    for key, read in (
        (RESOURCE_SHARE, lambda k, r: reader.integer(k, r, "a whole number of milli")),
        (RESOURCE_MEMORY, lambda k, r: reader.memory(k, r, 1)),
    ):
        value, _ = _both(reader, dicts, key, read)
        if value is not None:
            values[key] = value
    checked = None if len(review.errors) > errors_before else _check(reader, FLEXAI, values, options)
    if checked is None or len(review.errors) > errors_before:
        return result
    _, share, memory, _ = checked
    result.slices = ContainerSlices(str(container.get("name", path[-1])), "flexai", 1, share, memory)
    result.remote = True
    wanted = {RESOURCE_REMOTE: "1"}
    if share is not None:
        wanted[RESOURCE_SHARE] = str(share)
    if memory is not None:
        wanted[RESOURCE_MEMORY] = str(memory)
    result.ops += _rewrite_resources(dicts, path, {RESOURCE_REMOTE, RESOURCE_SHARE, RESOURCE_MEMORY}, wanted)
    return result


def remote_env(secret: str) -> list[dict[str, Any]]:
    """What a remote pod's container gets: the endpoint from the pod's annotation (written in the Binding), the
    token, CA and server name from the pod's Secret (written by the agent serving the slice)."""

    def from_secret(key: str, optional: bool) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": secret, "key": key}
        if optional:
            ref["optional"] = True
        return {"secretKeyRef": ref}

    return [
        {
            "name": "FLEXAI_REMOTE_ENDPOINT",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_REMOTE_ENDPOINT}']"}},
        },
        {"name": "FLEXAI_LEASE_TOKEN", "valueFrom": from_secret("token", False)},
        {"name": "FLEXAI_REMOTE_CA", "valueFrom": from_secret("ca.crt", True)},
        {"name": "FLEXAI_REMOTE_SERVER_NAME", "valueFrom": from_secret("server-name", True)},
    ]


def _remote_ops(pod: Mapping[str, Any], paths: list[tuple[str | int, ...]], secret: str) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for path in paths:
        container = pod["spec"][path[1]][path[2]]
        env = container.get("env")
        wanted = remote_env(secret)
        if not isinstance(env, list):
            ops.append({"op": "add", "path": _pointer(*path, "env"), "value": wanted})
            continue
        have = {e.get("name") for e in env if isinstance(e, Mapping)}
        for entry in wanted:
            if entry["name"] not in have:
                ops.append({"op": "add", "path": _pointer(*path, "env", "-"), "value": entry})
    return ops


def _to_step(milli: int, step: int) -> int:
    return min(FULL_SHARE_MILLI, -(-milli // step) * step)


def _check(
    reader: _ContainerReader, conv: Convention, values: dict[str, _Value], options: WebhookOptions
) -> tuple[int, int | None, int | None, int | None] | None:
    """Validate one container's values; (count, share_milli, memory_mib, memory_percentage) or None."""
    step = options.share_step_milli
    ok = True
    count_value = values.get(conv.count)
    count = count_value.number if count_value else 1
    if count_value and not 1 <= count <= options.max_devices:
        reader.error(
            f"{count_value} is not a device count flexai can grant (allowed: 1 to {options.max_devices} devices)"
        )
        ok = False

    share = None
    share_value = values.get(conv.share)
    if share_value is not None:
        share = share_value.number * conv.share_milli_per_unit
        if conv is FLEXAI:
            allowed = f"{step} to 1000 milli in steps of {step}, i.e. {step / 10:g} % to 100 %"
            if not 1 <= share <= FULL_SHARE_MILLI:
                reader.error(f"{share_value} is outside 1 % to 100 % of a device (allowed: {allowed})")
                ok = False
            elif share % step:
                reader.error(f"{share_value} is not on the {step / 10:g} % share step (allowed: {allowed})")
                ok = False
        elif not 0 <= share <= FULL_SHARE_MILLI:
            reader.error(f"{share_value} is outside 0 % to 100 % of a device (allowed: 0 (no limit) to 100 %)")
            ok = False
        elif share == 0:
            share = FULL_SHARE_MILLI  # "no core limit": the whole device's share
        else:
            share = _to_step(share, step)  # rounded up to the step: never less than asked
    elif conv is not FLEXAI and options.default_share_milli is not None:
        share = options.default_share_milli

    memory = None
    memory_value = values.get(conv.memory)
    if memory_value is not None:
        memory = memory_value.number
        cap = options.max_memory_mib
        allowed = f"0 to {cap} MiB per device" if cap is not None else "0 MiB or more per device"
        if memory < 0:
            reader.error(f"{memory_value} is negative (allowed: {allowed})")
            ok = False
        elif cap is not None and memory > cap:
            reader.error(f"{memory_value} is {memory} MiB, more than the largest device (allowed: {allowed})")
            ok = False

    percentage = None
    percentage_value = values.get(conv.memory_percentage) if conv.memory_percentage else None
    if percentage_value is not None:
        if memory_value is not None:
            reader.error(
                f"{memory_value} and {percentage_value} both set the memory (allowed: one of "
                f"{conv.memory} and {conv.memory_percentage})"
            )
            ok = False
        elif not 1 <= percentage_value.number <= 100:
            reader.error(f"{percentage_value} is outside 1 to 100 (allowed: a whole percent from 1 to 100)")
            ok = False
        else:
            percentage = percentage_value.number
    elif memory_value is None and conv is not FLEXAI:
        percentage = 100  # HAMi's and Volcano's default: the whole device's memory
    if percentage is not None and options.device_memory_mib is not None:
        memory, percentage = options.device_memory_mib * percentage // 100, None
    if not ok:
        return None
    return count, share, memory, percentage


def _check_vnpu(
    reader: _ContainerReader, dicts: dict[str, dict[str, Any]], keys: list[str], options: WebhookOptions
) -> tuple[int, int | None, int | None, int | None, tuple[str, ...]] | None:
    """An Ascend vNPU template (``huawei.com/Ascend910-4c``, ``huawei.com/Ascend310P-2c.1cpu``...)."""
    if len(keys) > 1:
        reader.error(f"{', '.join(keys)} are several vNPU templates (allowed: one per container)")
        return None
    key = keys[0]
    match = ASCEND_VNPU.match(key)
    assert match is not None
    value, ok = _both(reader, dicts, key, lambda k, r: reader.integer(k, r, "a whole number of vNPUs"))
    if value is None or not ok:
        return None
    if not 1 <= value.number <= options.max_devices:
        reader.error(f"{value} is not a device count flexai can grant (allowed: 1 to {options.max_devices} vNPUs)")
        return None
    total = ASCEND_AI_CORES[match["chip"]]
    cores = int(match["cores"])
    if not 1 <= cores <= total:
        reader.error(f"{key} asks for {cores} AI cores (allowed: 1 to {total} on an Ascend{match['chip']})")
        return None
    share = _to_step(-(-cores * FULL_SHARE_MILLI // total), options.share_step_milli)
    memory = percentage = None
    for part in match["rest"].split(".")[1:]:
        gib = re.fullmatch(r"([0-9]+)g", part)
        if gib:
            memory = int(gib[1]) * 1024
    if memory is None:
        percentage = max(1, cores * 100 // total)
        if options.device_memory_mib is not None:
            memory, percentage = options.device_memory_mib * percentage // 100, None
    return value.number, share, memory, percentage, (f"Ascend{match['chip']}*",)


def inspect_pod(pod: object, options: WebhookOptions | None = None) -> PodReview:
    """Read a pod: the flexai slices its containers ask for, the JSON patch that rewrites it, the errors."""
    options = options or WebhookOptions()
    review = PodReview()
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        review.errors.append("request.object: not a pod with a spec (allowed: a Pod object)")
        review.malformed = True
        return review
    spec = pod["spec"]
    container_ops: list[dict[str, Any]] = []
    remote_paths: list[tuple[str | int, ...]] = []
    for list_name in ("initContainers", "containers"):
        containers = spec.get(list_name) or []
        if not isinstance(containers, list):
            continue
        for index, container in enumerate(containers):
            if not isinstance(container, Mapping):
                continue
            result = _read_container(container, ("spec", list_name, index), review, options)
            if result.slices is not None:
                review.slices.append(result.slices)
            if result.remote:
                remote_paths.append(("spec", list_name, index))
            container_ops.extend(result.ops)
    shapes = {s.slice_shape for s in review.slices}
    if not review.errors and remote_paths and len(review.slices) > 1:
        review.errors.append(
            f"{RESOURCE_REMOTE}: a remote pod asks for one slice in one container (allowed: no other container "
            "asking for flexai slices)"
        )
    if not review.errors and len(shapes) > 1:
        described = ", ".join(
            f"'{s.container}' {s.slice_shape[0]}m share and "
            + (f"{s.memory_percentage} % of the memory" if s.memory_percentage else f"{s.memory_mib or 0} MiB")
            for s in review.slices
        )
        review.errors.append(
            f"containers {described} ask for different slices (allowed: the same share and memory per device in "
            "every container of one pod)"
        )
    if review.errors:
        return review
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else None
    existing = metadata.get("annotations") if metadata is not None else None
    patch: list[dict[str, Any]] = []
    if review.slices:
        review.asks_flexai = True
        review.translated_from = tuple(sorted({s.convention for s in review.slices} - {"flexai"}))
        if spec.get("schedulerName") != SCHEDULER_NAME:
            op = "replace" if "schedulerName" in spec else "add"
            patch.append({"op": op, "path": "/spec/schedulerName", "value": SCHEDULER_NAME})
    patch.extend(container_ops)

    annotations: dict[str, str] = {}
    if remote_paths:
        review.remote = True
        secret = existing.get(ANNOTATION_LEASE_SECRET) if isinstance(existing, Mapping) else None
        if not isinstance(secret, str) or not secret:
            import secrets as _secrets

            secret = f"flexai-lease-{_secrets.token_hex(6)}"  # the pod's name may not be known yet (generateName)
            annotations[ANNOTATION_LEASE_SECRET] = secret
        patch.extend(_remote_ops(pod, remote_paths, secret))
    if review.translated_from:
        annotations[ANNOTATION_TRANSLATED] = ",".join(review.translated_from)
    percentages = {s.container: s.memory_percentage for s in review.slices if s.memory_percentage is not None}
    if percentages:
        annotations[ANNOTATION_MEMORY_PERCENTAGE] = json.dumps(percentages, sort_keys=True)
    models = sorted({m for s in review.slices for m in s.models})
    if models and not (isinstance(existing, Mapping) and existing.get(ANNOTATION_MODEL)):
        annotations[ANNOTATION_MODEL] = "|".join(models)
    if annotations:
        if metadata is None:
            patch.append({"op": "add", "path": "/metadata", "value": {"annotations": annotations}})
        elif not isinstance(existing, Mapping):
            patch.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
        else:
            for key, value in annotations.items():
                if existing.get(key) != value:
                    op = "replace" if key in existing else "add"
                    patch.append({"op": op, "path": _pointer("metadata", "annotations", key), "value": value})
    if remote_paths:
        labels = metadata.get("labels") if metadata is not None else None
        if not isinstance(labels, Mapping):
            patch.append({"op": "add", "path": "/metadata/labels", "value": {LABEL_REMOTE: "true"}})
        elif labels.get(LABEL_REMOTE) != "true":
            op = "replace" if LABEL_REMOTE in labels else "add"
            patch.append({"op": op, "path": _pointer("metadata", "labels", LABEL_REMOTE), "value": "true"})
    review.patch = patch
    return review


# -------------------------------------------------------------------------------------------- AdmissionReview


def _response(uid: str, allowed: bool, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": allowed, **extra},
    }


def _deny(uid: str, code: int, message: str) -> dict[str, Any]:
    return _response(uid, False, status={"code": code, "message": message})


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    resource = request.get("resource")
    if request.get("subResource"):
        return False
    if isinstance(kind, Mapping) and kind.get("kind"):
        return kind.get("kind") == "Pod" and kind.get("group", "") == ""
    return isinstance(resource, Mapping) and resource.get("resource") == "pods"


def review(
    admission_review: Mapping[str, Any], kind: ReviewKind, options: WebhookOptions | None = None
) -> dict[str, Any]:
    """Answer one AdmissionReview v1 request: ``kind`` "mutate" (translate and route) or "validate".

    Returns the AdmissionReview v1 response: ``response.uid`` echoes the request, ``allowed``; a mutation
    that changes the pod carries ``patchType: JSONPatch`` and ``patch`` (base64 of an RFC 6902 patch); a
    refusal carries ``status: {code: 400 (malformed) or 422 (impossible request), message}``."""
    if kind not in ("mutate", "validate"):
        raise ValueError(f"kind {kind!r}: allowed 'mutate' or 'validate'")
    request = admission_review.get("request") if isinstance(admission_review, Mapping) else None
    if not isinstance(request, Mapping):
        return _deny("", 400, "request: missing (allowed: an AdmissionReview v1 with a request object)")
    uid = str(request.get("uid", ""))
    if not _is_pod(request) or request.get("operation", "CREATE") != "CREATE":
        return _response(uid, True)
    result = inspect_pod(request.get("object"), options)
    if result.errors:
        code = 400 if result.malformed else 422
        return _deny(uid, code, "flexai refused the pod: " + "; ".join(result.errors))
    if kind == "validate" or not result.patch:
        return _response(uid, True)
    patch = base64.b64encode(json.dumps(result.patch, separators=(",", ":")).encode()).decode()
    return _response(uid, True, patchType="JSONPatch", patch=patch)


# ------------------------------------------------------------------------------------------------ HTTP app


def create_webhook_app(options: WebhookOptions | None = None) -> FastAPI:
    """The webhook's ASGI app: ``POST /mutate``, ``POST /validate``, ``GET /healthz``, ``GET /metrics``.

    Serve it over TLS (the API server only calls HTTPS webhooks), e.g. with uvicorn's ``ssl_certfile`` and
    ``ssl_keyfile``."""
    opts = options or WebhookOptions()
    app = FastAPI(title="flexai admission webhook", docs_url=None, redoc_url=None)
    counts: dict[tuple[str, str], int] = {}

    async def handle(request: Request, kind: ReviewKind) -> JSONResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            counts[(kind, "bad_request")] = counts.get((kind, "bad_request"), 0) + 1
            return JSONResponse({"detail": "body: not JSON (allowed: an AdmissionReview v1)"}, status_code=400)
        if not isinstance(body, dict):
            counts[(kind, "bad_request")] = counts.get((kind, "bad_request"), 0) + 1
            return JSONResponse({"detail": "body: not an object (allowed: an AdmissionReview v1)"}, status_code=400)
        answer = review(body, kind, opts)
        response = answer["response"]
        outcome = "patched" if "patch" in response else ("allowed" if response["allowed"] else "denied")
        counts[(kind, outcome)] = counts.get((kind, outcome), 0) + 1
        return JSONResponse(answer)

    @app.post("/mutate")
    async def mutate(request: Request) -> JSONResponse:
        return await handle(request, "mutate")

    @app.post("/validate")
    async def validate(request: Request) -> JSONResponse:
        return await handle(request, "validate")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        lines = [
            "# HELP flexai_webhook_reviews_total Admission reviews answered, by kind and outcome.",
            "# TYPE flexai_webhook_reviews_total counter",
        ]
        for (kind, outcome), n in sorted(counts.items()):
            lines.append(f'flexai_webhook_reviews_total{{kind="{kind}",outcome="{outcome}"}} {n}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
