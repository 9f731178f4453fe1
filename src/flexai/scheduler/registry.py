"""Name -> policy class registry: code registers, configuration chooses by name."""

from __future__ import annotations

from typing import TypeVar

from flexai.scheduler.framework import Policy, PolicyContext

_POLICIES: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: P) -> P:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    _POLICIES[cls.name] = cls
    return cls


# Display order: the FGD paper's six in its order, then ours, then the no-sharing baseline.
_PREFERRED_ORDER = ("random", "dotprod", "clustering", "packing", "bestfit", "fgd", "flex", "k8s-whole-gpu")


def policy_names() -> list[str]:
    _load_builtin()
    preferred = [n for n in _PREFERRED_ORDER if n in _POLICIES]
    return preferred + sorted(n for n in _POLICIES if n not in preferred)


def create_policy(name: str, context: PolicyContext | None = None) -> Policy:
    _load_builtin()
    cls = _POLICIES.get(name)
    if cls is None:
        raise UnknownPolicyError(f"policy={name!r} is not known: choose from {', '.join(_POLICIES)}")
    return cls(context)


def _load_builtin() -> None:
    import flexai.scheduler.policies  # noqa: F401  (registers the built-in policies)
