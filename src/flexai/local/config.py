"""`flexai serve --config FILE`: the pool's queues, quotas and Hi Scheduler knobs, in TOML.

```toml
[hi]                                   # optional; every key optional
normal_min_runtime_s = 600             # a normal job runs this long before it may be preempted
preempt_backoff_s = 1800               # a restarted victim is not preempted again for this long
preemption_delay_s = 0                 # a blocked job waits this long for room before it preempts
preemption_grace_s = 10                # a victim gets SIGTERM, this long, then SIGKILL
preemption = "fraction-aware"          # or "k8s-default", or "none" (never preempt)
reservation = true                     # the first blocked job holds its devices (false: smaller work may
                                       # always start ahead of it: more use, but a large job may starve)
timeshare = true                       # low jobs run as guests on idle share granted to others (only on
                                       # devices that tell how busy they are); `serve --no-timeshare` wins
timeshare_busy_pct = 50                # a device this busy pauses its guests and takes no new one
timeshare_memory_headroom_pct = 5      # device memory kept free beside owners and guests
timeshare_max_guests = 1               # guests per device
defrag_max_moves = 0                   # when the first job in line is blocked by fragmentation (enough free
                                       # share in all, but no device or node where it fits), move at most
                                       # this many normal/low jobs (never high ones) to open a hole for it: a
                                       # moved job is stopped (SIGTERM, grace, SIGKILL) and started again on
                                       # its new slice, keeping its id; 0 = never move
consolidation_interval_s = 0           # with defrag_max_moves > 0: every this often, while work waits, move
                                       # up to that many jobs to empty the least-used devices; 0 = never
defrag_retry_s = 60                    # a blocked job for which no moves were found is searched again after
                                       # this long (sooner if what runs changes)

[queues.a]
weight = 1                             # fair share between queues beyond their guarantees
guarantee = { devices = 1 }            # or { share = "150%" }; memory = "80GiB" binds device memory too
borrowing_limit = { devices = 1 }      # how far beyond the guarantee it may borrow; absent = no limit

[queues.b.guarantee]                   # a quota as a table: per device model instead of (or beside) any model
devices = 1
models = { A100 = { devices = 1, memory = "80GiB" } }
```

Parsed with ``tomllib``, checked with pydantic; a bad file raises ``ConfigError`` with one line that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flexai.hi import ANY_MODEL, HiConfig, HiError, QueueSpec, Quota

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
QUEUE_NAME_RULE = "1..63 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_DEVICES = 1_000_000
MAX_WEIGHT = 1_000_000
_SHARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(%|m)\s*")
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(GiB|G|MiB|M|TiB|T)\s*")
_MIB_PER = {"M": 1, "MiB": 1, "G": 1024, "GiB": 1024, "T": 1 << 20, "TiB": 1 << 20}


class ConfigError(ValueError):
    """A config file refused: one line naming the key, the value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key",
                        {"key": str(key), "allowed": ", ".join(cls.model_fields)},
                    )
        return data


class Amount(_Strict):
    """What a queue gets of one bucket: devices (or a share) and device memory."""

    devices: float | None = None
    share: str | None = None
    memory: str | int | None = None

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or not 0 <= value <= MAX_DEVICES):
            raise ValueError(f"a number of devices in 0..{MAX_DEVICES} (1.5 = one and a half)")
        if value is not None and round(value * 1000) != value * 1000:
            raise ValueError("a number of devices in steps of 0.001")
        return value

    @field_validator("share")
    @classmethod
    def _share(cls, value: str | None) -> str | None:
        if value is not None and share_milli(value) is None:
            raise ValueError("a share of devices like 150% or 1500m (1000m = one device)")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | int | None:
        if value is not None and memory_mib(value) is None:
            raise ValueError("device memory like 80GiB or 81920MiB, or a whole number of MiB")
        return value

    @model_validator(mode="after")
    def _one_share(self) -> Amount:
        if self.devices is not None and self.share is not None:
            raise PydanticCustomError("both", "give devices or share, not both", {})
        return self

    def share_milli(self) -> int | None:
        if self.devices is not None:
            return round(self.devices * 1000)
        return share_milli(self.share) if self.share is not None else None


class QuotaSection(Amount):
    models: dict[str, Amount] = {}
    """Per device model (the name the pool shows, e.g. ``A100``)."""

    def to_quota(self) -> Quota:
        shares: dict[str, int] = {}
        memory: dict[str, int] = {}
        for bucket, amount in [(ANY_MODEL, self), *self.models.items()]:
            share = amount.share_milli()
            if share is not None:
                shares[bucket] = share
            if amount.memory is not None:
                memory[bucket] = memory_mib(amount.memory)  # type: ignore[assignment]
        return Quota(share_milli=shares, memory_mib=memory)


class QueueSection(_Strict):
    weight: float = 1.0
    guarantee: QuotaSection | None = None
    borrowing_limit: QuotaSection | None = None

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
            raise ValueError(f"a number > 0 and <= {MAX_WEIGHT}")
        return value


class HiSection(_Strict):
    normal_min_runtime_s: float = 600.0
    preempt_backoff_s: float = 1800.0
    preemption_delay_s: float = 0.0
    preemption_grace_s: float = 10.0
    preemption: str = "fraction-aware"
    reservation: bool = True
    timeshare: bool = True
    timeshare_busy_pct: float = 50.0
    timeshare_memory_headroom_pct: float = 5.0
    timeshare_max_guests: int = 1
    defrag_max_moves: int = 0
    consolidation_interval_s: float = 0.0
    defrag_retry_s: float = 60.0

    @field_validator("timeshare_busy_pct", "timeshare_memory_headroom_pct")
    @classmethod
    def _percent(cls, value: float) -> float:
        if not math.isfinite(value) or not 0 <= value <= 100:
            raise ValueError("a percentage in 0..100")
        return value

    @field_validator("timeshare_max_guests")
    @classmethod
    def _guests(cls, value: int) -> int:
        if not 1 <= value <= 64:
            raise ValueError("a number of guests per device in 1..64")
        return value

    @field_validator("defrag_max_moves")
    @classmethod
    def _moves(cls, value: int) -> int:
        if not 0 <= value <= 1000:
            raise ValueError("a number of moves in 0..1000 (0 = never move)")
        return value

    @field_validator(
        "normal_min_runtime_s",
        "preempt_backoff_s",
        "preemption_delay_s",
        "preemption_grace_s",
        "consolidation_interval_s",
        "defrag_retry_s",
    )
    @classmethod
    def _seconds(cls, value: float) -> float:
        if not math.isfinite(value) or not 0 <= value <= 1e9:
            raise ValueError("seconds in 0..1e9")
        return value

    @field_validator("preemption")
    @classmethod
    def _plugin(cls, value: str) -> str:
        if value not in ("fraction-aware", "k8s-default", "none"):
            raise ValueError("fraction-aware, k8s-default or none")
        return value


class ConfigFile(_Strict):
    hi: HiSection = HiSection()
    queues: dict[str, QueueSection] = {}

    @field_validator("queues", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
                    raise PydanticCustomError("queue_name", QUEUE_NAME_RULE, {"key": str(name)})
        return value


@dataclass(frozen=True)
class PoolSettings:
    """What a config file sets: the Hi Scheduler's knobs, the queues and the preemption grace."""

    hi: HiConfig = field(default_factory=HiConfig)
    queues: tuple[QueueSpec, ...] = ()
    preemption_grace_s: float = 10.0
    timeshare: bool = True
    """Time-sharing of idle share in the pool (``PoolConfig.timeshare``)."""

    def models_named(self) -> dict[str, str]:
        """Device model named in a quota -> the key that names it (to check them against the pool's devices)."""
        named: dict[str, str] = {}
        for spec in self.queues:
            for what, quota in (("guarantee", spec.guarantee), ("borrowing_limit", spec.borrowing_limit)):
                for bucket in sorted(quota.buckets if quota else ()):
                    if bucket != ANY_MODEL:
                        named.setdefault(bucket, f"queues.{spec.name}.{what}.models.{bucket}")
        return named


def share_milli(text: str) -> int | None:
    """'150%' or '1500m' -> 1500; None when it is neither."""
    match = _SHARE.fullmatch(text)
    if not match:
        return None
    value = float(match.group(1)) * (10 if match.group(2) == "%" else 1)
    if value != int(value) or value > MAX_DEVICES * 1000:
        return None
    return int(value)


def memory_mib(value: str | int) -> int | None:
    """'80GiB', '81920MiB' or 81920 -> MiB; None when it is none of them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 1 << 40 else None
    match = _MEMORY.fullmatch(value)
    if not match:
        return None
    mib = float(match.group(1)) * _MIB_PER[match.group(2)]
    return int(mib) if mib == int(mib) and mib <= 1 << 40 else None


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return ""
    text = repr(value)
    return "=" + (text if len(text) <= 80 else text[:77] + "...")


def describe(error: dict[str, Any]) -> str:
    """One of pydantic's errors as ``key=value is not allowed: what is allowed``."""
    loc = tuple(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    kind = error.get("type", "")
    if kind == "unknown_key":
        where = _key(loc)
        key = f"{where}.{ctx['key']}" if loc else ctx["key"]
        return f"{key} is not allowed: an unknown key; {where} takes {ctx['allowed']}"
    if kind == "queue_name":
        return f"queues.{ctx['key']!r} is not allowed: a queue name of {QUEUE_NAME_RULE}"
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if kind == "both":
        return f"{_key(loc)} is not allowed: {message}"
    if kind == "model_type" or kind == "dict_type":
        return f"{_key(loc)}{_shown(error.get('input'))} is not allowed: a table of keys"
    return f"{_key(loc)}{_shown(error.get('input'))} is not allowed: {message[:1].lower()}{message[1:]}"


def parse_config(text: str) -> PoolSettings:
    """A config file's text -> ``PoolSettings``; raises ``ConfigError`` with one line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    try:
        parsed = ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc.errors()[0])) from None
    section = parsed.hi
    try:
        hi = HiConfig(
            normal_min_runtime_s=section.normal_min_runtime_s,
            preempt_backoff_s=section.preempt_backoff_s,
            preemption_delay_s=section.preemption_delay_s,
            preemption=section.preemption,
            reservation=section.reservation,
            timeshare_busy_pct=section.timeshare_busy_pct,
            timeshare_memory_headroom_pct=section.timeshare_memory_headroom_pct,
            timeshare_max_guests=section.timeshare_max_guests,
            defrag_max_moves=section.defrag_max_moves,
            consolidation_interval_s=section.consolidation_interval_s,
            defrag_retry_s=section.defrag_retry_s,
        )
        queues = tuple(
            QueueSpec(
                name,
                guarantee=queue.guarantee.to_quota() if queue.guarantee else Quota(),
                borrowing_limit=queue.borrowing_limit.to_quota() if queue.borrowing_limit else None,
                weight=queue.weight,
            )
            for name, queue in parsed.queues.items()
        )
    except HiError as exc:
        raise ConfigError(str(exc)) from None
    return PoolSettings(
        hi=hi, queues=queues, preemption_grace_s=section.preemption_grace_s, timeshare=section.timeshare
    )


def load_config(path: Path) -> PoolSettings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text") from None
    return parse_config(text)


__all__ = ["ConfigError", "PoolSettings", "load_config", "parse_config"]
