"""Fixtures for the tests against a real control plane (see controlplane.py).

Without the binaries these tests are skipped with one line saying how to build them, unless
``FLEXAI_K8S_REQUIRED=1`` (CI sets it after building them), where a missing binary fails instead."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.k8s_real.controlplane import ControlPlane, binaries_dir, missing_binaries
from tests.k8s_real.helpers import NODES


def _availability() -> str:
    """'' when the binaries are there, else why not."""
    missing = missing_binaries()
    if not missing:
        return ""
    go = "" if shutil.which("go") else " (Go is not installed: it is needed to build them)"
    return (
        f"real Kubernetes binaries missing in {binaries_dir()} ({', '.join(missing)}): "
        f"build them with `bash tests/k8s_real/build.sh`{go}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _availability()
    if not reason:
        return
    here = os.path.dirname(__file__)
    ours = [item for item in items if str(item.fspath).startswith(here)]
    if not ours:
        return
    if os.environ.get("FLEXAI_K8S_REQUIRED") == "1":
        raise pytest.UsageError(f"FLEXAI_K8S_REQUIRED=1 but {reason}")
    marker = pytest.mark.skip(reason=reason)
    for item in ours:
        item.add_marker(marker)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane: etcd, kube-apiserver, kube-controller-manager, kwok with three GPU nodes, flexai's
    agents, webhook (registered through the chart's webhook configurations) and extender, and kube-scheduler with
    the chart's configuration. Ended whole at the end of the session."""
    plane = ControlPlane(tmp_path_factory.mktemp("k8s-real"))
    try:
        plane.start()
        plane.start_kwok()
        plane.add_nodes(NODES)
        for node in NODES:
            plane.start_agent(node)
        plane.start_webhook()
        port = plane.start_extender("flexai-extender", "--no-leader-election")
        plane.start_scheduler(port)
        yield plane
    finally:
        plane.stop()
