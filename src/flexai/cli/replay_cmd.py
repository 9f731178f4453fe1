"""`flexai replay`: the trace replayed over time through the Hi Scheduler, scheduler by scheduler."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexai.cli.console import fail, out, progress_bar, text
from flexai.cli.main import app, check_writable, parse_names, parse_seeds

DEFAULT_LOADS = "1.1"
DEFAULT_SEEDS = "42"


def _parse_floats(option: str, value: str, allowed: Callable[[float], bool], many: str, one: str) -> list[float]:
    """A comma-separated list of numbers, each checked; one line naming the option, the value and what is
    allowed on the first bad part."""
    numbers = []
    for part in value.split(","):
        try:
            number = float(part)
        except ValueError:
            fail(f"{option}={value!r} is not allowed: {many} (bad part {part!r})")
        if not allowed(number):
            fail(f"{option}={part.strip()!r} is not allowed: {one}")
        numbers.append(number)
    return list(dict.fromkeys(numbers))


def parse_loads(value: str) -> list[float]:
    return _parse_floats(
        "--load",
        value,
        lambda load: 0 < load <= 10,
        "fractions of the GPU capacity like 0.7,0.9,1.1",
        "a fraction of the GPU capacity in (0, 10]",
    )


def parse_interference(value: str) -> list[float]:
    return _parse_floats(
        "--interference",
        value,
        lambda alpha: 0 <= alpha <= 10,
        "slowdowns per co-runner like 0.02,0.3",
        "a slowdown per co-runner in 0..10",
    )


def parse_schedulers(value: str) -> list[str]:
    from flexai.sim.replay import REPLAY_SCHEDULERS

    return parse_names("--scheduler", value, list(REPLAY_SCHEDULERS))


@app.command()
def replay(
    trace: Annotated[
        str, typer.Option(help="Bundled trace with time columns (default, ...) or an openb CSV.")
    ] = "default",
    nodes: Annotated[str, typer.Option(help="Node list the sub-cluster is drawn from (gpu, all, or a CSV).")] = "gpu",
    gpus: Annotated[int, typer.Option(help="GPUs in the sub-cluster.")] = 128,
    load: Annotated[
        str, typer.Option(help="Offered load(s), fractions of the sub-cluster's GPU capacity.")
    ] = DEFAULT_LOADS,
    scheduler: Annotated[str, typer.Option(help="Schedulers, comma-separated, or 'all'.")] = "all",
    seeds: Annotated[str, typer.Option(help="Seeds: 42-46 or 42,43,...")] = DEFAULT_SEEDS,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder (plots, JSON, Markdown).")] = Path(
        "flexai-replay"
    ),
    jobs: Annotated[int, typer.Option(help="Worker processes (default: the CPU count).")] = 0,
    interference: Annotated[
        str,
        typer.Option(
            help="Owners' slowdown per co-running guest (time-sharing), one or more: 0.02 (good isolation), "
            "0.3 (naive time-slicing). Each run is reported at each value."
        ),
    ] = "0.02",
) -> None:
    """Replay a production trace over time (arrivals, departures, preemptions) and compare schedulers."""
    from flexai.sim.openb import TraceFormatError, load_nodes, load_pods
    from flexai.sim.replay import ReplayError, build_workload, draw_subcluster
    from flexai.sim.replay_report import default_workers, document, markdown, plot, run_replays, write_json

    schedulers = parse_schedulers(scheduler)
    loads = parse_loads(load)
    seed_list = parse_seeds(seeds)
    alphas = parse_interference(interference)
    if jobs < 0:
        fail(f"--jobs={jobs!r} is not allowed: 0 (automatic) or more")
    try:
        pods = load_pods(trace)
        node_list = load_nodes(nodes)
    except TraceFormatError as exc:
        fail(str(exc))
    try:
        import numpy as np

        draw_subcluster(node_list, gpus, np.random.default_rng(0))
        build_workload(pods, gpus, min(loads), np.random.default_rng(0))
    except ReplayError as exc:
        fail(str(exc))
    check_writable(out_dir, "--out", folder=True)
    if json_path is not None:
        check_writable(json_path, "--json", folder=False)
    workers = jobs or default_workers()
    tasks = len(schedulers) * len(loads) * len(seed_list)
    out.print(
        text(
            f"trace {pods.name} ({len(pods.requests):,} pods), sub-cluster of {gpus} GPUs from {node_list.name}, "
            f"{len(schedulers)} schedulers x {len(loads)} loads x {len(seed_list)} seeds on {workers} workers"
        )
    )
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("replaying", total=tasks)

        def done(result) -> None:  # noqa: ANN001
            progress.update(
                task, advance=1, description=f"done: {result.scheduler} load {result.load:g} seed {result.seed}"
            )

        results = run_replays(trace, nodes, schedulers, loads, seed_list, gpus, workers, done, alphas)
    doc = document(pods.name, gpus, results)
    _print_table(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", doc)
    if json_path is not None:
        write_json(json_path, doc)
    plot(out_dir / "gpu_over_time.png", out_dir / "queue_delay.png", results)
    (out_dir / "report.md").write_text(markdown(doc))
    out.print(
        text(
            f"report in {out_dir}/ (report.md, gpu_over_time.png, queue_delay.png, results.json) — "
            f"{time.perf_counter() - started:.1f} s"
        )
    )


def _print_table(doc: dict) -> None:
    table = Table(title="replay: mean over seeds ± 95 % interval (delays: queueing p99, seconds)")
    columns = (
        "load",
        "scheduler",
        "alloc %",
        "busy %",
        "work GPU-h",
        "high p99",
        "normal p99",
        "low p99",
        "preempted",
        "lost %",
        "opport. GPU-h",
        "high slow p99",
        "moves",
        "frag %",
        "wall s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "scheduler" else "right")

    def cell(value: dict, digits: int = 1) -> str:
        return f"{value['mean']:,.{digits}f}±{value['ci95']:,.{digits}f}"

    several_alphas = len({row["interference"] for row in doc["summary"]}) > 1
    for row in doc["summary"]:
        delay = row["queue_delay_s"]
        table.add_row(
            text(f"{row['load']:g}"),
            text(row["scheduler"]),
            cell(row["gpu_allocated_pct"]),
            cell(row["gpu_busy_pct"]),
            cell(row["work_done_gpu_hours"], 0),
            cell(delay["high"]["p99"], 0),
            cell(delay["normal"]["p99"], 0),
            cell(delay["low"]["p99"], 0),
            cell(row["preemptions"], 0),
            f"{row['lost_pct_of_work_done']:.2f}",
            cell(row["opportunistic_gpu_hours"], 0),
            f"{row['high_slowdown']['p99']['mean']:.3f}" + (f" a={row['interference']:g}" if several_alphas else ""),
            cell(row["migrations"], 0),
            cell(row["blocked_by_fragmentation_pct"]),
            f"{row['wall_s']['mean']:.1f}",
        )
    out.print(table)
