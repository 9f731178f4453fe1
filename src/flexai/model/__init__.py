"""Pure data: units, devices, nodes, requests, placements and the cluster state ledger."""

from flexai.model.cluster import Node, Placement, Request, RequestError
from flexai.model.state import ClusterState, LedgerError
from flexai.model.units import FULL_SHARE_MILLI

__all__ = [
    "FULL_SHARE_MILLI",
    "ClusterState",
    "LedgerError",
    "Node",
    "Placement",
    "Request",
    "RequestError",
]
