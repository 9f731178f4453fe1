"""flexai.torch caps PyTorch's allocator to the slice (checked with a stand-in torch module)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flexai.torch import apply_slice_limits, slice_memory_limits_mib

GIB = 1024**3


def fake_torch(devices: int, total_bytes: int) -> SimpleNamespace:
    calls: list[tuple[float, int]] = []
    cuda = SimpleNamespace(
        is_available=lambda: devices > 0,
        device_count=lambda: devices,
        get_device_properties=lambda i: SimpleNamespace(total_memory=total_bytes),
        set_per_process_memory_fraction=lambda fraction, device: calls.append((fraction, device)),
    )
    return SimpleNamespace(cuda=cuda, calls=calls)


def env(*memory_mib: int) -> dict[str, str]:
    return {"FLEXAI_SLICES": json.dumps([{"device": i, "memory_mib": m} for i, m in enumerate(memory_mib)])}


def test_each_visible_device_gets_its_quota_as_a_fraction() -> None:
    torch = fake_torch(2, 80 * GIB)
    applied = apply_slice_limits(torch, env(8192, 0))
    assert applied == {0: pytest.approx(0.1)}
    assert torch.calls == [(pytest.approx(0.1), 0)]


def test_no_slices_or_no_cuda_changes_nothing() -> None:
    assert apply_slice_limits(fake_torch(2, GIB), {}) == {}
    assert apply_slice_limits(fake_torch(0, GIB), env(1024)) == {}


def test_bad_slices_variable_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="FLEXAI_SLICES='nope' is not allowed: a JSON list of slices"):
        slice_memory_limits_mib({"FLEXAI_SLICES": "nope"})
