"""The engine: framework, plugin registry and policies (one module each)."""

from flexai.scheduler.framework import Policy, PolicyContext, Scheduler, ScheduleResult, Status
from flexai.scheduler.registry import UnknownPolicyError, create_policy, policy_names

__all__ = [
    "Policy",
    "PolicyContext",
    "ScheduleResult",
    "Scheduler",
    "Status",
    "UnknownPolicyError",
    "create_policy",
    "policy_names",
]
