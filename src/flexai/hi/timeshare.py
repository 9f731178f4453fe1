"""Time-sharing of idle share: ``low`` work runs as a *guest* on devices whose share is granted to others.

Owners' slices are granted in the ledger; a guest holds nothing there and counts against no quota. It runs
only on the owners' idle time, where device memory has room for it:

- a guest starts on a device that has owners, whose owners' utilisation (as last observed) is below the busy
  threshold, that has fewer than ``max_guests`` guests, and whose memory (owners' resident memory plus the
  guests already there, plus a headroom) leaves room for the guest's memory;
- it is *paused* while any of its devices is busy and resumed when all are idle (the pool sends SIGSTOP and
  SIGCONT within its tick; the replay gives the guest only the owners' idle time);
- it *yields* (stopped, back to its queue) when the owners' memory grows into the room it holds.

What the devices do is told by the adapter (``observe``): the pool reads the backend's utilisation and memory,
the replay reads the GenAI duty-cycle and memory series. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexai.model.cluster import Placement, Request
from flexai.model.state import ClusterState
from flexai.model.units import FULL_SHARE_MILLI


@dataclass
class Guest:
    """A ``low`` item running on other items' idle share (not in the ledger)."""

    item_id: str
    request: Request
    placement: Placement
    memory_mib: int
    """Device memory it may use on each of its devices."""
    started_s: float
    paused: bool = False


class TimeSharing:
    """Where guests may run, and which must pause, resume or yield, from the last observation of the devices."""

    def __init__(self, state: ClusterState, busy_threshold: float, max_guests: int, memory_headroom_pct: float) -> None:
        self.state = state
        self.busy_threshold = busy_threshold
        self.max_guests = max_guests
        self.memory_headroom_pct = memory_headroom_pct
        shape = state.free_share_milli.shape
        self.busy = np.zeros(shape)
        """Owners' utilisation of each device (0..1) over the last observed interval."""
        self.owner_memory_mib = np.zeros(shape, dtype=np.int64)
        """Device memory the owners hold (everything but guests)."""
        self.observed = False
        self.fresh = False
        """An observation came in since the last cycle looked at the guests."""
        self.guest_count = np.zeros(shape, dtype=np.int64)
        self.guest_memory_mib = np.zeros(shape, dtype=np.int64)
        self.guest_cpu_milli = np.zeros(state.node_count, dtype=np.int64)
        self.guest_host_memory_mib = np.zeros(state.node_count, dtype=np.int64)
        self.guests: dict[str, Guest] = {}

    # ----------------------------------------------------------------- observation
    def observe(self, busy: np.ndarray, owner_memory_mib: np.ndarray) -> None:
        shape = self.busy.shape
        busy = np.asarray(busy, dtype=np.float64)
        memory = np.asarray(owner_memory_mib)
        if busy.shape != shape or memory.shape != shape:
            raise ValueError(f"busy/owner_memory_mib shape {busy.shape}/{memory.shape} is not allowed: {shape}")
        if not (np.isfinite(busy).all() and (busy >= 0).all() and (memory >= 0).all()):
            raise ValueError("busy must be finite fractions >= 0 and owner_memory_mib >= 0")
        self.busy = busy
        self.owner_memory_mib = memory.astype(np.int64)
        self.observed = True
        self.fresh = True

    # ----------------------------------------------------------------- placing guests
    def memory_need_mib(self, request: Request) -> np.ndarray:
        """Per node: the device memory a guest of ``request`` needs on each device (its own figure, else its share
        of the device's memory)."""
        capacity = self.state.capacity_device_memory_mib.max(axis=1)
        if request.device_memory_mib:
            return np.full(self.state.node_count, request.device_memory_mib, dtype=np.int64)
        return capacity * request.share_milli // FULL_SHARE_MILLI

    def room_mib(self) -> np.ndarray:
        """Per device: memory left for another guest."""
        capacity = self.state.capacity_device_memory_mib
        headroom = (capacity * self.memory_headroom_pct / 100.0).astype(np.int64)
        return capacity - headroom - self.owner_memory_mib - self.guest_memory_mib

    def usable(self) -> np.ndarray:
        """Per device: owned (some share granted), idle by the last look, with room for one more guest."""
        state = self.state
        owned = state.device_present & (state.free_share_milli < state.capacity_share_milli)
        return owned & (self.busy < self.busy_threshold) & (self.guest_count < self.max_guests)

    def place(self, request: Request) -> Placement | None:
        """Devices on one node where a guest of ``request`` may run now, or None."""
        if not self.observed or request.device_count == 0:
            return None
        state = self.state
        need = self.memory_need_mib(request)
        ok = self.usable() & (self.room_mib() >= need[:, None])
        ok &= state.model_mask(request.allowed_models)[:, None]
        host = (state.free_cpu_milli - self.guest_cpu_milli >= request.cpu_milli) & (
            state.free_host_memory_mib - self.guest_host_memory_mib >= request.host_memory_mib
        )
        ok &= host[:, None]
        counts = ok.sum(axis=1)
        nodes = np.flatnonzero(counts >= request.device_count)
        if not len(nodes):
            return None
        # The quietest devices first: the guest gets the most idle time and the owners the least company.
        busy = np.where(ok[nodes], self.busy[nodes], np.inf)
        order = np.argsort(busy, axis=1, kind="stable")[:, : request.device_count]
        score = np.take_along_axis(busy, order, axis=1).mean(axis=1)
        best = int(np.argmin(score))
        node = int(nodes[best])
        devices = tuple(sorted(int(d) for d in order[best]))
        return Placement(
            node, devices, request.share_milli, int(need[node]), request.cpu_milli, request.host_memory_mib
        )

    def add(self, item_id: str, request: Request, placement: Placement, now_s: float) -> Guest:
        guest = Guest(item_id, request, placement, placement.device_memory_mib, now_s)
        self.guests[item_id] = guest
        self._count(guest, +1)
        return guest

    def remove(self, item_id: str) -> Guest | None:
        guest = self.guests.pop(item_id, None)
        if guest is not None:
            self._count(guest, -1)
        return guest

    def _count(self, guest: Guest, sign: int) -> None:
        n, devices = guest.placement.node_index, list(guest.placement.device_indices)
        self.guest_count[n, devices] += sign
        self.guest_memory_mib[n, devices] += sign * guest.memory_mib
        self.guest_cpu_milli[n] += sign * guest.request.cpu_milli
        self.guest_host_memory_mib[n] += sign * guest.request.host_memory_mib

    # ----------------------------------------------------------------- what guests must do now
    def memory_evictions(self) -> list[Guest]:
        """Guests that must yield because their owners need the memory: on each over-full device, the most
        recently started go first until the rest fits."""
        over = self.room_mib() < 0
        if not over.any():
            return []
        leaving: list[Guest] = []
        room = self.room_mib()
        for guest in sorted(self.guests.values(), key=lambda g: -g.started_s):
            n, devices = guest.placement.node_index, list(guest.placement.device_indices)
            if (room[n, devices] < 0).any():
                leaving.append(guest)
                room[n, devices] += guest.memory_mib
        return leaving

    def pause_changes(self) -> tuple[list[str], list[str]]:
        """Guests to pause (a device of theirs is busy) and to resume (all idle again)."""
        pauses: list[str] = []
        resumes: list[str] = []
        for guest in self.guests.values():
            busy = bool(
                (
                    self.busy[guest.placement.node_index, list(guest.placement.device_indices)] >= self.busy_threshold
                ).any()
            )
            if busy and not guest.paused:
                guest.paused = True
                pauses.append(guest.item_id)
            elif not busy and guest.paused:
                guest.paused = False
                resumes.append(guest.item_id)
        return pauses, resumes


__all__ = ["Guest", "TimeSharing"]
