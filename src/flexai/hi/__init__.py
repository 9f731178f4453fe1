"""Hi Scheduler's workload level: queues, priority classes, preemption, gangs and backfill over the engine.

Pure (no clock, no I/O): the replay simulator, the embedded pool and the Kubernetes extender feed it what
arrived and what ended (and, for time-sharing, what the devices did), and carry out the ``Start``, ``Preempt``,
``Move`` and pause/resume decisions it returns, so what the replay measures is what runs.
"""

from flexai.hi.preemption import PREEMPTION_PLUGINS, FractionAware, KubeDefault, VictimSet
from flexai.hi.queues import ANY_MODEL, QueueBook, QueueSpec, Quota
from flexai.hi.scheduler import HiConfig, HiScheduler
from flexai.hi.timeshare import Guest, TimeSharing
from flexai.hi.work import (
    QOS_CLASSES,
    CycleResult,
    HiError,
    Move,
    Preempt,
    PriorityClass,
    Running,
    Start,
    WorkItem,
)

__all__ = [
    "ANY_MODEL",
    "PREEMPTION_PLUGINS",
    "QOS_CLASSES",
    "CycleResult",
    "FractionAware",
    "Guest",
    "HiConfig",
    "HiError",
    "HiScheduler",
    "KubeDefault",
    "Move",
    "Preempt",
    "PriorityClass",
    "QueueBook",
    "QueueSpec",
    "Quota",
    "Running",
    "Start",
    "TimeSharing",
    "VictimSet",
    "WorkItem",
]
