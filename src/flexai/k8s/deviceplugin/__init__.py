"""The kubelet device plugin API v1beta1 (``api.proto`` and its generated modules) and flexai's plugin.

``plugin.DevicePluginServer`` advertises each device as virtual slots of ``flexai.io/vxpu`` and answers
Allocate from the scheduler's placements; see ``plugin``'s docstring and README.md beside this file.
"""
