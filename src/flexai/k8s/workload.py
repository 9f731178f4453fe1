"""What the Hi Scheduler needs to know of a pod beyond its slices (class, queue, gang), and the queue
configuration the chart installs as a ConfigMap.

**Classes.** A pod's class comes from its priority value (``spec.priority``, which the API server's
admission fills in from the pod's PriorityClass):

==============================================  =========
priority value (or PriorityClass name)          class
==============================================  =========
``>= 1,000,000``, or ``system-cluster-critical``  ``high``
/ ``system-node-critical``
``0 .. 999,999`` (and no priority at all)       ``normal``
``< 0``                                         ``low``
==============================================  =========

The annotation ``flexai.io/priority-class: high|normal|low`` overrides the band. The value itself orders
pods inside one class (higher first).

**Queues.** The label (or annotation) ``flexai.io/queue`` names the pod's queue; without it the queue is
the pod's namespace. **Gangs**: ``flexai.io/gang`` (or Volcano's ``scheduling.k8s.io/group-name``) and
``flexai.io/gang-size``, as labels or annotations; gang ids are per namespace.

**Queue configuration** (ConfigMap ``flexai-queues``, key ``queues.yaml``)::

    queues:
      team-a:
        weight: 2                      # fair share between queues beyond their guarantees
        guarantee:
          devices: 8                   # whole-device equivalents (1.5 = one and a half devices' share)
          memoryMiB: 327680            # device memory (optional)
          cpu: 64                      # CPUs (optional)
        borrowingLimit:                # how far beyond the guarantee it may borrow (absent: no limit)
          devices: 4
      team-b:
        guarantee:
          devices: {A100: 4, "*": 2}  # per device model; "*" = any model not named

``devices`` and ``memoryMiB`` take a number (any model) or a mapping per device model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexai.hi import ANY_MODEL, HiError, PriorityClass, QueueSpec, Quota
from flexai.k8s import names

HIGH_PRIORITY_MIN = 1_000_000
"""Priority values from here up are ``high`` (Kubernetes' own system classes are 2,000,000,000 and up)."""
SYSTEM_CLASSES = frozenset({"system-cluster-critical", "system-node-critical"})
QUEUES_KEY = "queues.yaml"
"""The ConfigMap's data key holding the queue configuration."""


class WorkloadError(ValueError):
    """A pod's class, queue or gang cannot be read; the message names the field, the value and what is allowed."""


@dataclass(frozen=True, slots=True)
class PodWork:
    priority_class: PriorityClass
    priority: int
    queue: str
    gang: str
    gang_size: int
    bound_at_s: float | None


def _meta_value(meta: Mapping[str, Any], key: str) -> str:
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    value = labels.get(key)
    if value is None:
        value = annotations.get(key)
    return "" if value is None else str(value).strip()


def class_of(priority: int, class_name: str = "") -> PriorityClass:
    """The class of a priority value (see the module docstring for the bands)."""
    if class_name in SYSTEM_CLASSES or priority >= HIGH_PRIORITY_MIN:
        return PriorityClass.HIGH
    if priority < 0:
        return PriorityClass.LOW
    return PriorityClass.NORMAL


def pod_work(pod: Mapping[str, Any]) -> PodWork:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = meta.get("annotations") or {}
    raw_priority = spec.get("priority")
    try:
        priority = int(raw_priority) if raw_priority is not None else 0
    except (TypeError, ValueError):
        raise WorkloadError(f"spec.priority={raw_priority!r} is not allowed: an integer") from None
    override = str(annotations.get(names.ANNOTATION_PRIORITY_CLASS) or "").strip()
    if override:
        try:
            cls = PriorityClass.parse(override)
        except HiError:
            raise WorkloadError(
                f"{names.ANNOTATION_PRIORITY_CLASS}={override!r} is not allowed: high, normal or low"
            ) from None
    else:
        cls = class_of(priority, str(spec.get("priorityClassName") or ""))
    namespace = str(meta.get("namespace") or "default")
    queue = _meta_value(meta, names.LABEL_QUEUE) or namespace
    gang = _meta_value(meta, names.LABEL_GANG) or str(annotations.get(names.ANNOTATION_VOLCANO_GROUP) or "").strip()
    size_text = _meta_value(meta, names.LABEL_GANG_SIZE)
    gang_size = 1
    if gang:
        if not size_text:
            raise WorkloadError(
                f"gang {gang!r} without {names.LABEL_GANG_SIZE}: the gang's size is needed (a whole number >= 1)"
            )
        try:
            gang_size = int(size_text)
        except ValueError:
            gang_size = 0
        if not 1 <= gang_size <= 10_000:
            raise WorkloadError(f"{names.LABEL_GANG_SIZE}={size_text!r} is not allowed: a whole number in 1..10000")
        gang = f"{namespace}/{gang}"
    bound_at = None
    raw_bound = annotations.get(names.ANNOTATION_BOUND_AT)
    if raw_bound:
        try:
            bound_at = float(raw_bound)
        except ValueError:
            bound_at = None
    return PodWork(cls, priority, queue, gang, gang_size if gang else 1, bound_at)


# --------------------------------------------------------------------------------------------- queues


class QueueConfigError(ValueError):
    """The queue configuration is unreadable; the message names the field, the value and what is allowed."""


def _amounts(where: str, value: Any, scale: int) -> dict[str, int]:
    if isinstance(value, bool):
        raise QueueConfigError(f"{where}={value!r} is not allowed: a number >= 0 or a mapping model -> number")
    if isinstance(value, int | float):
        value = {ANY_MODEL: value}
    if not isinstance(value, Mapping):
        raise QueueConfigError(f"{where}={value!r} is not allowed: a number >= 0 or a mapping model -> number")
    out: dict[str, int] = {}
    for model, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 <= amount < 1e9:
            raise QueueConfigError(f"{where}[{model!r}]={amount!r} is not allowed: a number >= 0")
        if not math.isfinite(amount):
            raise QueueConfigError(f"{where}[{model!r}]={amount!r} is not allowed: a finite number")
        out[str(model)] = round(amount * scale)
    return out


_QUOTA_KEYS = {"devices", "memoryMiB", "cpu"}


def _quota(where: str, value: Any) -> Quota:
    if not isinstance(value, Mapping):
        raise QueueConfigError(f"{where}={value!r} is not allowed: a mapping with devices, memoryMiB, cpu")
    unknown = set(value) - _QUOTA_KEYS
    if unknown:
        raise QueueConfigError(f"{where}.{sorted(unknown)[0]} is not allowed: devices, memoryMiB or cpu")
    cpu = value.get("cpu")
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0 <= cpu < 1e9):
        raise QueueConfigError(f"{where}.cpu={cpu!r} is not allowed: a number of CPUs >= 0")
    try:
        return Quota(
            share_milli=_amounts(f"{where}.devices", value.get("devices", {}), 1000),
            memory_mib=_amounts(f"{where}.memoryMiB", value.get("memoryMiB", {}), 1),
            cpu_milli=None if cpu is None else round(cpu * 1000),
        )
    except HiError as exc:
        raise QueueConfigError(f"{where}: {exc}") from None


_QUEUE_KEYS = {"weight", "guarantee", "borrowingLimit"}


def parse_queues(text: str) -> list[QueueSpec]:
    """The queues of a ``queues.yaml`` (YAML or JSON; see the module docstring). Empty text: no queues."""
    import yaml

    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise QueueConfigError(f"{QUEUES_KEY}: not YAML or JSON ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping) or set(data) - {"queues"}:
        raise QueueConfigError(f"{QUEUES_KEY}: a mapping with one key, queues (got {data!r:.80})")
    queues = data.get("queues") or {}
    if not isinstance(queues, Mapping):
        raise QueueConfigError(f"queues={queues!r:.80} is not allowed: a mapping queue name -> spec")
    specs = []
    for name, spec in queues.items():
        where = f"queues.{name}"
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise QueueConfigError(
                f"{where}={spec!r:.80} is not allowed: a mapping with weight, guarantee, borrowingLimit"
            )
        unknown = set(spec) - _QUEUE_KEYS
        if unknown:
            raise QueueConfigError(f"{where}.{sorted(unknown)[0]} is not allowed: weight, guarantee or borrowingLimit")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise QueueConfigError(f"{where}.weight={weight!r} is not allowed: a number in (0, 1e6]")
        limit = spec.get("borrowingLimit")
        try:
            specs.append(
                QueueSpec(
                    str(name),
                    guarantee=_quota(f"{where}.guarantee", spec.get("guarantee") or {}),
                    borrowing_limit=None if limit is None else _quota(f"{where}.borrowingLimit", limit),
                    weight=float(weight),
                )
            )
        except HiError as exc:
            raise QueueConfigError(f"{where}: {exc}") from None
    return specs


__all__ = [
    "HIGH_PRIORITY_MIN",
    "QUEUES_KEY",
    "SYSTEM_CLASSES",
    "PodWork",
    "QueueConfigError",
    "WorkloadError",
    "class_of",
    "parse_queues",
    "pod_work",
]
