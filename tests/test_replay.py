"""`flexai replay`: the time-based simulator end to end on a tiny trace, its determinism, its refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexai.cli.main import app
from flexai.sim.openb import TraceFormatError, load_nodes, load_pods
from flexai.sim.replay import ReplayError, build_workload, draw_subcluster, run_replay

HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time"


def tiny_trace(path: Path, pods: int = 80, seed: int = 7) -> Path:
    """Three days of mixed work: whole-GPU services (LS), slices, multi-GPU batch (BE), some that gave up."""
    rng = random.Random(seed)
    start, end = 1_000_000, 1_000_000 + 3 * 86_400
    lines = [
        HEADER,
        f"resident,8000,16384,1,1000,,LS,Running,10,{end - 5000},10",
        f"last,1000,1024,1,500,,BE,Running," f"{start},{end},{start}",
    ]
    for i in range(pods):
        created = rng.randint(start, end - 3600)
        qos = rng.choice(["LS", "LS", "BE", "Burstable"])
        gpus, share = rng.choice([(1, 1000), (1, 500), (1, 300), (2, 1000), (4, 1000)])
        if rng.random() < 0.1:
            lines.append(f"p{i},4000,8192,{gpus},{share},,{qos},Pending,{created},{created + 120},")
            continue
        scheduled = created + rng.randint(0, 60)
        deleted = min(end, scheduled + rng.randint(600, 10 * 3600))
        lines.append(f"p{i},4000,8192,{gpus},{share},,{qos},Running,{created},{deleted},{scheduled}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_nodes(path: Path) -> Path:
    path.write_text(
        "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,4,A100\nn1,64000,262144,4,A100\n" "n2,32000,131072,2,T4\n"
    )
    return path


def test_replay_end_to_end_writes_the_documented_json(tmp_path: Path) -> None:
    trace, nodes = tiny_trace(tmp_path / "trace.csv"), tiny_nodes(tmp_path / "nodes.csv")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "replay",
            "--trace",
            str(trace),
            "--nodes",
            str(nodes),
            "--gpus",
            "8",
            "--load",
            "0.8,1.2",
            "--scheduler",
            "all",
            "--seeds",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--out",
            str(out),
            "--jobs",
            "1",
            "--interference",
            "0.02,0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["trace"] == "trace" and doc["gpus"] == 8
    schedulers = ("k8s-default", "fgd", "flex", "hi", "hi-no-timeshare", "hi-no-defrag")
    assert len(doc["runs"]) == len(schedulers) * 2 * 2
    keys = {
        "scheduler",
        "load",
        "seed",
        "gpu_allocated_pct",
        "gpu_busy_pct",
        "work_done_gpu_hours",
        "queue_delay_s",
        "completed",
        "abandoned",
        "preemptions",
        "preempted_over_3",
        "lost_gpu_hours",
        "wall_s",
        # time-sharing and defragmentation (issue 8's interface)
        "interference",
        "migrations",
        "migrated_pods_pct",
        "blocked_by_fragmentation_pct",
        "high_slowdown",
        "opportunistic_gpu_hours",
        "idle_unusable_for_memory_pct",
        "multi_gpu_queue_delay_s",
    }
    for run in doc["runs"]:
        assert keys <= set(run)
        assert set(run["queue_delay_s"]) == {"high", "normal", "low"}
        assert all(set(v) == {"p50", "p99"} for v in run["queue_delay_s"].values())
        assert set(run["high_slowdown"]) == set(run["multi_gpu_queue_delay_s"]) == {"p50", "p99"}
        assert run["interference"] in (0.02, 0.3)
        assert 0 <= run["gpu_busy_pct"] <= 100.0001 and 0 <= run["gpu_allocated_pct"] <= 100.0001
        if run["scheduler"] not in ("hi", "hi-no-defrag"):  # only guests add busy time beyond the grants
            assert run["gpu_busy_pct"] <= run["gpu_allocated_pct"] + 1e-6
            assert run["opportunistic_gpu_hours"] == 0
        if run["scheduler"] in ("fgd", "flex"):
            assert run["preemptions"] == 0
        if run["scheduler"] in ("k8s-default", "fgd", "flex", "hi-no-defrag"):
            assert run["migrations"] == 0 and run["migrated_pods_pct"] == 0
    assert {(s["scheduler"], s["load"], s["interference"]) for s in doc["summary"]} == {
        (s, load, alpha) for s in schedulers for load in (0.8, 1.2) for alpha in (0.02, 0.3)
    }
    by_alpha = {(r["scheduler"], r["load"], r["interference"]): r for r in doc["runs"]}
    for load in (0.8, 1.2):  # alpha changes no decision, only the owners' slowdown (in proportion)
        low, high = by_alpha[("hi", load, 0.02)], by_alpha[("hi", load, 0.3)]
        assert low["gpu_busy_pct"] == high["gpu_busy_pct"]
        assert high["high_slowdown"]["p99"] == pytest.approx(15 * low["high_slowdown"]["p99"])
    for name in ("report.md", "gpu_over_time.png", "queue_delay.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert "| 1.2 | 0.3 | hi |" in (out / "report.md").read_text()


def test_replay_is_deterministic_per_seed(tmp_path: Path) -> None:
    trace, nodes = load_pods(str(tiny_trace(tmp_path / "t.csv"))), load_nodes(str(tiny_nodes(tmp_path / "n.csv")))
    first = run_replay(trace, nodes, "hi", 1.3, 5, gpus=8).json()
    second = run_replay(trace, nodes, "hi", 1.3, 5, gpus=8).json()
    other = run_replay(trace, nodes, "hi", 1.3, 6, gpus=8).json()
    for doc in (first, second, other):
        doc.pop("wall_s")
    assert first == second
    assert first != other


def test_hi_preempts_where_flex_only_waits(tmp_path: Path) -> None:
    trace, nodes = load_pods(str(tiny_trace(tmp_path / "t.csv", pods=150))), load_nodes(
        str(tiny_nodes(tmp_path / "n.csv"))
    )
    flex = run_replay(trace, nodes, "flex", 1.5, 3, gpus=8)
    hi = run_replay(trace, nodes, "hi", 1.5, 3, gpus=8)
    assert flex.preemptions == 0 and hi.preemptions > 0
    assert hi.queue_delay_s["high"]["p99"] <= flex.queue_delay_s["high"]["p99"]


def test_offered_load_is_met_and_the_subcluster_keeps_the_model_mix(tmp_path: Path) -> None:
    import numpy as np

    trace = load_pods(str(tiny_trace(tmp_path / "t.csv")))
    workload = build_workload(trace, 8, 1.1, np.random.default_rng(0))
    assert workload.offered_load == pytest.approx(1.1, rel=0.02)
    sub = draw_subcluster(load_nodes("gpu"), 128, np.random.default_rng(0))
    models = {n.device_model for n in sub}
    assert {"G2", "T4"} <= models and abs(sum(n.device_count for n in sub) - 128) <= 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scheduler", "magic"], "--scheduler='magic' is not known"),
        (["--load", "0"], "--load='0' is not allowed"),
        (["--load", "fast"], "--load='fast' is not allowed"),
        (["--trace", "multigpu20"], "has no time columns"),
        (["--gpus", "0"], "gpus=0 is not allowed"),
        (["--interference", "0.02,lots"], "--interference='0.02,lots' is not allowed"),
        (["--interference", "-1"], "--interference='-1' is not allowed"),
    ],
)
def test_replay_refuses_bad_input_in_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["replay", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_run_replay_refuses_unknown_scheduler(tmp_path: Path) -> None:
    trace, nodes = load_pods(str(tiny_trace(tmp_path / "t.csv"))), load_nodes(str(tiny_nodes(tmp_path / "n.csv")))
    with pytest.raises(ReplayError, match="scheduler='x' is not allowed"):
        run_replay(trace, nodes, "x", 1.0, 1, gpus=8)


# ----------------------------------------------------------------------------- the strict loader (hardening)
@pytest.mark.parametrize(
    "row,message",
    [
        ("a,1000,1024,1,500,,LS,Running,1,5,2,extra", r"t.csv:2: 12 columns, the header has 11"),
        ("a,1000,1024,1,500,,ZZ,Running,1,5,2", r"t.csv:2: column qos: value 'ZZ' is not allowed: one of LS, BE"),
        ("a,1000,1024,1,500,,LS,Running,yesterday,5,2", r"t.csv:2: column creation_time: value 'yesterday'"),
        ("a,1000,1024,1,500,,LS,Sleeping,1,5,2", r"t.csv:2: column pod_phase: value 'Sleeping'"),
        ("a,1000,1024,1,500,,LS,Running,9,5,2", r"t.csv:2: column scheduled_time"),
    ],
)
def test_loader_refuses_what_it_does_not_understand(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "\n" + row + "\n")
    with pytest.raises(TraceFormatError, match=message):
        load_pods(str(path))


def test_loader_refuses_an_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli,colour\na,1,1,0,0,red\n")
    with pytest.raises(TraceFormatError, match=r"t.csv:1: column 'colour' is not allowed"):
        load_pods(str(path))


def test_simulate_refuses_an_unwritable_output_before_the_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["simulate", "--out", str(blocker / "report"), "--policy", "fgd", "--seeds", "1"])
    assert result.exit_code == 2
    assert "--out=" in result.output and "is not allowed" in result.output
    assert "Traceback" not in result.output and "simulating" not in result.output
