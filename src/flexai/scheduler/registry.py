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


def policy_names() -> list[str]:
    _load_builtin()
    return list(_POLICIES)


def create_policy(name: str, context: PolicyContext | None = None) -> Policy:
    _load_builtin()
    cls = _POLICIES.get(name)
    if cls is None:
        raise UnknownPolicyError(f"policy={name!r} is not known: choose from {', '.join(_POLICIES)}")
    return cls(context)


def _load_builtin() -> None:
    import flexai.scheduler.policies  # noqa: F401  (registers the built-in policies)
