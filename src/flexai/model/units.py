"""Units used across flexai. Names carry their unit: share_milli, memory_mib, cpu_milli, wall_s."""

FULL_SHARE_MILLI = 1000
"""A whole device's compute share, in milli (1000 = the whole device)."""

CPU_MILLI_PER_CORE = 1000
