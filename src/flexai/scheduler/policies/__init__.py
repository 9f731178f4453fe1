"""Built-in policies. Reproductions of published policies carry their published names."""

from flexai.scheduler.policies import (  # noqa: F401
    bestfit,
    clustering,
    dotprod,
    fgd,
    flex,
    k8s_whole_gpu,
    packing,
    random,
)
