"""Cluster state held as arrays, with an idempotent ledger of grants and checkpoint/rollback.

Free compute share and memory per device, free CPU and host memory per node, and the device model per
node are numpy arrays so that filters and scores run over all nodes at once. Every change goes through
``reserve`` / ``unreserve``, which touch one node and bump its version (score caches key on it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from flexai.model.cluster import Node, Placement
from flexai.model.units import FULL_SHARE_MILLI


class LedgerError(RuntimeError):
    """A grant that would break the ledger's invariants (over capacity, granted twice, unknown device)."""


class ClusterState:
    """Free resources of every node and device, plus the ledger of who holds what."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        if not nodes:
            raise LedgerError("a cluster needs at least one node")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise LedgerError(f"node.name={dup!r} appears twice: node names must be unique")
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.node_count = len(nodes)
        self.max_devices_per_node = max(1, max(n.device_count for n in nodes))
        models = sorted({n.device_model for n in nodes if n.device_count > 0})
        self.model_names: tuple[str, ...] = tuple(models)
        self.model_index: dict[str, int] = {m: i for i, m in enumerate(models)}
        shape = (self.node_count, self.max_devices_per_node)
        self.device_count = np.array([n.device_count for n in nodes], dtype=np.int64)
        self.device_present = np.arange(self.max_devices_per_node)[None, :] < self.device_count[:, None]
        # -1 marks "no device model" (CPU-only node).
        self.node_model_id = np.array(
            [self.model_index[n.device_model] if n.device_count else -1 for n in nodes], dtype=np.int64
        )
        self.capacity_cpu_milli = np.array([n.cpu_milli for n in nodes], dtype=np.int64)
        self.capacity_host_memory_mib = np.array([n.host_memory_mib for n in nodes], dtype=np.int64)
        device_memory = np.array([n.device_memory_mib for n in nodes], dtype=np.int64)
        self.capacity_device_memory_mib = np.where(self.device_present, device_memory[:, None], 0)
        self.capacity_share_milli = np.where(self.device_present, FULL_SHARE_MILLI, 0).astype(np.int64)
        self.free_share_milli = self.capacity_share_milli.copy()
        self.free_device_memory_mib = self.capacity_device_memory_mib.copy()
        self.free_cpu_milli = self.capacity_cpu_milli.copy()
        self.free_host_memory_mib = self.capacity_host_memory_mib.copy()
        self.node_version = np.zeros(self.node_count, dtype=np.int64)
        # Device memory is only checked on nodes that report it.
        self.device_memory_known = device_memory > 0
        self.total_share_milli = int(self.capacity_share_milli.sum())
        self.allocated_share_milli = 0
        self.grants: dict[str, Placement] = {}

        self._journal: list[tuple[str, str, Placement]] = []
        assert shape == self.free_share_milli.shape

    def real_rows(self) -> np.ndarray:
        """Per row: does it hold a node? (All rows here; an adapter's state may keep vacant rows as headroom.)"""
        return np.ones(self.node_count, dtype=bool)

    # ----------------------------------------------------------------- queries
    def model_mask(self, allowed_models: frozenset[str]) -> np.ndarray:
        """Per node: may a request limited to ``allowed_models`` use this node's devices."""
        if not allowed_models:
            return self.device_count > 0
        ids = [self.model_index[m] for m in allowed_models if m in self.model_index]
        return np.isin(self.node_model_id, ids) if ids else np.zeros(self.node_count, dtype=bool)

    def fully_free_devices(self, node_index: int) -> np.ndarray:
        row = self.free_share_milli[node_index]
        return np.flatnonzero((row == FULL_SHARE_MILLI) & self.device_present[node_index])

    # ----------------------------------------------------------------- ledger
    def check(self, placement: Placement) -> None:
        """Raise LedgerError unless ``placement`` fits in the free resources right now."""
        n = placement.node_index
        if not 0 <= n < self.node_count:
            raise LedgerError(f"placement.node_index={n} is not allowed: 0..{self.node_count - 1}")
        if placement.cpu_milli > self.free_cpu_milli[n]:
            raise LedgerError(
                f"placement.cpu_milli={placement.cpu_milli} exceeds the {int(self.free_cpu_milli[n])} free "
                f"on node {self.nodes[n].name}"
            )
        if placement.host_memory_mib > self.free_host_memory_mib[n]:
            raise LedgerError(
                f"placement.host_memory_mib={placement.host_memory_mib} exceeds the "
                f"{int(self.free_host_memory_mib[n])} free on node {self.nodes[n].name}"
            )
        devices = placement.device_indices
        if len(set(devices)) != len(devices):
            raise LedgerError(f"placement.device_indices={devices} names a device twice")
        for d in devices:
            if not 0 <= d < self.device_count[n]:
                raise LedgerError(
                    f"placement.device_indices={devices}: device {d} does not exist on node "
                    f"{self.nodes[n].name} (0..{int(self.device_count[n]) - 1})"
                )
            if placement.share_milli > self.free_share_milli[n, d]:
                raise LedgerError(
                    f"placement.share_milli={placement.share_milli} exceeds the {int(self.free_share_milli[n, d])}"
                    f" free on device {d} of node {self.nodes[n].name}"
                )
            if self.device_memory_known[n] and placement.device_memory_mib > self.free_device_memory_mib[n, d]:
                raise LedgerError(
                    f"placement.device_memory_mib={placement.device_memory_mib} exceeds the "
                    f"{int(self.free_device_memory_mib[n, d])} free on device {d} of node {self.nodes[n].name}"
                )

    def reserve(self, replica_id: str, placement: Placement) -> None:
        """Grant ``placement`` to ``replica_id``. Idempotent: the same grant again changes nothing."""
        held = self.grants.get(replica_id)
        if held is not None:
            if held == placement:
                return
            raise LedgerError(f"replica_id={replica_id!r} already holds a different placement")
        self.check(placement)
        self._apply(placement, sign=-1)
        self.grants[replica_id] = placement
        self._journal.append(("reserve", replica_id, placement))

    def unreserve(self, replica_id: str) -> Placement | None:
        """Return the grant of ``replica_id`` to the pool; unknown ids change nothing (idempotent)."""
        placement = self.grants.pop(replica_id, None)
        if placement is None:
            return None
        self._apply(placement, sign=+1)
        self._journal.append(("unreserve", replica_id, placement))
        return placement

    def _apply(self, p: Placement, sign: int) -> None:
        n = p.node_index
        devices = list(p.device_indices)
        self.free_cpu_milli[n] += sign * p.cpu_milli
        self.free_host_memory_mib[n] += sign * p.host_memory_mib
        if devices:
            self.free_share_milli[n, devices] += sign * p.share_milli
            if self.device_memory_known[n]:
                self.free_device_memory_mib[n, devices] += sign * p.device_memory_mib
        self.allocated_share_milli -= sign * p.share_milli * len(devices)
        self.node_version[n] += 1

    # ----------------------------------------------------------------- what-if
    def checkpoint(self) -> int:
        return len(self._journal)

    def rollback(self, checkpoint: int) -> None:
        """Undo every reserve/unreserve made since ``checkpoint``, newest first."""
        while len(self._journal) > checkpoint:
            op, replica_id, placement = self._journal.pop()
            if op == "reserve":
                self.grants.pop(replica_id)
                self._apply(placement, sign=+1)
            else:
                self.grants[replica_id] = placement
                self._apply(placement, sign=-1)
        # Versions moved forward during the what-if; keeping them moved only costs cache misses.

    @contextmanager
    def transaction(self) -> Iterator[int]:
        """Changes inside are rolled back if the block raises; call ``rollback`` to abandon them explicitly."""
        cp = self.checkpoint()
        try:
            yield cp
        except BaseException:
            self.rollback(cp)
            raise

    def compact_journal(self) -> None:
        """Forget history no open checkpoint needs (the journal grows with every change otherwise)."""
        self._journal.clear()
