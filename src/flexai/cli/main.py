"""`flexai`: one command with a subcommand group per area."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexai import __version__
from flexai.cli.console import fail, progress_bar, text
from flexai.cli.console import out as console

app = typer.Typer(
    help="flexai: pool, slice and schedule accelerators of any vendor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEFAULT_SEEDS = "42-51"


def check_writable(path: Path, option: str, folder: bool) -> None:
    """Refuse an output path before the work, not after it (one line, exit 2)."""
    target = path if folder else path.parent
    try:
        if target.exists() and not target.is_dir():
            fail(f"{option}={str(path)!r} is not allowed: {target} is not a folder")
        if folder:
            target.mkdir(parents=True, exist_ok=True)
        elif not target.is_dir():
            fail(f"{option}={str(path)!r} is not allowed: folder {target} does not exist")
        if not folder and path.exists() and path.is_dir():
            fail(f"{option}={str(path)!r} is not allowed: it is a folder, give a file name")
        import tempfile

        with tempfile.NamedTemporaryFile(dir=target, prefix=".flexai-write-check-"):
            pass
    except OSError as exc:
        fail(f"{option}={str(path)!r} is not allowed: cannot write there ({exc.strerror or exc})")


def parse_seeds(text: str) -> list[int]:
    """'42-51', '42,43,44' or a mix ('42-45,50')."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            fail(
                f"--seeds={text!r} is not allowed: give non-negative integers like 42-51 or 42,43,44 "
                f"(bad part {part!r})"
            )
    if not seeds or min(seeds) < 0 or len(seeds) > 1000:
        fail(f"--seeds={text!r} is not allowed: 1..1000 non-negative integers like 42-51 or 42,43,44")
    return list(dict.fromkeys(seeds))


def parse_names(option: str, text: str, known: list[str]) -> list[str]:
    """A comma-separated choice among ``known`` names, or 'all'."""
    if text.strip() == "all":
        return known
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    for p in chosen:
        if p not in known:
            fail(f"{option}={p!r} is not known: choose from {', '.join(known)} or all")
    if not chosen:
        fail(f"{option}={text!r} is not allowed: name one or more of {', '.join(known)} or all")
    return list(dict.fromkeys(chosen))


def parse_policies(text: str) -> list[str]:
    from flexai.scheduler import policy_names

    return parse_names("--policy", text, policy_names())


@app.callback(invoke_without_command=True)
def main(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(text(f"flexai {__version__}"))
        raise typer.Exit()
    if context.invoked_subcommand is None:
        console.print(context.get_help())
        raise typer.Exit()


@app.command()
def simulate(
    trace: Annotated[
        str, typer.Option(help="Bundled trace name (default, gpushare40, ...) or an openb CSV path.")
    ] = "default",
    nodes: Annotated[str, typer.Option(help="Bundled node list (gpu, all) or an openb node CSV path.")] = "gpu",
    policy: Annotated[str, typer.Option(help="Policy names, comma-separated, or 'all'.")] = "all",
    seeds: Annotated[str, typer.Option(help="Seeds: 42-51 or 42,43,...")] = DEFAULT_SEEDS,
    inflate: Annotated[float, typer.Option(help="Resample the pods to this multiple of the GPU capacity.")] = 1.3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    out: Annotated[Path, typer.Option(help="Report folder (plot, JSON, Markdown).")] = Path("flexai-report"),
    jobs: Annotated[int, typer.Option(help="Worker processes (default: the CPU count).")] = 0,
    bound: Annotated[bool, typer.Option(help="Compute the lower bound (MILP) at arrived 100 %.")] = True,
    migrations: Annotated[
        int,
        typer.Option(help="At most this many moves of placed pods per failed pod (defragmentation; never high QoS)."),
    ] = 0,
) -> None:
    """Fill the cluster with a production trace, policy by policy, and report unallocated GPU."""
    from flexai.sim.openb import TraceFormatError, load_nodes, load_pods
    from flexai.sim.report import document, markdown, plot_curves, summarise, write_json
    from flexai.sim.runner import default_jobs, run_many

    policies = parse_policies(policy)
    seed_list = parse_seeds(seeds)
    if not 0.1 <= inflate <= 10:
        fail(f"--inflate={inflate!r} is not allowed: a factor in 0.1..10 (the paper uses 1.3)")
    if jobs < 0:
        fail(f"--jobs={jobs!r} is not allowed: 0 (automatic) or more")
    if not 0 <= migrations <= 1000:
        fail(f"--migrations={migrations!r} is not allowed: 0 (no moves) .. 1000 moves per failed pod")
    try:
        pods = load_pods(trace)
        node_list = load_nodes(nodes)
    except TraceFormatError as exc:
        fail(str(exc))
    if not any(n.device_count for n in node_list.nodes):
        fail(f"--nodes={nodes!r} has no GPU nodes: the experiment needs at least one device")
    if not any(r.device_count for r in pods.requests):
        fail(f"--trace={trace!r} has no pod with num_gpu > 0: the experiment fills GPU capacity with such pods")
    check_writable(out, "--out", folder=True)
    if json_path:
        check_writable(json_path, "--json", folder=False)
    workers = jobs or default_jobs()
    total_tasks = len(policies) * len(seed_list) + (len(seed_list) if bound else 0)
    console.print(
        text(
            f"trace {pods.name} ({len(pods.requests):,} pods), nodes {node_list.name} "
            f"({len(node_list.nodes):,} nodes, {sum(n.device_count for n in node_list.nodes):,} GPUs), "
            f"{len(policies)} policies x {len(seed_list)} seeds on {workers} workers"
            + (f", at most {migrations} moves per failed pod" if migrations else "")
        )
    )
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("simulating", total=total_tasks)

        def done(label: str) -> None:
            progress.update(task, advance=1, description=f"done: {label}")

        trace_arg = trace
        runs, bounds = run_many(
            trace_arg, nodes, policies, seed_list, inflate, workers, bound, done, migrations=migrations
        )
    doc = document(pods.name, node_list.name, runs, bounds)
    summaries = summarise(runs)
    _print_table(summaries, doc)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", doc)
    if json_path:
        write_json(json_path, doc)
    plot_curves(out / "unallocated_gpu.png", runs, bounds, f"trace {pods.name}: unallocated GPU vs arrived workload")
    (out / "report.md").write_text(markdown(doc, summaries))
    console.print(
        text(
            f"report in {out}/ (report.md, unallocated_gpu.png, results.json) — {time.perf_counter() - started:.1f} s"
        )
    )


def _print_table(summaries: list, doc: dict) -> None:
    from flexai.sim.metrics import REPORT_ARRIVED_PCT

    table = Table(
        title="unallocated GPU % at arrived workload (mean over seeds); demand placed % at arrived 100 %",
    )
    table.add_column("policy", style="bold")
    for x in REPORT_ARRIVED_PCT:
        table.add_column(f"{x} %", justify="right")
    table.add_column("failed pods", justify="right")
    table.add_column("demand placed %", justify="right")
    table.add_column("wall s", justify="right")
    for s in summaries:
        table.add_row(
            text(s.policy),
            *[f"{s.unallocated_mean[x]:.2f}" for x in REPORT_ARRIVED_PCT],
            f"{s.failed_pods_mean:.0f}",
            f"{s.placed_demand_pct_at_100_mean:.2f}",
            f"{s.wall_s_mean:.2f}",
        )
    console.print(table)
    for g in doc.get("pooling_gain") or []:
        console.print(
            text(
                f"pooling gain of {g['policy']} over k8s-whole-gpu at arrived 100 %: "
                f"+{g['extra_gpu_demand_pct']:.1f} % GPU demand placed, +{g['extra_pods']:.0f} pods"
            )
        )
    for s in summaries:
        if s.max_migrations:
            console.print(
                text(f"{s.policy}: {s.migrations_mean:.1f} moves per run (at most {s.max_migrations} per failed pod)")
            )
    bound = doc.get("lower_bound")
    if bound:
        lb = bound["unallocated_gpu_pct_at_100"]
        console.print(text(f"lower bound on unallocated GPU % at arrived 100 %: {lb['mean']:.2f} (sd {lb['sd']:.2f})"))


def _register_subcommands() -> None:
    import flexai.cli.k8s_cmds  # noqa: F401  (registers the k8s group)
    import flexai.cli.pool_cmds  # noqa: F401  (registers serve, run, ps, pool, events, logs, cancel)
    import flexai.cli.replay_cmd  # noqa: F401  (registers replay)


_register_subcommands()


if __name__ == "__main__":
    app()
