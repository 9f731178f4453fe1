"""The local-or-remote rule (flexai.hi.remote_choice): scenarios as data."""

from __future__ import annotations

import pytest

from flexai.hi.remote_choice import (
    RACK_LABEL,
    SAME_RACK,
    ZONE_LABEL,
    CallProfile,
    Candidate,
    Link,
    choose,
    expected_time_s,
    link_between,
)

RACK_A = {RACK_LABEL: "a", ZONE_LABEL: "z1"}
RACK_B = {RACK_LABEL: "b", ZONE_LABEL: "z1"}
OTHER_ZONE = {RACK_LABEL: "c", ZONE_LABEL: "z2"}
SMALL = CallProfile(bytes_in=4096, bytes_out=4096, compute_s=0.01)
BULKY = CallProfile(bytes_in=256 << 20, bytes_out=0, compute_s=0.01)


@pytest.mark.parametrize(
    ("candidates", "call", "node", "remote"),
    [
        # a local slice that fits wins even when a remote one is faster
        ([Candidate("cpu-1", True, 0.1), Candidate("gpu-1", True, 1.0, labels=RACK_A)], SMALL, "cpu-1", False),
        # no local slice: the cheapest remote one
        ([Candidate("cpu-1", False, 0.1), Candidate("gpu-1", True, 0.5, labels=RACK_A),
          Candidate("gpu-2", True, 1.0, labels=OTHER_ZONE)], SMALL, "gpu-2", True),
        # with lots of data per call the nearer (faster link) node wins over the faster device
        ([Candidate("gpu-1", True, 0.5, labels=RACK_A), Candidate("gpu-2", True, 1.0, labels=OTHER_ZONE)],
         BULKY, "gpu-1", True),
        # queueing counts
        ([Candidate("gpu-1", True, 1.0, queue_s=5.0, labels=RACK_A), Candidate("gpu-3", True, 1.0, labels=RACK_B)],
         SMALL, "gpu-3", True),
        # nothing fits
        ([Candidate("gpu-1", False, 1.0)], SMALL, None, False),
    ],
)  # fmt: skip
def test_choice(candidates: list[Candidate], call: CallProfile, node: str | None, remote: bool) -> None:
    choice = choose("cpu-1", RACK_A, candidates, call)
    assert (choice.node, choice.remote) == (node, remote), choice.reason


def test_links_from_labels_and_measurements() -> None:
    assert link_between("n1", RACK_A, "n1", RACK_A).hops == 0
    assert link_between("n1", RACK_A, "n2", RACK_A) == SAME_RACK
    assert link_between("n1", RACK_A, "n2", RACK_B).hops == 2
    assert link_between("n1", RACK_A, "n2", OTHER_ZONE).hops == 3
    measured = {("n1", "n2"): Link(1e-3, 1e8, 1)}
    assert link_between("n1", RACK_A, "n2", OTHER_ZONE, measured) == measured[("n1", "n2")]


def test_expected_time_adds_round_trips_data_compute_queue_and_setup() -> None:
    link = Link(rtt_s=1e-3, bandwidth_bytes_per_s=1e6, hops=1)
    call = CallProfile(bytes_in=500_000, bytes_out=500_000, compute_s=2.0, sync_round_trips=2, setup_s=10, calls=5)
    got = expected_time_s(Candidate("n", True, 0.5, queue_s=1.0), call, link)
    assert got == pytest.approx(2e-3 + 1.0 + 4.0 + 1.0 + 2.0)
    assert expected_time_s(Candidate("n", True, 0.5), call, None) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="calls=0 is not allowed"):
        CallProfile(calls=0)
    with pytest.raises(ValueError, match="speed=0.0 of node 'n' is not allowed"):
        expected_time_s(Candidate("n", True, 0.0), call, None)
