"""Kubernetes resource quantities ("500m", "8Gi", "2", "1.5") in the units flexai counts."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}


class QuantityError(ValueError):
    pass


def parse_quantity(value: object, field: str = "quantity") -> Decimal:
    """The quantity as a plain number (bytes for memory, cores for CPU, a count for extended resources)."""
    text = str(value).strip()
    for suffix, factor in _BINARY.items():
        if text.endswith(suffix):
            return _number(text[: -len(suffix)], field, value) * factor
    for suffix in sorted(_DECIMAL, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return _number(text[: -len(suffix)], field, value) * _DECIMAL[suffix]
    return _number(text, field, value)


def _number(text: str, field: str, original: object) -> Decimal:
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise QuantityError(f"{field}={original!r} is not allowed: a Kubernetes quantity like 500m, 8Gi or 2") from None
    if not number.is_finite() or number < 0:
        raise QuantityError(f"{field}={original!r} is not allowed: a quantity of 0 or more")
    return number


def cpu_milli(value: object, field: str = "cpu") -> int:
    return int(parse_quantity(value, field) * 1000)


def memory_mib(value: object, field: str = "memory") -> int:
    return int(parse_quantity(value, field) / 2**20)


def count(value: object, field: str) -> int:
    number = parse_quantity(value, field)
    if number != number.to_integral_value():
        raise QuantityError(f"{field}={value!r} is not allowed: a whole number")
    return int(number)
