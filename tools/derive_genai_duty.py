"""Derive the bundled GPU duty-cycle series from Alibaba's GenAI serving trace (cluster-trace-v2026-GenAI).

Reads ``pod_gpu_duty_cycle_anon.tar.gz`` (143 pods, one sample about every 57 s over about 23 hours) and
writes ``src/flexai/sim/data/genai_duty_cycle.csv.gz``: one row per sample, ``pod`` (0..N-1 in order of
the hashed pod id), ``offset_s`` (seconds since that pod's first sample) and ``duty_pct`` (GPU utilisation
of the pod, percent, one decimal). Pods with fewer than 120 samples (two hours) are left out.

    python tools/derive_genai_duty.py PATH/TO/pod_gpu_duty_cycle_anon.tar.gz
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

MIN_SAMPLES = 120
OUT = Path(__file__).resolve().parent.parent / "src" / "flexai" / "sim" / "data" / "genai_duty_cycle.csv.gz"


def main(source: str) -> None:
    with tarfile.open(source) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".csv") and m.isfile())
        text = archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in csv.DictReader(io.StringIO(text)):
        series[row["container_ip"]].append((int(float(row["timestamp_anon"])), float(row["value"])))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["pod", "offset_s", "duty_pct"])
    kept = 0
    for pod_id in sorted(series):
        samples = sorted(series[pod_id])
        if len(samples) < MIN_SAMPLES:
            continue
        first = samples[0][0]
        for ts, value in samples:
            writer.writerow([kept, ts - first, f"{min(100.0, max(0.0, value)):.1f}"])
        kept += 1
    OUT.write_bytes(gzip.compress(out.getvalue().encode("utf-8"), mtime=0))
    print(f"{kept} pods -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
