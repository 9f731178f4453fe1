"""Hold PyTorch to the job's slice: cap the CUDA caching allocator to the slice's device memory.

Inside a job started by the pool::

    import flexai.torch
    flexai.torch.apply_slice_limits()   # before the first CUDA allocation

reads ``FLEXAI_SLICES`` (set by the pool) and calls ``torch.cuda.set_per_process_memory_fraction`` on each
visible device, so PyTorch raises its own out-of-memory error at the quota instead of the pool's watchdog
stopping the job.
"""

from __future__ import annotations

import json
import os
from types import ModuleType

MIB = 1024 * 1024


def slice_memory_limits_mib(environ: dict[str, str] | None = None) -> list[int]:
    """Memory quota (MiB) of each visible device, in visible order; 0 means no quota."""
    env = os.environ if environ is None else environ
    raw = env.get("FLEXAI_SLICES")
    if not raw:
        return []
    try:
        slices = json.loads(raw)
        return [int(s.get("memory_mib", 0)) for s in slices]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"FLEXAI_SLICES={raw[:80]!r} is not allowed: a JSON list of slices ({exc})") from None


def apply_slice_limits(
    torch_module: ModuleType | None = None, environ: dict[str, str] | None = None
) -> dict[int, float]:
    """Set the allocator fraction of every visible device with a quota; returns {device: fraction}."""
    if torch_module is None:
        import torch as torch_module  # type: ignore[no-redef]
    limits = slice_memory_limits_mib(environ)
    applied: dict[int, float] = {}
    if not limits or not torch_module.cuda.is_available():
        return applied
    for device, limit_mib in enumerate(limits):
        if limit_mib <= 0 or device >= torch_module.cuda.device_count():
            continue
        total = torch_module.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, limit_mib * MIB / total)
        torch_module.cuda.set_per_process_memory_fraction(fraction, device)
        applied[device] = fraction
    return applied
