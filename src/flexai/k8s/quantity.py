"""Kubernetes resource quantities ("500m", "8Gi", "2", "1e3") in the units flexai counts."""

from __future__ import annotations

import functools
import math
import re
from decimal import Decimal, InvalidOperation

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))(?P<suffix>[eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class QuantityError(ValueError):
    """A value that is not a Kubernetes quantity."""


def parse_quantity_with_suffix(value: object) -> tuple[Decimal, bool]:
    """A Kubernetes quantity ("30", "8Gi", "500Mi", "1e3", "100m") as (number, has_byte_suffix).

    ``has_byte_suffix`` is true for the binary and decimal SI suffixes (Ki..Ei, n..E), false for a plain
    number or an exponent. Raises ``QuantityError`` for anything else (bools, lists, "8 GB", "")."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise QuantityError(f"{value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise QuantityError(f"{value!r}")
    text = str(value).strip() if isinstance(value, str) else repr(value)
    if len(text) <= 32:  # every pod event carries the same few quantities: parse each text once
        return _parse_text(text)
    return _parse_uncached(text)


@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> tuple[Decimal, bool]:
    return _parse_uncached(text)


def _parse_uncached(text: str) -> tuple[Decimal, bool]:
    match = _QUANTITY.match(text)
    if match is None:
        raise QuantityError(text)
    try:
        number = Decimal(match["num"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimal numbers
        raise QuantityError(text) from exc
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix], True
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix]), True
    if suffix:
        return number.scaleb(int(suffix[1:])), False
    return number, False


def parse_quantity(value: object, field: str = "quantity") -> Decimal:
    """A non-negative quantity as a plain number (bytes for memory, cores for CPU, a count otherwise);
    the error names the field, the value and what is allowed."""
    try:
        number, _ = parse_quantity_with_suffix(value)
    except QuantityError:
        raise QuantityError(f"{field}={value!r} is not allowed: a Kubernetes quantity like 500m, 8Gi or 2") from None
    if number < 0:
        raise QuantityError(f"{field}={value!r} is not allowed: a quantity of 0 or more")
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
