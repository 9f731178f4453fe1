"""Summaries, the JSON document, the Figure-9a plot and the Markdown report of a simulation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flexai.sim.metrics import REPORT_ARRIVED_PCT
from flexai.sim.runner import RunSummary

if TYPE_CHECKING:
    from flexai.sim.bound import BoundResult

BASELINE_POLICY = "k8s-whole-gpu"


@dataclass(frozen=True)
class PolicySummary:
    policy: str
    seeds: int
    unallocated_mean: dict[int, float]
    unallocated_sd: dict[int, float]
    failed_pods_mean: float
    placed_pods_at_100_mean: float
    placed_demand_pct_at_100_mean: float
    fragmentation_pct_at_100_mean: float
    wall_s_mean: float
    max_migrations: int = 0
    migrations_mean: float = 0.0


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: Sequence[RunSummary]) -> list[PolicySummary]:
    out = []
    for policy in dict.fromkeys(r.policy for r in runs):
        mine = [r for r in runs if r.policy == policy]
        out.append(
            PolicySummary(
                policy=policy,
                seeds=len(mine),
                unallocated_mean={
                    x: float(np.mean([r.unallocated_gpu_pct[x] for r in mine])) for x in REPORT_ARRIVED_PCT
                },
                unallocated_sd={x: _sd([r.unallocated_gpu_pct[x] for r in mine]) for x in REPORT_ARRIVED_PCT},
                failed_pods_mean=float(np.mean([r.failed_pods for r in mine])),
                placed_pods_at_100_mean=float(np.mean([r.placed_pods_at_100 for r in mine])),
                placed_demand_pct_at_100_mean=float(np.mean([r.placed_demand_pct_at_100 for r in mine])),
                fragmentation_pct_at_100_mean=float(np.mean([r.fragmentation_pct_at_100 for r in mine])),
                wall_s_mean=float(np.mean([r.wall_s for r in mine])),
                max_migrations=max(r.max_migrations for r in mine),
                migrations_mean=float(np.mean([r.migrations for r in mine])),
            )
        )
    return out


def pooling_gain(summaries: Sequence[PolicySummary]) -> list[dict[str, float | str]]:
    """GPU demand and pods placed at arrived 100 % beyond the no-sharing Kubernetes baseline."""
    base = next((s for s in summaries if s.policy == BASELINE_POLICY), None)
    if base is None:
        return []
    gains = []
    for s in summaries:
        if s.policy == BASELINE_POLICY:
            continue
        gains.append(
            {
                "policy": s.policy,
                "placed_gpu_demand_pct_at_100": round(s.placed_demand_pct_at_100_mean, 3),
                "baseline_placed_gpu_demand_pct_at_100": round(base.placed_demand_pct_at_100_mean, 3),
                "extra_gpu_demand_pct": round(
                    100.0 * (s.placed_demand_pct_at_100_mean / base.placed_demand_pct_at_100_mean - 1.0), 2
                ),
                "extra_pods": round(s.placed_pods_at_100_mean - base.placed_pods_at_100_mean, 1),
                "extra_pods_pct": round(100.0 * (s.placed_pods_at_100_mean / base.placed_pods_at_100_mean - 1.0), 2),
            }
        )
    return gains


def bound_summary(bounds: dict[int, BoundResult]) -> dict[str, object] | None:
    if not bounds:
        return None
    values = [b.unallocated_gpu_pct for b in bounds.values()]
    return {
        "unallocated_gpu_pct_at_100": {"mean": round(float(np.mean(values)), 3), "sd": round(_sd(values), 3)},
        "per_seed": {str(seed): round(b.unallocated_gpu_pct, 3) for seed, b in sorted(bounds.items())},
        "all_optimal": all(b.optimal for b in bounds.values()),
        "method": "MILP relaxation (node types x pod shapes, dual-feasible-function cuts), HiGHS",
    }


def _run_entry(r: RunSummary) -> dict[str, object]:
    entry: dict[str, object] = {
        "policy": r.policy,
        "seed": r.seed,
        "unallocated_gpu_pct": {str(x): r.unallocated_gpu_pct[x] for x in REPORT_ARRIVED_PCT},
        "failed_pods": r.failed_pods,
        "wall_s": round(r.wall_s, 3),
        "failed_pods_at_100": r.failed_pods_at_100,
        "placed_pods_at_100": r.placed_pods_at_100,
        "placed_gpu_demand_pct_at_100": round(r.placed_demand_pct_at_100, 3),
        "gpu_fragmentation_pct_at_100": round(r.fragmentation_pct_at_100, 3),
    }
    if r.max_migrations:
        entry["max_migrations"] = r.max_migrations
        entry["migrations"] = r.migrations
        entry["unblocked_pods"] = r.unblocked_pods
    return entry


def _summary_entry(s: PolicySummary) -> dict[str, object]:
    entry: dict[str, object] = {
        "policy": s.policy,
        "unallocated_gpu_pct_at_100": {
            "mean": round(s.unallocated_mean[100], 3),
            "sd": round(s.unallocated_sd[100], 3),
        },
        "unallocated_gpu_pct_mean": {str(x): round(v, 3) for x, v in s.unallocated_mean.items()},
        "failed_pods_mean": round(s.failed_pods_mean, 1),
        "placed_gpu_demand_pct_at_100_mean": round(s.placed_demand_pct_at_100_mean, 3),
        "gpu_fragmentation_pct_at_100_mean": round(s.fragmentation_pct_at_100_mean, 3),
        "wall_s_mean": round(s.wall_s_mean, 3),
    }
    if s.max_migrations:
        entry["migrations_mean"] = round(s.migrations_mean, 1)
    return entry


def document(trace: str, nodes: str, runs: Sequence[RunSummary], bounds: dict[int, BoundResult]) -> dict[str, object]:
    summaries = summarise(runs)
    return {
        "trace": trace,
        "nodes": nodes,
        "runs": [_run_entry(r) for r in runs],
        "summary": [_summary_entry(s) for s in summaries],
        "pooling_gain": pooling_gain(summaries),
        "lower_bound": bound_summary(bounds),
    }


def write_json(path: Path, doc: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot_curves(path: Path, runs: Sequence[RunSummary], bounds: dict[int, BoundResult], title: str) -> None:
    """Left: the paper's Figure 9a (unallocated GPU % of the sharing policies, and the bound). Right: GPU
    demand placed, where the no-sharing baseline shows what pooling buys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    xs = np.arange(0, 131)
    for i, policy in enumerate(dict.fromkeys(r.policy for r in runs)):
        mine = [r for r in runs if r.policy == policy]
        color = f"C{i}"
        placed = np.array([[r.placed_demand_curve[int(x)] for x in xs] for r in mine]).mean(axis=0)
        if policy == BASELINE_POLICY:
            right.plot(xs, placed, label=f"{policy} (no sharing)", color=color, linestyle="--", linewidth=1.6)
            continue
        unallocated = np.array([[r.curve[int(x)] for x in xs] for r in mine]).mean(axis=0)
        width = 2.2 if policy == "flex" else 1.4
        left.plot(xs, unallocated, label=policy, color=color, linewidth=width)
        right.plot(xs, placed, label=policy, color=color, linewidth=width)
    if bounds:
        lb = float(np.mean([b.unallocated_gpu_pct for b in bounds.values()]))
        left.scatter([100], [lb], marker="*", s=140, color="black", zorder=5, label=f"lower bound at 100 % ({lb:.2f})")
    left.plot(xs, np.maximum(100 - xs, 0), color="grey", linewidth=0.8, linestyle=":", label="100 - arrived")
    left.set(xlim=(60, 130), ylim=(0, 45), xlabel="arrived GPU workload (% of GPU capacity)")
    left.set_ylabel("unallocated GPU (%)")
    left.set_title(title)
    right.plot(xs, np.minimum(xs, 100), color="grey", linewidth=0.8, linestyle=":", label="everything placed")
    right.set(xlim=(60, 130), ylim=(55, 102), xlabel="arrived GPU workload (% of GPU capacity)")
    right.set_ylabel("GPU demand of placed pods (% of capacity)")
    right.set_title("what the placed pods asked for (pooling gain)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(doc: dict[str, object], summaries: Sequence[PolicySummary]) -> str:
    lines = [
        f"# flexai simulate — trace `{doc['trace']}`, nodes `{doc['nodes']}`",
        "",
        "Unallocated GPU % (mean ± sd over seeds) against arrived workload; see `unallocated_gpu.png`.",
        "",
        "| policy | "
        + " | ".join(f"{x} %" for x in REPORT_ARRIVED_PCT)
        + " | failed pods | GPU frag % at 100 | wall s |",
        "|---|" + "---|" * (len(REPORT_ARRIVED_PCT) + 3),
    ]
    for s in summaries:
        cells = [f"{s.unallocated_mean[x]:.2f} ± {s.unallocated_sd[x]:.2f}" for x in REPORT_ARRIVED_PCT]
        lines.append(
            f"| {s.policy} | " + " | ".join(cells) + f" | {s.failed_pods_mean:.0f} | "
            f"{s.fragmentation_pct_at_100_mean:.2f} | {s.wall_s_mean:.2f} |"
        )
    migrating = [s for s in summaries if s.max_migrations]
    if migrating:
        lines += ["", f"At most {migrating[0].max_migrations} moves per failed pod (never a `high` pod); moves made:"]
        lines += [f"- {s.policy}: {s.migrations_mean:.1f} per run (mean)" for s in migrating]
    gains = doc.get("pooling_gain") or []
    if gains:
        lines += [
            "",
            f"## Pooling gain over `{BASELINE_POLICY}` (plain Kubernetes, whole GPUs) at arrived 100 %",
            "",
            "| policy | GPU demand placed % | baseline % | extra GPU demand | extra pods |",
            "|---|---|---|---|---|",
        ]
        for g in gains:  # type: ignore[union-attr]
            lines.append(
                f"| {g['policy']} | {g['placed_gpu_demand_pct_at_100']:.2f} | "
                f"{g['baseline_placed_gpu_demand_pct_at_100']:.2f} | +{g['extra_gpu_demand_pct']:.1f} % | "
                f"+{g['extra_pods']:.0f} ({g['extra_pods_pct']:+.1f} %) |"
            )
    bound = doc.get("lower_bound")
    if bound:
        lb = bound["unallocated_gpu_pct_at_100"]  # type: ignore[index]
        lines += [
            "",
            "## Lower bound at arrived 100 %",
            "",
            f"No placement of the same arrived pods can leave less than **{lb['mean']:.2f} %** "
            f"(sd {lb['sd']:.2f}) of the GPU capacity unallocated ({bound['method']}).",  # type: ignore[index]
        ]
        by_policy = {s.policy: s.unallocated_mean[100] for s in summaries}
        if "fgd" in by_policy and "flex" in by_policy:
            gap = by_policy["fgd"] - lb["mean"]
            closed = (by_policy["fgd"] - by_policy["flex"]) / gap * 100 if gap > 0 else 0.0
            lines.append(
                f"`flex` closes {closed:.0f} % of the gap between `fgd` ({by_policy['fgd']:.2f}) and the bound."
            )
    return "\n".join(lines) + "\n"
