"""`flexai serve` and the pool's client commands: run, ps, pool, events, logs, cancel."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flexai.cli.main import app, console, fail

StateOption = Annotated[
    Path | None,
    typer.Option("--state", help="State directory of the pool (default: $FLEXAI_STATE or ~/.local/state/flexai)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def state_dir(option: Path | None) -> Path:
    if option is not None:
        return option
    if os.environ.get("FLEXAI_STATE"):
        return Path(os.environ["FLEXAI_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "flexai"


def parse_share(text: str) -> int:
    """'30%' or '300m' -> 300 (milli)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|m)\s*", text)
    if not match:
        fail(f"--share={text!r} is not allowed: a percentage like 30% or a milli share like 300m")
    value = float(match.group(1))
    milli = value * 10 if match.group(2) == "%" else value
    if milli != int(milli) or not 1 <= milli <= 1000:
        fail(f"--share={text!r} is not allowed: 1m..1000m (0.1 %..100 %) in whole milli")
    return int(milli)


def parse_memory(text: str) -> int:
    """'8GiB', '8G', '8192MiB', '8192M' -> MiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|G|MiB|M)\s*", text)
    if not match:
        fail(f"--memory={text!r} is not allowed: a size like 8GiB or 8192MiB")
    value = float(match.group(1)) * (1024 if match.group(2) in ("GiB", "G") else 1)
    if value != int(value):
        fail(f"--memory={text!r} is not allowed: a whole number of MiB")
    return int(value)


class PoolClient:
    """Talks to the daemon over its unix socket, or over TCP when FLEXAI_URL is set (token from
    FLEXAI_TOKEN_FILE)."""

    def __init__(self, state: Path) -> None:
        import httpx

        url = os.environ.get("FLEXAI_URL")
        headers = {}
        if url:
            token_file = os.environ.get("FLEXAI_TOKEN_FILE")
            if token_file:
                headers["Authorization"] = f"Bearer {Path(token_file).read_text().strip()}"
            self.where = url
            self.http = httpx.Client(base_url=url, headers=headers, timeout=30)
        else:
            sock = state / "flexai.sock"
            if not sock.exists():
                console.print(f"[red]error:[/] no pool daemon at {sock}: start one with `flexai serve --state {state}`")
                raise typer.Exit(code=1)
            self.where = str(sock)
            self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://flexai", timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            console.print(f"[red]error:[/] cannot reach the pool daemon at {self.where}: {exc}")
            raise typer.Exit(code=1) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text) if response.content else response.reason_phrase
            except ValueError:  # not JSON (e.g. a plain-text 500)
                detail = response.text.strip() or response.reason_phrase
            if isinstance(detail, list):  # pydantic validation errors
                detail = "; ".join(f"{'.'.join(map(str, d['loc'][1:]))}: {d['msg']}" for d in detail)
            if response.status_code in (400, 404, 422):
                fail(str(detail))
            console.print(f"[red]error:[/] {detail}")
            raise typer.Exit(code=1)
        return response.json()


@app.command()
def serve(
    devices: Annotated[str, typer.Option(help="auto, or sim:SPEC like 2xA100-80GB,1xAscend910B-64GB.")] = "auto",
    state: StateOption = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to serve on TCP instead of the unix socket.")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="Bearer token for TCP clients (required with --listen).")
    ] = None,
    share_step: Annotated[int, typer.Option(help="Slice step in milli (100 = 10 %).")] = 100,
    lending: Annotated[bool, typer.Option(help="Lend share left idle to the jobs running on a device.")] = True,
    memory_grace: Annotated[float, typer.Option(help="Seconds a job may exceed its memory quota.")] = 5.0,
) -> None:
    """Run the pool daemon of this machine."""
    from flexai.local.daemon import serve as run_server
    from flexai.local.pool import Pool, PoolConfig
    from flexai.node.devices import DiscoveryError, discover

    directory = state_dir(state)
    address = None
    token = None
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"--listen={listen!r} is not allowed: HOST:PORT like 127.0.0.1:8470")
        if token_file is None:
            fail("--listen needs --token-file: TCP clients must present a bearer token")
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file={str(token_file)!r} cannot be read: {exc.strerror}")
        if len(token) < 16:
            fail(f"--token-file={str(token_file)!r} holds a token of {len(token)} characters: at least 16 are needed")
        address = (host, int(port))
    from flexai.local.daemon import StateInUseError, lock_state

    try:
        lock_state(directory)
    except StateInUseError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--state={str(directory)!r} cannot be used: {exc.strerror}")
    try:
        backend, found = discover(devices)
    except (DiscoveryError, ValueError) as exc:
        fail(str(exc))
    try:
        pool = Pool(
            directory,
            backend,
            found,
            PoolConfig(share_step_milli=share_step, lending=lending, memory_grace_s=memory_grace),
        )
    except (ValueError, RuntimeError, OSError, sqlite3.Error) as exc:
        fail(f"cannot open the pool state in {directory}: {exc}")
    where = f"http://{listen}" if listen else str(directory / "flexai.sock")
    console.print(f"flexai pool: {len(found)} {backend.name} device(s), state {directory}, API on {where}")
    run_server(pool, directory, address, token)


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run (after --).")],
    state: StateOption = None,
    share: Annotated[str, typer.Option(help="Compute share per device: 30% or 300m.")] = "100%",
    memory: Annotated[str, typer.Option(help="Device memory per device: 8GiB or 8192MiB (0 = no quota).")] = "0MiB",
    count: Annotated[int, typer.Option(help="Number of devices.")] = 1,
    model: Annotated[str, typer.Option(help="Device model to run on (default: any).")] = "",
    priority: Annotated[int, typer.Option(help="Higher starts first.")] = 0,
    name: Annotated[str, typer.Option(help="A name for the job.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Stream the output and exit with the job's exit code.")] = False,
) -> None:
    """Queue a command on a slice of the pool; prints the job id."""
    body = {
        "command": command,
        "share_milli": parse_share(share),
        "memory_mib": parse_memory(memory),
        "count": count,
        "model": model,
        "priority": priority,
        "name": name,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
    }
    client = PoolClient(state_dir(state))
    job = client.call("POST", "/api/v1/jobs", json=body)
    if not wait:
        console.print(job["id"])
        return
    print(f"flexai: job {job['id']} {job['state']}", file=sys.stderr)
    final = _follow(client, job["id"])
    code = final.get("exit_code")
    if final["state"] != "succeeded":
        print(f"flexai: job {job['id']} {final['state']}: {final.get('reason', '')}", file=sys.stderr)
    raise typer.Exit(code=code if isinstance(code, int) else 1)


def _follow(client: PoolClient, job_id: str) -> dict[str, Any]:
    offset = 0
    while True:
        chunk = client.call("GET", f"/api/v1/jobs/{job_id}/logs", params={"offset": offset})
        if chunk["text"]:
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        offset = chunk["next_offset"]
        if chunk["finished"] and not chunk["text"]:
            return client.call("GET", f"/api/v1/jobs/{job_id}")
        if not chunk["text"]:
            time.sleep(0.2)


@app.command()
def ps(state: StateOption = None, as_json: JsonOption = False) -> None:
    """List the pool's jobs."""
    jobs = PoolClient(state_dir(state)).call("GET", "/api/v1/jobs")
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    table = Table()
    for column in ("id", "name", "state", "request", "slices", "priority", "reason"):
        table.add_column(column)
    for j in jobs:
        slices = ", ".join(f"#{s['device']}" for s in j["slices"] or [])
        request = f"{j['device_count']} x {j['share_milli'] / 10:g}%" + (
            f", {j['memory_mib']} MiB" if j["memory_mib"] else ""
        )
        table.add_row(j["id"], j["name"], j["state"], request, slices, str(j["priority"]), j["reason"])
    console.print(table)


@app.command()
def pool(state: StateOption = None, as_json: JsonOption = False) -> None:
    """Show the devices and the slices granted on them."""
    view = PoolClient(state_dir(state)).call("GET", "/api/v1/pool")
    if as_json:
        print(json.dumps(view, indent=2))
        return
    table = Table(title=f"{view['backend']} pool: {view['running']} running, {view['queued']} queued")
    for column in ("device", "model", "memory", "slices", "free"):
        table.add_column(column)
    for d in view["devices"]:
        slices = ", ".join(f"{s['name']} ({s['job']}) {s['share_milli'] / 10:g}%" for s in d["slices"]) or "-"
        table.add_row(
            str(d["index"]), d["model"], f"{d['memory_mib'] / 1024:g} GiB", slices, f"{d['free_share_milli'] / 10:g}%"
        )
    console.print(table)


@app.command()
def events(state: StateOption = None, as_json: JsonOption = False) -> None:
    """Show what happened in the pool."""
    items = PoolClient(state_dir(state)).call("GET", "/api/v1/events")
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table()
    for column in ("time", "job", "event", "message"):
        table.add_column(column)
    for e in items:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["job_id"] or "", e["kind"], e["message"])
    console.print(table)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id or name.")],
    state: StateOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's output."""
    client = PoolClient(state_dir(state))
    if follow:
        _follow(client, job_id)
        return
    chunk = client.call("GET", f"/api/v1/jobs/{job_id}/logs")
    sys.stdout.write(chunk["text"])


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id or name.")], state: StateOption = None) -> None:
    """Cancel a queued or running job."""
    job = PoolClient(state_dir(state)).call("POST", f"/api/v1/jobs/{job_id}/cancel")
    console.print(f"{job['id']} {job['state']}")
