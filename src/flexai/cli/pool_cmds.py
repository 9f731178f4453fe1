"""`flexai serve` and the pool's client commands: run, ps, pool, queues, events, logs, cancel.

Output: data on stdout (a job id, a table, JSON, a log), every error on stderr as one line. Exit codes: 0 done,
2 bad input (refused here or by the daemon: any 4xx answer), 1 the daemon cannot be reached or failed (5xx).
Dynamic text is printed verbatim (``flexai.cli.console``): no rich markup or emoji codes are read in it.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from flexai.cli.console import die, err, fail, out, text
from flexai.cli.main import app

StateOption = Annotated[
    Path | None,
    typer.Option("--state", help="State directory of the pool (default: $FLEXAI_STATE or ~/.local/state/flexai)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

MAX_EVENTS = 10_000
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


PRIORITY_CLASSES = ("high", "normal", "low")


def parse_priority(value: str) -> tuple[str, int]:
    """``--priority``: ``high|normal|low``, an integer (class normal with that priority) or ``CLASS:INT``
    -> (class, integer priority). The integer's range is checked by the daemon."""
    cls, colon, number = value.strip().lower().partition(":")
    if not colon and re.fullmatch(r"[+-]?[0-9]+", cls):
        return "normal", int(cls)
    if cls in PRIORITY_CLASSES and (not colon or re.fullmatch(r"[+-]?[0-9]+", number)):
        return cls, int(number) if colon else 0
    fail(
        f"--priority={value!r} is not allowed: high, normal, low, an integer (normal with that priority) "
        "or CLASS:INT like high:5"
    )


def parse_since(value: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO 8601 time
    (``2025-06-01T12:00:00``, local time unless it names its zone) -> seconds since the epoch."""
    now = time.time() if now is None else now
    match = _DURATION.fullmatch(value)
    if match:
        return max(0.0, now - float(match.group(1)) * _SECONDS[match.group(2)])
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        moment = None
    if moment is None or not 1970 <= moment.year <= 3000:
        fail(
            f"--since={value!r} is not allowed: a duration like 30s, 10m, 2h, 1d "
            "or an ISO 8601 time like 2025-06-01T12:00:00"
        )
    return max(0.0, moment.timestamp())


def _utf8_or_fail(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        fail(f"{what}={value!r} is not allowed: arguments must be valid UTF-8")
    return value


def _environment() -> dict[str, str]:
    """This shell's environment for the job; a variable that is not valid UTF-8 cannot travel (JSON) and is
    left out with a warning."""
    env = {}
    for key, value in os.environ.items():
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            err.print(text(f"flexai: warning: {key!r} is not valid UTF-8: not passed to the job"), soft_wrap=True)
            continue
        env[key] = value
    return env


def _validation_error(item: object) -> str:
    """One of FastAPI's 422 details as ``field=value: what is wrong``."""
    if not isinstance(item, dict):
        return str(item)
    field = ".".join(map(str, item.get("loc", [])[1:])) or "body"
    shown = repr(item["input"]) if "input" in item and not isinstance(item["input"], dict | list) else ""
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{field}{'=' + shown if shown else ''}: {item.get('msg', '')}"


def _path(job_id: str, *rest: str) -> str:
    return "/api/v1/jobs/" + "/".join([quote(job_id, safe=""), *rest])


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
                try:
                    token = Path(token_file).read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    fail(f"FLEXAI_TOKEN_FILE={token_file!r} cannot be read: {getattr(exc, 'strerror', None) or exc}")
                if not token.isascii() or not token.isprintable():
                    fail(f"FLEXAI_TOKEN_FILE={token_file!r} holds characters a token cannot have: printable ASCII only")
                headers["Authorization"] = f"Bearer {token}"
            self.where = url
            try:
                self.http = httpx.Client(base_url=url, headers=headers, timeout=30)
            except (httpx.InvalidURL, ValueError) as exc:
                fail(f"FLEXAI_URL={url!r} is not allowed: a URL like http://127.0.0.1:8470 ({exc})")
        else:
            sock = state / "flexai.sock"
            if not sock.exists():
                die(f"no pool daemon at {sock}: start one with `flexai serve --state {state}`")
            self.where = str(sock)
            transport = httpx.HTTPTransport(uds=str(sock), verify=False)  # a local socket: no TLS, no CA loading
            self.http = httpx.Client(transport=transport, base_url="http://flexai", timeout=30)

    @contextmanager
    def _request(self, method: str, path: str, **kwargs: Any) -> Iterator[Any]:
        import httpx

        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    self._refused(response)
                yield response
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            fail(f"FLEXAI_URL={self.where!r} is not allowed: {exc}")
        except httpx.HTTPError as exc:
            die(f"cannot reach the pool daemon at {self.where}: {exc}")

    def _refused(self, response: Any) -> None:
        try:
            detail = response.json().get("detail", response.text) if response.content else response.reason_phrase
        except (ValueError, AttributeError):  # not a JSON object (e.g. a plain-text 500)
            detail = response.text.strip() or response.reason_phrase
        if isinstance(detail, list):  # pydantic validation errors
            detail = "; ".join(_validation_error(d) for d in detail)
        detail = " ".join(str(detail).split())
        if response.status_code == 401:
            fail(f"the pool daemon at {self.where} refused the token: {detail} (check FLEXAI_TOKEN_FILE)")
        if response.status_code < 500:
            fail(detail)
        die(f"the pool daemon at {self.where} failed ({response.status_code}): {detail}")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._request(method, path, **kwargs) as response:
            response.read()
            try:
                return response.json()
            except ValueError:
                die(f"the pool daemon at {self.where} answered something that is not JSON")

    def log(self, job_id: str, offset: int, sink: IO[bytes]) -> tuple[int, bool]:
        """Copy a job's output from ``offset`` to its current end into ``sink``, chunk by chunk.

        Returns the next offset and whether the job had ended before the read (then the output is complete)."""
        with self._request("GET", _path(job_id, "logs"), params={"offset": offset}) as response:
            finished = response.headers.get("x-flexai-finished") == "true"
            for chunk in response.iter_bytes():
                sink.write(chunk)
                offset += len(chunk)
            sink.flush()
        return offset, finished


def _stdout_bytes() -> IO[bytes]:
    sys.stdout.flush()
    return sys.stdout.buffer


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
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file with queues, quotas and preemption settings (see the README)."),
    ] = None,
    timeshare: Annotated[
        bool | None,
        typer.Option(
            help="Low jobs run as guests on idle share granted to others (default on, or the config file's "
            "hi.timeshare); only devices that tell how busy they are take guests."
        ),
    ] = None,
    remote_listen: Annotated[
        str | None,
        typer.Option("--remote-listen", help="HOST:PORT to serve remote XPU leases on (TLS; needs --tls-cert/key)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM) of --remote-listen.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM) of --remote-listen.")] = None,
    client_ca: Annotated[
        Path | None, typer.Option("--client-ca", help="Require remote clients to present a certificate of this CA.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Entry points lease workers may create objects from: a glob like mypkg.models:* (repeatable).",
        ),
    ] = None,
) -> None:
    """Run the pool daemon of this machine."""
    from flexai.local.config import ConfigError, PoolSettings, load_config
    from flexai.local.daemon import serve as run_server
    from flexai.local.pool import Pool, PoolConfig
    from flexai.node.devices import DiscoveryError, discover

    settings = PoolSettings()
    if config is not None:
        try:
            settings = load_config(config)
        except ConfigError as exc:
            fail(f"--config={str(config)!r}: {exc}")
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
    remote = _remote_settings(remote_listen, tls_cert, tls_key, client_ca, allow or [])
    from flexai.local.daemon import RemoteListenError, StateInUseError, lock_state, private_umask

    # The state holds every job's environment: the daemon creates nothing that others may read.
    job_umask = private_umask()
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
    models = sorted({d.model for d in found})
    for model, key in settings.models_named().items():
        if model not in models:
            fail(f"--config={str(config)!r}: {key} is not allowed: this pool has {', '.join(models) or 'no devices'}")
    try:
        pool = Pool(
            directory,
            backend,
            found,
            PoolConfig(
                share_step_milli=share_step,
                lending=lending,
                memory_grace_s=memory_grace,
                job_umask=job_umask,
                hi=settings.hi,
                queues=settings.queues,
                preemption_grace_s=settings.preemption_grace_s,
                timeshare=settings.timeshare if timeshare is None else timeshare,
            ),
        )
    except (ValueError, RuntimeError, OSError, sqlite3.Error) as exc:
        fail(f"cannot open the pool state in {directory}: {exc}")
    where = f"http://{listen}" if listen else str(directory / "flexai.sock")
    out.print(text(f"flexai pool: {len(found)} {backend.name} device(s), state {directory}, API on {where}"))
    if remote.host:
        allowed = ", ".join(remote.allow) or "nothing"
        out.print(text(f"remote XPU leases on {remote_listen} (TLS), allowed: {allowed}"))
    try:
        run_server(pool, directory, address, token, remote)
    except RemoteListenError as exc:
        fail(str(exc))


_ALLOW_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+:[A-Za-z0-9_.*?\[\]!-]+$")


def _remote_settings(
    listen: str | None, cert: Path | None, key: Path | None, client_ca: Path | None, allow: list[str]
) -> Any:
    """The ``--remote-listen`` group of ``serve``, checked: one clear message for the first bad value."""
    import ssl

    from flexai.local.lease import RemoteSettings

    for pattern in allow:
        if not _ALLOW_PATTERN.match(pattern):
            fail(f"--allow={pattern!r} is not allowed: an entry-point glob MODULE:CALLABLE like mypkg.models:*")
    if listen is None:
        for flag, value in (("--tls-cert", cert), ("--tls-key", key), ("--client-ca", client_ca)):
            if value is not None:
                fail(f"{flag}={str(value)!r} is not allowed without --remote-listen: it is the remote listener's")
        return RemoteSettings(allow=tuple(allow), ttl_s=_lease_ttl_s())
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        fail(f"--remote-listen={listen!r} is not allowed: HOST:PORT like 0.0.0.0:8471")
    if cert is None or key is None:
        fail("--remote-listen needs --tls-cert and --tls-key: remote clients are served over TLS only")
    try:
        from flexai.remote.auth import server_context

        server_context(str(cert), str(key), str(client_ca) if client_ca else None)
    except (OSError, ssl.SSLError) as exc:
        fail(
            f"--tls-cert={str(cert)!r} --tls-key={str(key)!r} --client-ca={client_ca and str(client_ca)!r} cannot "
            f"be loaded: {exc}"
        )
    return RemoteSettings(
        host.strip("[]"),
        int(port),
        str(cert),
        str(key),
        str(client_ca) if client_ca else None,
        tuple(allow),
        ttl_s=_lease_ttl_s(),
    )


def _lease_ttl_s() -> float:
    """A lease is freed this long after its client's last heartbeat (``FLEXAI_LEASE_TTL_S``, default 10 s)."""
    value = os.environ.get("FLEXAI_LEASE_TTL_S", "10")
    try:
        ttl_s = float(value)
    except ValueError:
        ttl_s = -1.0
    if not 0.5 <= ttl_s <= 86400:
        fail(f"FLEXAI_LEASE_TTL_S={value!r} is not allowed: seconds from 0.5 to 86400")
    return ttl_s


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str] | None, typer.Argument(help="The command to run (after --).")] = None,
    state: StateOption = None,
    share: Annotated[str, typer.Option(help="Compute share per device: 30% or 300m.")] = "100%",
    memory: Annotated[str, typer.Option(help="Device memory per device: 8GiB or 8192MiB (0 = no quota).")] = "0MiB",
    count: Annotated[int, typer.Option(help="Number of devices.")] = 1,
    model: Annotated[str, typer.Option(help="Device model to run on (default: any).")] = "",
    priority: Annotated[
        str,
        typer.Option(
            help="high (never preempted), normal (preemptible after a minimum runtime), low (preemptible any "
            "time), an integer (normal, higher first, -1000000..1000000) or CLASS:INT like high:5."
        ),
    ] = "normal",
    queue: Annotated[str, typer.Option(help="The queue to wait in (queues come from `flexai serve --config`).")] = (
        "default"
    ),
    name: Annotated[str, typer.Option(help="A name for the job.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Stream the output and exit with the job's exit code.")] = False,
) -> None:
    """Queue a command on a slice of the pool; prints the job id."""
    if not command or not command[0]:
        fail("command=[] is not allowed: give the command to run after --, like `flexai run -- python train.py`")
    for i, part in enumerate(command):
        _utf8_or_fail(part, f"command[{i}]")
    priority_class, priority_value = parse_priority(priority)
    body = {
        "command": command,
        "share_milli": parse_share(share),
        "memory_mib": parse_memory(memory),
        "count": count,
        "model": _utf8_or_fail(model, "--model"),
        "priority": priority_value,
        "priority_class": priority_class,
        "queue": _utf8_or_fail(queue, "--queue"),
        "name": _utf8_or_fail(name, "--name"),
        "cwd": _utf8_or_fail(os.getcwd(), "the working directory"),
        "env": _environment(),
    }
    client = PoolClient(state_dir(state))
    job = client.call("POST", "/api/v1/jobs", json=body)
    if not wait:
        print(job["id"])
        return
    err.print(text(f"flexai: job {job['id']} {job['state']}"), soft_wrap=True)
    final = _follow(client, job["id"])
    code = final.get("exit_code")
    if final["state"] != "succeeded":
        err.print(text(f"flexai: job {job['id']} {final['state']}: {final.get('reason', '')}"), soft_wrap=True)
    raise typer.Exit(code=code if isinstance(code, int) else 1)


def _follow(client: PoolClient, job_id: str, poll_s: float = 0.2) -> dict[str, Any]:
    """Print the job's output as it grows until the job has ended and all of it is out; return the job."""
    sink = _stdout_bytes()
    offset = 0
    while True:
        offset, finished = client.log(job_id, offset, sink)
        if finished:
            return client.call("GET", _path(job_id))
        time.sleep(poll_s)


@app.command()
def ps(state: StateOption = None, as_json: JsonOption = False) -> None:
    """List the pool's jobs."""
    jobs = PoolClient(state_dir(state)).call("GET", "/api/v1/jobs")
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    # The queue column only when some job is in another queue than the default one (a narrower table).
    with_queue = any(j.get("queue", "default") != "default" for j in jobs)
    table = Table()
    for column in ("id", "name", "state", "priority", *(["queue"] if with_queue else []), "request", "slices"):
        table.add_column(column)
    table.add_column("reason")
    for j in jobs:
        slices = ", ".join(f"#{s['device']}" for s in j["slices"] or [])
        shown_state = str(j["state"])
        if j.get("opportunistic") and shown_state == "running":
            shown_state = "paused (opportunistic)" if j.get("paused") else "running (opportunistic)"
        request = f"{j['device_count']} x {j['share_milli'] / 10:g}%" + (
            f", {j['memory_mib']} MiB" if j["memory_mib"] else ""
        )
        shown = j.get("priority_class", "normal") + (f":{j['priority']}" if j["priority"] else "")
        queue = [j.get("queue", "")] if with_queue else []
        table.add_row(*map(text, (j["id"], _job_name(j), shown_state, shown, *queue, request, slices, j["reason"])))
    out.print(table)


def _job_name(job: dict[str, Any]) -> str:
    """The name, and for a remote XPU lease its kind and client: "lease@10.0.0.7 (lease, client 10.0.0.7:51234,
    12 calls)"."""
    if job.get("kind") != "lease":
        return str(job["name"])
    lease = job.get("lease") or {}
    client = lease.get("client") or ""
    calls = lease.get("calls")
    detail = f"client {client}" if client else "no client yet"
    if calls:
        detail += f", {calls} call" + ("s" if calls != 1 else "")
    return f"{job['name']} (lease, {detail})"


def _devices(milli: int | None) -> str:
    if milli is None:
        return "no limit"
    return f"{milli / 1000:g}"


@app.command()
def queues(state: StateOption = None, as_json: JsonOption = False) -> None:
    """Show each queue: its guarantee, borrowing limit, what it uses and borrows, and its pending jobs."""
    rows = PoolClient(state_dir(state)).call("GET", "/api/v1/queues")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=text("queues (devices; * = any model)"))
    for column in ("queue", "weight", "bucket", "guaranteed", "borrowing limit", "in use", "borrowed", "pending"):
        table.add_column(column)
    for q in rows:
        buckets = q["buckets"] or [
            {"bucket": "*", "guarantee_share_milli": 0, "borrowing_limit_share_milli": None, "used_share_milli": 0}
        ]
        for n, b in enumerate(buckets):
            first = n == 0
            memory = f" + {_mib(b['guarantee_memory_mib'])}" if b.get("guarantee_memory_mib") else ""
            table.add_row(
                *map(
                    text,
                    (
                        q["queue"] if first else "",
                        f"{q['weight']:g}" if first else "",
                        b["bucket"],
                        _devices(b["guarantee_share_milli"]) + memory,
                        _devices(b["borrowing_limit_share_milli"]),
                        _devices(b["used_share_milli"]),
                        _devices(q["borrowed_share_milli"]) if first else "",
                        q["pending"] if first else "",
                    ),
                )
            )
    out.print(table)


def _mib(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


@app.command()
def pool(state: StateOption = None, as_json: JsonOption = False) -> None:
    """Show the devices, the slices granted on them and what each slice really uses."""
    view = PoolClient(state_dir(state)).call("GET", "/api/v1/pool")
    if as_json:
        print(json.dumps(view, indent=2))
        return
    preempted = f", {view['preempted']} preempted" if view.get("preempted") else ""
    table = Table(title=text(f"{view['backend']} pool: {view['running']} running, {view['queued']} queued{preempted}"))
    for column in ("device", "model", "busy", "memory used", "slices (share, memory used / quota)", "free"):
        table.add_column(column)
    for d in view["devices"]:
        slices = ", ".join(
            f"{s['name']} ({s['job']}) {s['share_milli'] / 10:g}% {_mib(s.get('used_memory_mib'))}"
            f" / {_mib(s['memory_mib']) if s['memory_mib'] else 'no quota'}"
            + (" opportunistic" if s.get("opportunistic") else "")
            + (" paused" if s.get("paused") else "")
            for s in d["slices"]
        )
        busy = d.get("utilisation_pct")
        table.add_row(
            *map(
                text,
                (
                    d["index"],
                    d["model"],
                    "n/a" if busy is None else f"{busy:.0f}%",
                    f"{_mib(d.get('used_memory_mib'))} / {d['memory_mib'] / 1024:g} GiB",
                    slices or "-",
                    f"{d['free_share_milli'] / 10:g}%",
                ),
            )
        )
    out.print(table)


@app.command()
def events(
    state: StateOption = None,
    as_json: JsonOption = False,
    since: Annotated[
        str | None,
        typer.Option(help="Only events since then: a duration back from now (30s, 10m, 2h, 1d) or an ISO 8601 time."),
    ] = None,
    limit: Annotated[int, typer.Option(help=f"Show the newest N events (1..{MAX_EVENTS}).")] = 100,
) -> None:
    """Show what happened in the pool: the newest events, oldest first."""
    if not 1 <= limit <= MAX_EVENTS:
        fail(f"--limit={limit} is not allowed: 1..{MAX_EVENTS}")
    params: dict[str, Any] = {"limit": limit}
    if since is not None:
        params["since"] = parse_since(since)
    items = PoolClient(state_dir(state)).call("GET", "/api/v1/events", params=params)
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table()
    for column in ("time", "job", "event", "message"):
        table.add_column(column)
    for e in items:
        moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        table.add_row(*map(text, (moment, e["job_id"] or "", e["kind"], e["message"])))
    out.print(table)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id or name.")],
    state: StateOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's whole output (streamed in chunks)."""
    _utf8_or_fail(job_id, "job")
    client = PoolClient(state_dir(state))
    if follow:
        _follow(client, job_id)
        return
    client.log(job_id, 0, _stdout_bytes())


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id or name.")], state: StateOption = None) -> None:
    """Cancel a queued or running job."""
    _utf8_or_fail(job_id, "job")
    job = PoolClient(state_dir(state)).call("POST", _path(job_id, "cancel"))
    out.print(text(f"{job['id']} {job['state']}"))
