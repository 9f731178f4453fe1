"""flex: flexai's default policy (placeholder until tuned; see below)."""

from __future__ import annotations

from flexai.scheduler.policies.fgd import FragmentationDeltaPolicy
from flexai.scheduler.registry import register


@register
class FlexPolicy(FragmentationDeltaPolicy):
    name = "flex"
