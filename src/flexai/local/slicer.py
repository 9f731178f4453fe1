"""Time-slicing: jobs sharing a busy device take turns, each for its share of device time.

Per device, a cycle of ``period_s`` is cut into one turn per job, proportional to its share; with lending on,
the turns fill the whole cycle (idle share goes to those running), and a lone job is never paused; with
lending off, the cycle's unallocated rest is idle time for everybody. The slicer pauses and resumes each job's
command group through the ``Runner`` (never a shim).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flexai.local.runner import Handle, Runner


class TimeSlicer:
    def __init__(self, runner: Runner, period_s: float, lending: bool, contention_pct: float) -> None:
        self.runner = runner
        self.period_s = period_s
        self.lending = lending
        self.contention_pct = contention_pct

    def contended(self, utilisation_pct: float | None) -> bool:
        """Busy enough that co-located jobs compete for it; a device that cannot tell counts as contended.

        While jobs are gated the device shows one job's load: heavy jobs keep it busy (gating stays on),
        light ones leave it idle (gating goes off and they overlap, which is the utilisation gain)."""
        return utilisation_pct is None or utilisation_pct >= self.contention_pct

    def turns(self, now: float, jobs: Iterable[Handle], utilisation: Mapping[int, float | None]) -> dict[str, bool]:
        """Job id -> whether it may run at ``now``."""
        jobs = list(jobs)
        want_running = {h.record.id: True for h in jobs}
        by_device: dict[int, list[Handle]] = {}
        for handle in jobs:
            if handle.record.share_milli < 1000:
                for s in handle.record.slices or []:
                    by_device.setdefault(int(s["device"]), []).append(handle)  # type: ignore[call-overload]
        for device_index, members in by_device.items():
            if self.lending and not self.contended(utilisation.get(device_index)):
                continue
            if self.lending and len(members) == 1:
                continue
            members.sort(key=lambda h: h.record.seq)
            shares = [h.record.share_milli for h in members]
            total = sum(shares) if self.lending else 1000
            phase = (now % self.period_s) / self.period_s * total
            start = 0.0
            for handle, share in zip(members, shares, strict=True):
                inside = start <= phase < start + share
                want_running[handle.record.id] = want_running[handle.record.id] and inside
                start += share
        return want_running

    def slice(self, now: float, jobs: Mapping[str, Handle], utilisation: Mapping[int, float | None]) -> None:
        for job_id, run in self.turns(now, jobs.values(), utilisation).items():
            self.runner.gate(jobs[job_id], run)

    def resume_all(self, jobs: Iterable[Handle]) -> None:
        """Let every paused job run (after an error in the loop, or when the daemon stops)."""
        for handle in jobs:
            try:
                self.runner.gate(handle, True)
            except OSError:
                continue


__all__ = ["TimeSlicer"]
