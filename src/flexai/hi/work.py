"""Work items, priority classes and the decisions the Hi Scheduler hands to its adapters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from flexai.model.cluster import Placement, Request


class HiError(ValueError):
    """Input the Hi Scheduler refuses: the message names the field, the value and what is allowed."""


class PriorityClass(enum.IntEnum):
    """``high`` is never preempted, ``normal`` only after its minimum runtime, ``low`` at any time."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> PriorityClass:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise HiError(f"priority_class={text!r} is not allowed: high, normal or low") from None


QOS_CLASSES: dict[str, PriorityClass] = {
    # openb's QoS names: latency-sensitive services must not wait, best-effort work may yield any time.
    "LS": PriorityClass.HIGH,
    "Guaranteed": PriorityClass.NORMAL,
    "Burstable": PriorityClass.NORMAL,
    "BE": PriorityClass.LOW,
}


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One replica waiting for or holding slices: a request plus how it is ordered and protected."""

    id: str
    request: Request
    priority_class: PriorityClass = PriorityClass.NORMAL
    priority: int = 0
    """Orders work inside a class (higher first)."""
    queue: str = "default"
    gang: str = ""
    """Items with the same gang id start together or not at all."""
    gang_size: int = 1
    submit_time_s: float = 0.0
    min_runtime_s: float | None = None
    """How long a ``normal`` item runs before it may be preempted; None = the configured default."""
    name: str = ""
    movable: bool = True
    """May defragmentation move it (stop it and start it again elsewhere)? False for work that cannot be
    restarted without its users noticing, e.g. a remote lease whose client holds a session."""

    def __post_init__(self) -> None:
        if not self.id:
            raise HiError("id='' is not allowed: a non-empty work item id")
        if not self.queue:
            raise HiError("queue='' is not allowed: a queue name")
        if self.gang_size < 1 or (not self.gang and self.gang_size != 1):
            raise HiError(f"gang_size={self.gang_size} is not allowed: >= 1, and 1 without a gang")
        if self.min_runtime_s is not None and self.min_runtime_s < 0:
            raise HiError(f"min_runtime_s={self.min_runtime_s} is not allowed: >= 0 seconds")

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass
class Running:
    """Hi's record of an item that holds slices."""

    item: WorkItem
    placement: Placement
    model: str
    started_s: float
    protected_until_s: float
    """No preemption before this time (minimum runtime, or the back-off after an earlier preemption)."""
    preempted_by: frozenset[str] = frozenset()
    """Items that preempted this one (directly or up the chain): it may never preempt them back."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start ``item`` on ``placement`` (already reserved) once every item in ``after`` has stopped."""

    item: WorkItem
    placement: Placement
    reason: str
    after: tuple[str, ...] = ()
    opportunistic: bool = False
    """A guest on share granted to others (``low`` work on idle time): nothing is reserved in the ledger; it
    pauses while the owners are busy and yields when they need the memory."""


@dataclass(frozen=True, slots=True)
class Preempt:
    """Stop ``victim``; its slices already belong to ``by``. Tell Hi with ``requeue`` once it has stopped."""

    victim: WorkItem
    by: str
    reason: str
    lost_work_s: float
    kind: str = "preempt"
    """``preempt`` (for a higher-class or reclaiming item), ``yield`` (a guest whose owners need the memory) or
    ``gang`` (a gang that did not start in time)."""


@dataclass(frozen=True, slots=True)
class Move:
    """Migrate ``item`` from ``source`` to ``target`` (both already moved in the ledger: the target is held for
    it): stop it, then start it again on the target. Costs its work since its last checkpoint."""

    item: WorkItem
    source: Placement
    target: Placement
    reason: str
    lost_work_s: float
    why: str = ""
    """The purpose alone ("to open a hole for job-x", "consolidation"), for adapters that name places their way."""


@dataclass
class CycleResult:
    starts: list[Start] = field(default_factory=list)
    preemptions: list[Preempt] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each item still pending waits."""
    next_wakeup_s: float | None = None
    """When a protection ends that could let a waiting item preempt: run a cycle then even if nothing happens."""
    moves: list[Move] = field(default_factory=list)
    """Migrations (defragmentation and consolidation), carried out before the starts that wait on them."""
    pauses: list[str] = field(default_factory=list)
    """Guests to pause now (their devices' owners are busy)."""
    resumes: list[str] = field(default_factory=list)
    """Paused guests to resume (their owners are idle again)."""
