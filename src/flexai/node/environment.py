"""The environment a process gets for its slices — the same in the embedded pool and under Kubernetes.

Identity and slices for flexai's own helpers (``FLEXAI_JOB_ID``, ``FLEXAI_SLICES``), the vendor's
visibility variable, and the variables existing enforcement layers read, so that a machine which has them
holds the process to hard limits: HAMi-core (``CUDA_DEVICE_MEMORY_LIMIT_<i>``, ``CUDA_DEVICE_SM_LIMIT``)
and NVIDIA MPS (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``). Indices in
those variables count the visible devices (0, 1, ...), as the layers expect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from flexai.node.devices import DeviceBackend


def slice_environment(backend: DeviceBackend, job_id: str, slices: Sequence[Mapping[str, object]]) -> dict[str, str]:
    """``slices``: one mapping per device with ``device`` (index), ``uuid``, ``share_milli``, ``memory_mib``."""
    indices = [int(s["device"]) for s in slices]  # type: ignore[call-overload]
    uuids = [str(s["uuid"]) for s in slices]
    env = dict(backend.visibility_env(indices, uuids))
    env["FLEXAI_JOB_ID"] = job_id
    env["FLEXAI_SLICES"] = json.dumps([dict(s) for s in slices])
    share_milli = min((int(s["share_milli"]) for s in slices), default=1000)  # type: ignore[call-overload]
    share_pct = max(1, share_milli // 10)
    env["CUDA_DEVICE_SM_LIMIT"] = str(share_pct)
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share_pct)
    memory = [int(s.get("memory_mib", 0)) for s in slices]  # type: ignore[call-overload]
    if any(memory):
        for visible_index, mib in enumerate(memory):
            if mib:
                env[f"CUDA_DEVICE_MEMORY_LIMIT_{visible_index}"] = f"{mib}m"
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(f"{i}={mib}M" for i, mib in enumerate(memory) if mib)
        env["FLEXAI_MEMORY_LIMIT_MIB"] = str(max(memory))
    return env
