"""Device discovery per vendor behind one interface: which accelerators this node has and who uses them.

``discover()`` picks the backend (NVIDIA through NVML, Ascend through ``npu-smi``, AMD through AMD SMI, or
simulated devices) and returns it with the devices it sees. Vendor libraries are imported only when asked,
so this package imports on any machine.
"""

from flexai.node.amd import AmdBackend
from flexai.node.ascend import AscendBackend, NpuSmiParseError, parse_npu_smi, parse_npu_smi_info
from flexai.node.devices import (
    AUTO_ORDER,
    DeviceBackend,
    DeviceInfo,
    DiscoveryError,
    NoDevicesError,
    backend_names,
    create_backend,
    discover,
    register_backend,
)
from flexai.node.nvidia import NvidiaBackend
from flexai.node.sim import SimBackend, parse_devices_spec

__all__ = [
    "AUTO_ORDER",
    "AmdBackend",
    "AscendBackend",
    "DeviceBackend",
    "DeviceInfo",
    "DiscoveryError",
    "NoDevicesError",
    "NpuSmiParseError",
    "NvidiaBackend",
    "SimBackend",
    "backend_names",
    "create_backend",
    "discover",
    "parse_devices_spec",
    "parse_npu_smi",
    "parse_npu_smi_info",
    "register_backend",
]
