"""Derive the bundled GPU usage series from Alibaba's GenAI serving trace (cluster-trace-v2026-GenAI).

Reads ``pod_gpu_duty_cycle_anon.tar.gz`` (143 pods, one sample about every 57 s over about 23 hours) and
``pod_gpu_memory_used_bytes_anon.tar.gz`` (the same pods' device memory in use), joined on the hashed pod id
and the timestamp, and writes ``src/flexai/sim/data/genai_duty_cycle.csv.gz``: one row per duty sample,
``pod`` (0..N-1 in order of the hashed pod id), ``offset_s`` (seconds since that pod's first sample),
``duty_pct`` (GPU utilisation of the pod, percent, one decimal) and ``memory_pct`` (device memory in use, as a
percent of an 80 GiB device, one decimal; a duty sample without a memory sample at its time keeps the pod's
previous memory value). Pods with fewer than 120 duty samples (two hours) are left out.

The trace does not name its GPU model; the largest memory in use is 47.3 GiB, so 80 GiB (A100/H800 class)
is taken as the device size. The replay scales the fraction by each pod's share of its device.

    python tools/derive_genai_duty.py pod_gpu_duty_cycle_anon.tar.gz pod_gpu_memory_used_bytes_anon.tar.gz
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
DEVICE_MEMORY_BYTES = 80 * 2**30
OUT = Path(__file__).resolve().parent.parent / "src" / "flexai" / "sim" / "data" / "genai_duty_cycle.csv.gz"


def _csv_rows(source: str) -> list[dict[str, str]]:
    with tarfile.open(source) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".csv") and m.isfile())
        text = archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    return list(csv.DictReader(io.StringIO(text)))


def main(duty_source: str, memory_source: str) -> None:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in _csv_rows(duty_source):
        series[row["container_ip"]].append((int(float(row["timestamp_anon"])), float(row["value"])))
    memory: dict[tuple[str, int], float] = {}
    for row in _csv_rows(memory_source):
        memory[(row["container_ip"], int(float(row["timestamp_anon"])))] = float(row["value"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["pod", "offset_s", "duty_pct", "memory_pct"])
    kept = 0
    for pod_id in sorted(series):
        samples = sorted(series[pod_id])
        if len(samples) < MIN_SAMPLES:
            continue
        first = samples[0][0]
        held = next((memory[(pod_id, ts)] for ts, _ in samples if (pod_id, ts) in memory), 0.0)
        for ts, value in samples:
            held = memory.get((pod_id, ts), held)
            memory_pct = min(100.0, max(0.0, 100.0 * held / DEVICE_MEMORY_BYTES))
            writer.writerow([kept, ts - first, f"{min(100.0, max(0.0, value)):.1f}", f"{memory_pct:.1f}"])
        kept += 1
    OUT.write_bytes(gzip.compress(out.getvalue().encode("utf-8"), mtime=0))
    print(f"{kept} pods -> {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(sys.argv[1], sys.argv[2])
