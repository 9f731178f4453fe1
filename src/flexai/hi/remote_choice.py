"""The local-or-remote rule of remote XPU leases (pure: no clock, no I/O; the adapters feed it what they know).

For a call on slice s of node n reached from the client's node c, the expected time is

    T(n) = k_sync x RTT(c, n) + (bytes in + bytes out) / bandwidth(c, n) + compute / speed(s) + queue(s)
           + setup / calls

and on the client's own node the network terms are zero. The rule:

1. stay local when a slice on the client's own node fits;
2. otherwise go to the remote node with the least expected time T(n) (ties: the nearer by topology, then the
   name, so that the choice is deterministic);
3. when nothing fits anywhere, say so (the lease waits in its queue).

Network distances come from measurements the agents publish (``measured``) or, lacking one, from the nodes'
topology labels: same node, same rack, same zone, elsewhere (``link_between``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

RACK_LABEL = "flexai.io/rack"
ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class Link:
    """The network between the client's node and a candidate: round trip (s) and bandwidth (bytes/s)."""

    rtt_s: float
    bandwidth_bytes_per_s: float
    hops: int
    """0 same node, 1 same rack, 2 same zone, 3 elsewhere: the topology distance (breaks ties)."""


LOOPBACK = Link(rtt_s=30e-6, bandwidth_bytes_per_s=2.0e9, hops=0)
SAME_RACK = Link(rtt_s=50e-6, bandwidth_bytes_per_s=25e9 / 8, hops=1)
SAME_ZONE = Link(rtt_s=200e-6, bandwidth_bytes_per_s=10e9 / 8, hops=2)
ELSEWHERE = Link(rtt_s=2e-3, bandwidth_bytes_per_s=1e9 / 8, hops=3)


@dataclass(frozen=True)
class CallProfile:
    """What one call of the client's work costs: data shipped each way, compute on a whole reference device,
    round trips it waits for, and a one-off setup (weights, resident state) spread over the calls."""

    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0
    sync_round_trips: int = 1
    setup_s: float = 0.0
    calls: int = 1

    def __post_init__(self) -> None:
        for name in ("bytes_in", "bytes_out", "compute_s", "sync_round_trips", "setup_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: >= 0")
        if self.calls < 1:
            raise ValueError(f"calls={self.calls} is not allowed: >= 1")


@dataclass(frozen=True)
class Candidate:
    """One node's best slice for the lease, as the scheduler sees it."""

    node: str
    fits: bool
    speed: float
    """Work per second of the slice relative to the reference device (share x device speed), > 0."""
    queue_s: float = 0.0
    """Expected wait before the slice serves the call (work queued on it)."""
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Choice:
    node: str | None
    remote: bool
    expected_s: float | None
    reason: str


def link_between(
    client: str,
    client_labels: Mapping[str, str],
    node: str,
    node_labels: Mapping[str, str],
    measured: Mapping[tuple[str, str], Link] | None = None,
) -> Link:
    """The link from the client's node to ``node``: a published measurement first, else the topology labels."""
    if measured and (client, node) in measured:
        return measured[(client, node)]
    if client == node:
        return LOOPBACK
    for label, link in ((RACK_LABEL, SAME_RACK), (ZONE_LABEL, SAME_ZONE)):
        if client_labels.get(label) and client_labels.get(label) == node_labels.get(label):
            return link
    return ELSEWHERE


def expected_time_s(candidate: Candidate, call: CallProfile, link: Link | None) -> float:
    """T(n) above; ``link`` None = the client's own node (no network terms)."""
    if candidate.speed <= 0:
        raise ValueError(f"speed={candidate.speed} of node {candidate.node!r} is not allowed: > 0")
    compute = call.compute_s / candidate.speed + candidate.queue_s
    if link is None:
        return compute
    network = call.sync_round_trips * link.rtt_s + (call.bytes_in + call.bytes_out) / link.bandwidth_bytes_per_s
    return network + compute + call.setup_s / call.calls


def choose(
    client: str,
    client_labels: Mapping[str, str],
    candidates: Iterable[Candidate],
    call: CallProfile,
    measured: Mapping[tuple[str, str], Link] | None = None,
) -> Choice:
    """Where a lease for ``call`` from node ``client`` goes (rules 1-3 of the module's doc)."""
    fitting = [c for c in candidates if c.fits]
    local = [c for c in fitting if c.node == client]
    if local:
        best = min(local, key=lambda c: expected_time_s(c, call, None))
        return Choice(best.node, False, expected_time_s(best, call, None), "a slice on the client's own node fits")
    if not fitting:
        return Choice(None, False, None, "no slice fits on any node: the lease waits")
    scored = []
    for candidate in fitting:
        link = link_between(client, client_labels, candidate.node, candidate.labels or {}, measured)
        scored.append((expected_time_s(candidate, call, link), link.hops, candidate.node))
    cost, hops, node = min(scored)
    return Choice(node, True, cost, f"no local slice fits; least expected time {cost * 1e3:.3g} ms ({hops} hops)")
