"""End-to-end `flexai simulate` on a tiny trace, and its refusals of bad input (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexai.cli.main import app

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[str, str]:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text(
        "sn,cpu_milli,memory_mib,gpu,model\n"
        + "".join(f"node-{i:02d},32000,131072,{[1, 2, 4, 8][i % 4]},{['T4', 'V100M32'][i % 2]}\n" for i in range(12))
    )
    pods = tmp_path / "pods.csv"
    rows = ["name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec"]
    shapes = [(1, 470, ""), (1, 1000, ""), (1, 810, ""), (2, 1000, ""), (0, 0, ""), (1, 230, "T4"), (1, 650, "")]
    for i in range(90):
        count, share, spec = shapes[i % len(shapes)]
        rows.append(f"pod-{i:03d},{2000 + (i % 3) * 2000},4096,{count},{share},{spec}")
    pods.write_text("\n".join(rows) + "\n")
    return str(pods), str(nodes)


def test_simulate_end_to_end(tiny: tuple[str, str], tmp_path: Path) -> None:
    pods, nodes = tiny
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "simulate",
            "--trace",
            pods,
            "--nodes",
            nodes,
            "--policy",
            "fgd,flex,bestfit,k8s-whole-gpu",
            "--seeds",
            "1-2",
            "--json",
            str(tmp_path / "r.json"),
            "--out",
            str(out),
            "--jobs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "unallocated GPU %" in result.output and "lower bound" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["trace"] == "pods" and doc["nodes"] == "nodes"
    assert {(r["policy"], r["seed"]) for r in doc["runs"]} == {
        (p, s) for p in ["fgd", "flex", "bestfit", "k8s-whole-gpu"] for s in (1, 2)
    }
    for run in doc["runs"]:
        assert set(run["unallocated_gpu_pct"]) == {"90", "95", "100", "110", "130"}
        assert isinstance(run["failed_pods"], int) and run["wall_s"] >= 0
    summary = {s["policy"]: s["unallocated_gpu_pct_at_100"] for s in doc["summary"]}
    assert set(summary) == {"fgd", "flex", "bestfit", "k8s-whole-gpu"} and set(summary["fgd"]) == {"mean", "sd"}
    lb = doc["lower_bound"]["unallocated_gpu_pct_at_100"]["mean"]
    assert all(summary[p]["mean"] >= lb - 1e-6 for p in ("fgd", "flex", "bestfit"))
    assert (out / "unallocated_gpu.png").stat().st_size > 10_000
    assert "Pooling gain" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text()) == doc


def test_a_trace_without_gpu_pods_is_refused(tmp_path: Path, tiny: tuple[str, str]) -> None:
    cpu_only = tmp_path / "cpu.csv"
    cpu_only.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,1000,10,0,0\n")
    result = runner.invoke(
        app, ["simulate", "--trace", str(cpu_only), "--nodes", tiny[1], "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "has no pod with num_gpu > 0" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fgd,nope"], "--policy='nope' is not known"),
        (["--seeds", "51-42"], "--seeds='51-42' is not allowed"),
        (["--seeds", "a,b"], "--seeds='a,b' is not allowed"),
        (["--trace", "/no/such/file.csv"], "not found"),
        (["--inflate", "0"], "--inflate=0.0 is not allowed"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
