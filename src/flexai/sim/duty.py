"""Real device use behind a grant: per-pod GPU duty-cycle and memory series from Alibaba's GenAI serving trace.

Each series is a step function (a sample holds until the next one) repeated with its own period, so a pod
that runs longer than the series' 23 hours keeps the daily shape. ``busy_fraction_seconds`` integrates it
over any interval from a cumulative table: no per-minute ticks. For time-sharing the replay looks at the
devices every few minutes; ``DutyGrid`` holds every series' mean utilisation and peak memory per such step,
so one look at all running pods is a few array lookups.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

DATA_FILE = "genai_duty_cycle.csv.gz"


@dataclass(frozen=True)
class DutySeries:
    start_s: np.ndarray
    """Sample times since the series' first sample (s), ascending, starting at 0."""
    cumulative: np.ndarray
    """Busy seconds (utilisation x time) accumulated up to each sample time, one more entry at the period."""
    value: np.ndarray
    """Utilisation as a fraction 0..1 per sample."""
    period_s: float
    memory: np.ndarray | None = None
    """Device memory in use as a fraction of the device (0..1) per sample; None when not known."""

    @property
    def mean(self) -> float:
        return float(self.cumulative[-1] / self.period_s)

    def _cum(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        laps, rest = np.divmod(t, self.period_s)
        i = np.searchsorted(self.start_s, rest, side="right") - 1
        within = self.cumulative[i] + self.value[i] * (rest - self.start_s[i])
        return laps * self.cumulative[-1] + within

    def busy_fraction_seconds(self, phase_s: float | np.ndarray, begin_s: float | np.ndarray,
                              end_s: float | np.ndarray) -> np.ndarray:
        """Integral of utilisation over [begin, end) of a run that sits at ``phase_s`` of the series at 0."""
        return self._cum(np.asarray(phase_s) + end_s) - self._cum(np.asarray(phase_s) + begin_s)


@lru_cache(maxsize=1)
def load_duty_series() -> tuple[DutySeries, ...]:
    raw = gzip.decompress((resources.files("flexai.sim.data") / DATA_FILE).read_bytes()).decode("utf-8")
    table = np.loadtxt(io.StringIO(raw), delimiter=",", skiprows=1, ndmin=2)
    series = []
    for pod in np.unique(table[:, 0]):
        rows = table[table[:, 0] == pod]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]
        start = rows[:, 1].astype(np.float64)
        value = rows[:, 2] / 100.0
        memory = rows[:, 3] / 100.0 if table.shape[1] > 3 else None
        steps = np.diff(start)
        last_step = float(np.median(steps)) if len(steps) else 60.0
        period = float(start[-1] + last_step)
        widths = np.append(steps, last_step)
        cumulative = np.concatenate([[0.0], np.cumsum(value * widths)])
        series.append(DutySeries(start, cumulative, value, period, memory))
    return tuple(series)


@dataclass(frozen=True)
class DutyGrid:
    """Every series on a common step: ``busy[s, k]`` is series s's mean utilisation over step k of its period,
    ``memory[s, k]`` its peak memory fraction in that step (memory must fit at its peak, not on average)."""

    step_s: float
    busy: np.ndarray
    memory: np.ndarray
    steps: np.ndarray
    """Steps in each series' period (its row is valid up to there, then wraps)."""

    def index(self, series: np.ndarray, phase_s: np.ndarray, at_s: float) -> np.ndarray:
        """The step each (series, phase) pair is in at time ``at_s``."""
        return ((phase_s + at_s) // self.step_s).astype(np.int64) % self.steps[series]

    @classmethod
    def of(cls, series: tuple[DutySeries, ...], step_s: float) -> DutyGrid:
        steps = np.array([max(1, int(np.ceil(s.period_s / step_s))) for s in series], dtype=np.int64)
        width = int(steps.max())
        busy = np.zeros((len(series), width))
        memory = np.zeros((len(series), width))
        for i, s in enumerate(series):
            edges = np.minimum(np.arange(steps[i] + 1) * step_s, s.period_s)
            spans = np.diff(edges)
            busy[i, : steps[i]] = np.diff(s._cum(edges)) / np.where(spans > 0, spans, 1.0)
            if s.memory is not None:
                step_of_sample = np.minimum((s.start_s // step_s).astype(np.int64), steps[i] - 1)
                np.maximum.at(memory[i], step_of_sample, s.memory)
                # A step without its own sample holds the memory of the sample before it.
                held = memory[i, : steps[i]]
                has = np.zeros(steps[i], dtype=bool)
                has[step_of_sample] = True
                last = np.maximum.accumulate(np.where(has, np.arange(steps[i]), 0))
                memory[i, : steps[i]] = held[last]
        return cls(step_s, busy, memory, steps)


@lru_cache(maxsize=4)
def duty_grid(step_s: float) -> DutyGrid:
    return DutyGrid.of(load_duty_series(), step_s)
