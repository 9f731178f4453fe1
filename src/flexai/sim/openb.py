"""Loader for Alibaba's openb trace format (cluster-trace-gpu-v2023).

Pod files have 11 columns (name, cpu_milli, memory_mib, num_gpu, gpu_milli, gpu_spec, qos, pod_phase,
creation_time, deletion_time, scheduled_time) or only the first five (the multigpu variants). Node files
have sn, cpu_milli, memory_mib, gpu, model. Files may be gzip-compressed. A bad row raises TraceFormatError
naming file, line, column and value.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from flexai.model.cluster import Node, Request
from flexai.model.units import FULL_SHARE_MILLI
from flexai.model.workload import Shape, WorkloadProfile

POD_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli")
POD_OPTIONAL_COLUMNS = ("gpu_spec", "qos", "pod_phase", "creation_time", "deletion_time", "scheduled_time")
TIME_COLUMNS = ("creation_time", "deletion_time", "scheduled_time")
QOS_VALUES = ("LS", "BE", "Burstable", "Guaranteed")
PHASE_VALUES = ("Running", "Succeeded", "Failed", "Pending", "Unknown")
MAX_TIME_S = 10**12
NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
DATA_PACKAGE = "flexai.sim.data"


class TraceFormatError(ValueError):
    """One line naming file, line, column and value, and what is allowed."""


@dataclass(frozen=True)
class PodTrace:
    """Pods of a trace in file order, with per-pod arrays for fast bookkeeping."""

    name: str
    pod_names: tuple[str, ...]
    requests: tuple[Request, ...]
    spec_labels: tuple[str, ...]
    times: PodTimes | None = None
    """Creation, deletion and scheduled times (seconds; NaN where empty) when the file has them."""

    @property
    def total_share_milli(self) -> np.ndarray:
        return np.array([r.total_share_milli for r in self.requests], dtype=np.int64)

    @property
    def per_device_share_milli(self) -> np.ndarray:
        return np.array([r.share_milli for r in self.requests], dtype=np.int64)

    def shapes(self) -> list[Shape]:
        return [Shape.of(r, label) for r, label in zip(self.requests, self.spec_labels, strict=True)]

    def profile(self, coverage: float = 0.95) -> WorkloadProfile:
        return WorkloadProfile.from_requests(self.requests, self.spec_labels, coverage)


@dataclass(frozen=True)
class PodTimes:
    """The time columns of a pod file, one entry per pod; ``scheduled_s`` is NaN for pods that never ran."""

    creation_s: np.ndarray
    deletion_s: np.ndarray
    scheduled_s: np.ndarray
    phases: tuple[str, ...]


@dataclass(frozen=True)
class NodeList:
    name: str
    nodes: tuple[Node, ...]


def bundled_names(kind: str) -> list[str]:
    prefix = "pod_list_" if kind == "pods" else "node_list_"
    names = []
    for entry in resources.files(DATA_PACKAGE).iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".csv.gz"):
            name = entry.name[len(prefix) : -len(".csv.gz")]
            names.append(name.removesuffix("_node"))
    return sorted(names)


def _open_text(source: str, kind: str) -> tuple[str, str]:
    """Return (display name, text) for a bundled name or a file path."""
    prefix = "pod_list_" if kind == "pods" else "node_list_"
    suffix = "_node" if kind == "nodes" else ""
    bundled = resources.files(DATA_PACKAGE) / f"{prefix}{source}{suffix}.csv.gz"
    if "/" not in source and not source.endswith((".csv", ".gz")) and bundled.is_file():
        return source, gzip.decompress(bundled.read_bytes()).decode("utf-8")
    path = Path(source)
    if not path.is_file():
        known = ", ".join(bundled_names(kind))
        raise TraceFormatError(f"{kind} file {source!r} not found: give a path to a CSV file or one of: {known}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return str(path), raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise TraceFormatError(f"{source}: cannot read {kind} file: {exc}") from exc


def _rows(
    display: str, text: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TraceFormatError(
            f"{display}:1: the file is empty; expected a header with {', '.join(required)}"
        ) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceFormatError(
            f"{display}:1: header lacks column(s) {', '.join(missing)}; found {', '.join(header) or 'nothing'}"
        )
    known = set(required) | set(optional)
    unknown = [c for c in header if c not in known]
    if unknown:
        raise TraceFormatError(
            f"{display}:1: column {unknown[0]!r} is not allowed: the columns are {', '.join((*required, *optional))}"
        )
    if len(set(header)) != len(header):
        dup = next(c for c in header if header.count(c) > 1)
        raise TraceFormatError(f"{display}:1: column {dup!r} appears twice")
    rows = []
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TraceFormatError(
                f"{display}:{reader.line_num}: {len(row)} columns, the header has {len(header)}: one value per column"
            )
        rows.append((reader.line_num, row))
    return header, rows


def _int(display: str, line: int, column: str, value: str, low: int, high: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise TraceFormatError(f"{display}:{line}: column {column}: value {value!r} is not allowed: {allowed}")
    return number


def _time(display: str, line: int, column: str, value: str) -> float:
    text = value.strip()
    if not text:
        return float("nan")
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not (0 <= number <= MAX_TIME_S) or number != int(number):
        raise TraceFormatError(
            f"{display}:{line}: column {column}: value {value!r} is not allowed: whole seconds in 0..{MAX_TIME_S}, "
            "or empty"
        )
    return number


def _choice(display: str, line: int, column: str, value: str, allowed: tuple[str, ...]) -> str:
    text = value.strip()
    if text and text not in allowed:
        raise TraceFormatError(
            f"{display}:{line}: column {column}: value {value!r} is not allowed: one of {', '.join(allowed)}, or empty"
        )
    return text


def load_pods(source: str) -> PodTrace:
    display, text = _open_text(source, "pods")
    header, rows = _rows(display, text, POD_COLUMNS, POD_OPTIONAL_COLUMNS)
    col = {c: i for i, c in enumerate(header)}
    spec_col = col.get("gpu_spec")
    has_times = all(c in col for c in TIME_COLUMNS)
    names, requests, labels = [], [], []
    times: list[tuple[float, float, float]] = []
    phases: list[str] = []
    for line, row in rows:
        name = row[col["name"]].strip()
        if not name:
            raise TraceFormatError(f"{display}:{line}: column name: value '' is not allowed: a pod name")
        cpu = _int(display, line, "cpu_milli", row[col["cpu_milli"]], 0)
        memory = _int(display, line, "memory_mib", row[col["memory_mib"]], 0)
        count = _int(display, line, "num_gpu", row[col["num_gpu"]], 0, 64)
        # The artifact clips per-GPU share above 1000 to a whole GPU.
        share = min(_int(display, line, "gpu_milli", row[col["gpu_milli"]], 0), FULL_SHARE_MILLI)
        spec = row[spec_col].strip() if spec_col is not None else ""
        label = "|".join(p for p in spec.split("|") if p)
        if count == 0:
            share, label = 0, ""  # CPU-only pods carry no GPU fields
        elif share == 0:
            raise TraceFormatError(
                f"{display}:{line}: column gpu_milli: value {row[col['gpu_milli']]!r} is not allowed: "
                f"1..{FULL_SHARE_MILLI} when num_gpu > 0"
            )
        elif count > 1 and share < FULL_SHARE_MILLI:
            raise TraceFormatError(
                f"{display}:{line}: column gpu_milli: value {share!r} is not allowed: "
                f"{FULL_SHARE_MILLI} when num_gpu = {count} (only single-GPU pods share a GPU)"
            )
        qos = _choice(display, line, "qos", row[col["qos"]], QOS_VALUES) if "qos" in col else ""
        phase = _choice(display, line, "pod_phase", row[col["pod_phase"]], PHASE_VALUES) if "pod_phase" in col else ""
        if has_times:
            created, deleted, scheduled = (_time(display, line, c, row[col[c]]) for c in TIME_COLUMNS)
            if np.isnan(created) or np.isnan(deleted):
                raise TraceFormatError(
                    f"{display}:{line}: column creation_time/deletion_time: values {row[col['creation_time']]!r}, "
                    f"{row[col['deletion_time']]!r} are not allowed: both are needed (seconds)"
                )
            if deleted < created or (not np.isnan(scheduled) and not created <= scheduled <= deleted):
                raise TraceFormatError(
                    f"{display}:{line}: column scheduled_time: value {row[col['scheduled_time']]!r} is not allowed: "
                    "creation_time <= scheduled_time <= deletion_time"
                )
            times.append((created, deleted, scheduled))
            phases.append(phase)
        names.append(name)
        labels.append(label)
        requests.append(
            Request(
                device_count=count,
                share_milli=share,
                allowed_models=frozenset(p for p in label.split("|") if p),
                cpu_milli=cpu,
                host_memory_mib=memory,
                qos=qos,
                name=name,
            )
        )
    if not requests:
        raise TraceFormatError(f"{display}: no pods in the file")
    trace_name = Path(display).name.removesuffix(".gz").removesuffix(".csv").removeprefix("openb_pod_list_")
    pod_times = None
    if has_times:
        table = np.array(times, dtype=np.float64).reshape(-1, 3)
        pod_times = PodTimes(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), tuple(phases))
    return PodTrace(trace_name, tuple(names), tuple(requests), tuple(labels), pod_times)


def load_nodes(source: str) -> NodeList:
    display, text = _open_text(source, "nodes")
    header, rows = _rows(display, text, NODE_COLUMNS)
    col = {c: i for i, c in enumerate(header)}
    nodes, seen = [], set()
    for line, row in rows:
        name = row[col["sn"]].strip()
        if not name or name in seen:
            raise TraceFormatError(f"{display}:{line}: column sn: value {name!r} is not allowed: a unique node name")
        seen.add(name)
        gpus = _int(display, line, "gpu", row[col["gpu"]], 0, 64)
        model = row[col["model"]].strip()
        if gpus and not model:
            raise TraceFormatError(f"{display}:{line}: column model: value '' is not allowed: a model when gpu > 0")
        nodes.append(
            Node(
                name=name,
                cpu_milli=_int(display, line, "cpu_milli", row[col["cpu_milli"]], 0),
                host_memory_mib=_int(display, line, "memory_mib", row[col["memory_mib"]], 0),
                device_count=gpus,
                device_model=model if gpus else "",
            )
        )
    if not nodes:
        raise TraceFormatError(f"{display}: no nodes in the file")
    list_name = Path(display).name.removesuffix(".gz").removesuffix(".csv").removeprefix("openb_node_list_")
    return NodeList(list_name.removesuffix("_node"), tuple(nodes))
