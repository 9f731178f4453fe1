"""Real device use behind a grant: per-pod GPU duty-cycle series from Alibaba's GenAI serving trace.

Each series is a step function (a sample holds until the next one) repeated with its own period, so a pod
that runs longer than the series' 23 hours keeps the daily shape. ``busy_fraction_seconds`` integrates it
over any interval from a cumulative table: no per-minute ticks.
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
        steps = np.diff(start)
        last_step = float(np.median(steps)) if len(steps) else 60.0
        period = float(start[-1] + last_step)
        widths = np.append(steps, last_step)
        cumulative = np.concatenate([[0.0], np.cumsum(value * widths)])
        series.append(DutySeries(start, cumulative, value, period))
    return tuple(series)
