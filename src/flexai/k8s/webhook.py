"""Admission webhook for pods (AdmissionReview v1): translate, route, refuse.

**Mutate** (``POST /mutate``): a pod that asks for flexai's slices gets ``spec.schedulerName:
flexai-scheduler``. Requests written in conventions users already have are translated per container
to ``flexai.io/vxpu`` (devices), ``flexai.io/vxpu-share`` (milli per device) and ``flexai.io/vxpu-memory``
(MiB per device), the original keys are removed, and the source is recorded in the pod annotation
``flexai.io/translated-from`` (``hami``, ``volcano``, ``huawei``; several comma-separated, sorted, when the
containers of one pod use different ones):

===========  =============================  ==================================  ===========================
convention   devices                        compute share per device            memory per device
===========  =============================  ==================================  ===========================
flexai       ``flexai.io/vxpu``             ``flexai.io/vxpu-share`` (milli)    ``flexai.io/vxpu-memory``
hami         ``nvidia.com/gpu``             ``nvidia.com/gpucores`` (%)         ``nvidia.com/gpumem`` (MiB)
                                                                                or ``nvidia.com/gpumem-
                                                                                percentage`` (%)
volcano      ``volcano.sh/vgpu-number``     ``volcano.sh/vgpu-cores`` (%)       ``volcano.sh/vgpu-memory``
huawei       ``huawei.com/vgpu-number``     ``huawei.com/vgpu-cores`` (%)       ``huawei.com/vgpu-memory.1Gi``
                                                                                (GiB units)
===========  =============================  ==================================  ===========================

Rules of the translation (each one a decision, written down here and in docs/kubernetes.md):

* A percent becomes milli: ``gpucores: 30`` -> ``vxpu-share: 300``.
* A missing device count with a share or memory key means one device (HAMi's ``defaultGPUNum`` and
  Volcano's behaviour); this holds for flexai's own names too (``vxpu: 1`` is added).
* A missing share means flexai's default, the whole device (1000), unless ``WebhookOptions.default_share_milli``
  is set. HAMi lets a pod without ``gpucores`` use the device's compute unbounded; flexai reserves shares,
  so the closest honest translation is the whole device.
* A bare ``nvidia.com/gpu: N`` (no sharing key) is the plain NVIDIA device plugin's resource on most
  clusters and is left alone unless ``WebhookOptions.translate_bare_gpu`` is true (what HAMi does).
* ``nvidia.com/gpumem-percentage`` is resolved to MiB when ``WebhookOptions.device_memory_mib`` names
  the device memory of a uniform cluster; otherwise it is kept as the pod annotation
  ``flexai.io/vxpu-memory-percentage`` (JSON object ``{"<container>": percent}``) and no memory
  resource is written.
* Memory quantities: a plain number is in the key's unit (MiB, or GiB for ``huawei.com/vgpu-memory.1Gi``);
  a number with a byte suffix (``8Gi``, ``500Mi``, ``2G``) is bytes and is rounded up to whole MiB.
  flexai's own keys written as byte quantities are rewritten as plain MiB.

**Validate** (``POST /validate``): the same analysis, without patching; impossible requests are refused
with one message per problem naming the container, the field, the value and what is allowed.

Only ``CREATE`` of pods is looked at; everything else is allowed unchanged. Serving TLS is the caller's
job, e.g. ``uvicorn.run(create_webhook_app(), host="0.0.0.0", port=8443, ssl_certfile=..., ssl_keyfile=...)``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from flexai.k8s.names import (
    ANNOTATION_TRANSLATED,
    PREFIX,
    RESOURCE_MEMORY,
    RESOURCE_SHARE,
    RESOURCE_VXPU,
    SCHEDULER_NAME,
)

# One quantity parser for all of flexai.k8s (re-exported here for the webhook's callers and tests).
from flexai.k8s.quantity import QuantityError
from flexai.k8s.quantity import parse_quantity_with_suffix as parse_quantity
from flexai.model.units import FULL_SHARE_MILLI

ANNOTATION_MEMORY_PERCENTAGE = f"{PREFIX}/vxpu-memory-percentage"
"""On a Pod: memory per device as a percent of the device's memory, per container (JSON), when the
webhook could not resolve ``nvidia.com/gpumem-percentage`` to MiB."""

ReviewKind = Literal["mutate", "validate"]
MIB = 1 << 20


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
    """Memory of every device (uniform cluster): resolves ``nvidia.com/gpumem-percentage`` to MiB."""
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

    @property
    def keys(self) -> tuple[str, ...]:
        keys = (self.count, self.share, self.memory, self.memory_percentage)
        return tuple(k for k in keys if k)


FLEXAI = Convention("flexai", RESOURCE_VXPU, RESOURCE_SHARE, 1, RESOURCE_MEMORY, 1)
HAMI = Convention(
    "hami", "nvidia.com/gpu", "nvidia.com/gpucores", 10, "nvidia.com/gpumem", 1, "nvidia.com/gpumem-percentage"
)
VOLCANO = Convention("volcano", "volcano.sh/vgpu-number", "volcano.sh/vgpu-cores", 10, "volcano.sh/vgpu-memory", 1)
HUAWEI = Convention("huawei", "huawei.com/vgpu-number", "huawei.com/vgpu-cores", 10, "huawei.com/vgpu-memory.1Gi", 1024)
CONVENTIONS: tuple[Convention, ...] = (FLEXAI, HAMI, VOLCANO, HUAWEI)


# ---------------------------------------------------------------------------------------------- quantities


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


def _read_container(
    container: Mapping[str, Any], path: tuple[str | int, ...], review: PodReview, options: WebhookOptions
) -> tuple[ContainerSlices | None, list[dict[str, Any]]]:
    """Slices asked for by one container and the patch operations that rewrite its resources."""
    name = str(container.get("name", path[-1]))
    reader = _ContainerReader(review, options, f"container '{name}'")
    dicts = _resource_dicts(container)
    present = {key for d in dicts.values() for key in d}
    used = [c for c in CONVENTIONS if present & set(c.keys)]
    if not used:
        return None
    if len(used) > 1:
        keys = ", ".join(sorted(present & {k for c in used for k in c.keys}))
        names = " and ".join(c.name for c in used)
        reader.error(f"{keys} mix the {names} conventions (allowed: one convention per container)")
        return None
    conv = used[0]
    own = present & set(conv.keys)
    if conv is HAMI and own == {HAMI.count} and not options.translate_bare_gpu:
        return None  # the plain NVIDIA device plugin's resource

    # Read every key of the convention from limits and requests; they must agree where both are set.
    values: dict[str, _Value] = {}
    errors_before = len(review.errors)
    for key in conv.keys:
        seen: list[_Value] = []
        for part in ("limits", "requests"):
            if key not in dicts.get(part, {}):
                continue
            raw = dicts[part][key]
            if key == conv.memory:
                value = reader.memory(key, raw, conv.memory_mib_per_unit)
            elif key == conv.memory_percentage:
                value = reader.integer(key, raw, "a whole percent from 1 to 100")
            elif key == conv.share:
                what = (
                    "a whole percent such as 30"
                    if conv.share_milli_per_unit == 10
                    else "a whole number of milli such as 300"
                )
                value = reader.integer(key, raw, what)
            else:
                value = reader.integer(key, raw, f"a whole number of devices from 1 to {options.max_devices}")
            if value is not None:
                seen.append(value)
        if len(seen) == 2 and seen[0].number != seen[1].number:
            reader.error(
                f"{key} is {_show(seen[0].raw)} in limits but {_show(seen[1].raw)} in requests "
                "(allowed: the same value in both)"
            )
        elif seen:
            values[key] = seen[0]
    if len(review.errors) > errors_before:
        return None

    slices = _check(reader, conv, values, options)
    if slices is None:
        return None
    slices = ContainerSlices(name, conv.name, *slices)

    # The container's new resources: the convention's keys out, flexai's canonical keys in.
    wanted = {RESOURCE_VXPU: str(slices.count)}
    if slices.share_milli is not None:
        wanted[RESOURCE_SHARE] = str(slices.share_milli)
    if slices.memory_mib is not None:
        wanted[RESOURCE_MEMORY] = str(slices.memory_mib)
    ops: list[dict[str, Any]] = []
    for part, current in dicts.items():
        if not set(current) & set(conv.keys):
            continue
        updated = {k: v for k, v in current.items() if k not in conv.keys}
        updated.update(wanted)
        if updated != current:
            ops.append({"op": "replace", "path": _pointer(*path, "resources", part), "value": updated})
    return slices, ops


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
        if conv.share_milli_per_unit == 1:
            allowed = f"{step} to 1000 milli in steps of {step}, i.e. {step / 10:g} % to 100 %"
        else:
            allowed = f"{step / 10:g} % to 100 % in steps of {step / 10:g} %"
        if not 1 <= share <= FULL_SHARE_MILLI:
            reader.error(f"{share_value} is outside 1 % to 100 % of a device (allowed: {allowed})")
            ok = False
        elif share % step:
            reader.error(f"{share_value} is not on the {step / 10:g} % share step (allowed: {allowed})")
            ok = False
    elif conv is not FLEXAI and options.default_share_milli is not None:
        share = options.default_share_milli
    if ok and share is not None and share < FULL_SHARE_MILLI and count > 1:
        reader.error(
            f"{share_value or f'default share {share}'} with {count_value} asks for part of several devices "
            "(allowed: a share below the whole device on 1 device, or the whole device on several)"
        )
        ok = False

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
        elif options.device_memory_mib is not None:
            memory = options.device_memory_mib * percentage_value.number // 100
        else:
            percentage = percentage_value.number
    if not ok:
        return None
    return count, share, memory, percentage


def inspect_pod(pod: object, options: WebhookOptions | None = None) -> PodReview:
    """Read a pod: the flexai slices its containers ask for, the JSON patch that rewrites it, the errors."""
    options = options or WebhookOptions()
    review = PodReview()
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        review.errors.append("request.object: not a pod with a spec (allowed: a Pod object)")
        review.malformed = True
        return review
    spec = pod["spec"]
    resource_ops: list[dict[str, Any]] = []
    for list_name in ("initContainers", "containers"):
        containers = spec.get(list_name) or []
        if not isinstance(containers, list):
            continue
        for index, container in enumerate(containers):
            if not isinstance(container, Mapping):
                continue
            result = _read_container(container, ("spec", list_name, index), review, options)
            if result is None:
                continue
            slices, ops = result
            review.slices.append(slices)
            resource_ops.extend(ops)
    if review.errors or not review.slices:
        return review

    review.asks_flexai = True
    review.translated_from = tuple(sorted({s.convention for s in review.slices} - {"flexai"}))
    patch: list[dict[str, Any]] = []
    if spec.get("schedulerName") != SCHEDULER_NAME:
        op = "replace" if "schedulerName" in spec else "add"
        patch.append({"op": op, "path": "/spec/schedulerName", "value": SCHEDULER_NAME})
    patch.extend(resource_ops)

    annotations: dict[str, str] = {}
    if review.translated_from:
        annotations[ANNOTATION_TRANSLATED] = ",".join(review.translated_from)
    percentages = {s.container: s.memory_percentage for s in review.slices if s.memory_percentage is not None}
    if percentages:
        annotations[ANNOTATION_MEMORY_PERCENTAGE] = json.dumps(percentages, sort_keys=True)
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else None
    existing = metadata.get("annotations") if metadata is not None else None
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
