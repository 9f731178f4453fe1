from __future__ import annotations

import pytest

from flexai.model import Node


@pytest.fixture
def small_nodes() -> list[Node]:
    return [
        Node("n-a", cpu_milli=32_000, host_memory_mib=131_072, device_count=2, device_model="T4"),
        Node("n-b", cpu_milli=64_000, host_memory_mib=262_144, device_count=8, device_model="V100M32"),
        Node("n-c", cpu_milli=16_000, host_memory_mib=65_536, device_count=1, device_model="T4"),
        Node("n-cpu", cpu_milli=96_000, host_memory_mib=393_216),
    ]
