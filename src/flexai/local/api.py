"""REST API of the pool daemon (FastAPI; OpenAPI at /openapi.json) and its web dashboard.

Every input is bounded (see the ``MAX_*`` limits below): a request outside them gets a 4xx answer naming the
field, never a server error. Bodies over ``MAX_BODY_BYTES`` are refused with 413. Every response carries a
Content-Security-Policy that allows scripts from this origin's own files only (the dashboard has no inline
script), so data shown on the dashboard (job names, commands, reasons) can never run as script.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexai import __version__
from flexai.local.config import QUEUE_NAME
from flexai.local.lease import LeaseManager
from flexai.local.pool import DEFAULT_QUEUE, JobSubmission, Pool, SubmitError
from flexai.local.store import ACTIVE_STATES, JobRecord

MAX_BODY_BYTES = 1 << 20
"""A request body larger than this (1 MiB) is refused with 413."""
MAX_INT64 = (1 << 63) - 1
MAX_COMMAND_ARGS = 4096
MAX_ARG_CHARS = 131_072
"""Linux refuses a single argument or environment string longer than this (MAX_ARG_STRLEN)."""
MAX_ENV_VARS = 4096
MAX_ENV_CHARS = 512 * 1024
"""Sum over the environment of len(NAME) + len(VALUE) + 2."""
MAX_PRIORITY = 1_000_000
MAX_MEMORY_MIB = 1 << 31
MAX_NAME_CHARS = 200
MAX_PATH_CHARS = 4096
MAX_EVENTS = 10_000
MAX_SINCE_TS = 1e11
LOG_CHUNK_BYTES = 64 * 1024

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def _utf8(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid UTF-8 (a lone surrogate)") from None
    return value


EnvText = Annotated[str, Field(max_length=MAX_ARG_CHARS)]


class SubmitBody(BaseModel):
    command: list[Annotated[str, Field(max_length=MAX_ARG_CHARS)]] = Field(
        min_length=1, max_length=MAX_COMMAND_ARGS, description="The command and its arguments."
    )
    share_milli: int = Field(1000, ge=1, le=1000, description="Compute share per device, 1000 = whole device.")
    memory_mib: int = Field(0, ge=0, le=MAX_MEMORY_MIB, description="Device memory per device (MiB); 0 = no quota.")
    count: int = Field(1, ge=1, le=64, description="Number of devices.")
    model: str = Field("", max_length=MAX_NAME_CHARS, description="Device model the job must run on; empty = any.")
    priority: int = Field(
        0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Orders jobs inside their priority class: higher first."
    )
    priority_class: Literal["high", "normal", "low"] = Field(
        "normal",
        description="high: never preempted; normal: preemptible after a minimum runtime; low: preemptible any time.",
    )
    queue: str = Field(
        DEFAULT_QUEUE,
        pattern=f"^{QUEUE_NAME.pattern}$",
        description="The queue (tenant line) it waits in; `default`, or one named in the daemon's --config.",
    )
    name: str = Field("", max_length=MAX_NAME_CHARS)
    cwd: str = Field("/", min_length=1, max_length=MAX_PATH_CHARS, description="Working directory (absolute).")
    env: dict[EnvText, EnvText] = Field(
        default_factory=dict,
        max_length=MAX_ENV_VARS,
        description=f"Environment of the job: at most {MAX_ENV_VARS} variables, {MAX_ENV_CHARS} characters.",
    )

    @field_validator("command")
    @classmethod
    def _valid_command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("command[0] is empty: give the program to run")
        for i, part in enumerate(value):
            if "\x00" in part:
                raise ValueError(f"command[{i}] contains a NUL byte: not allowed in a process argument")
            _utf8(part, f"command[{i}]")
        return value

    @field_validator("name", "model")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return _utf8(value, "the text")

    @field_validator("cwd")
    @classmethod
    def _valid_cwd(cls, value: str) -> str:
        _utf8(value, "cwd")
        if "\x00" in value or not value.startswith("/"):
            raise ValueError(f"cwd={value[:100]!r} is not allowed: an absolute path without NUL bytes")
        return value

    @field_validator("env")
    @classmethod
    def _valid_environment(cls, value: dict[str, str]) -> dict[str, str]:
        total = 0
        for key, item in value.items():
            _utf8(key, "an env name")
            _utf8(item, f"env {key!r}")
            if not key or "=" in key or "\x00" in key or "\x00" in item:
                raise ValueError(f"env key {key!r}: names need no '=' and no NUL byte, values no NUL byte")
            if len(key) + len(item) + 1 > MAX_ARG_CHARS:
                raise ValueError(f"env key {key!r}: NAME=VALUE is over {MAX_ARG_CHARS} characters")
            total += len(key) + len(item) + 2
        if total > MAX_ENV_CHARS:
            raise ValueError(f"env holds {total} characters: at most {MAX_ENV_CHARS} are allowed")
        return value


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share_milli: int = Field(100, ge=1, le=1000, description="Compute share of one device (1000 = whole device).")
    memory_mib: int = Field(0, ge=0, le=MAX_MEMORY_MIB, description="Device-memory quota (MiB); 0 = no quota.")
    name: str = Field("", max_length=MAX_NAME_CHARS, description="Name of the lease's job; empty = lease@CLIENT.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _utf8(value, "name")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Problem(BaseModel):
    detail: str


class SliceGrant(_Open):
    device: int
    uuid: str
    model: str
    share_milli: int
    memory_mib: int


class JobView(_Open):
    id: str
    name: str
    command: list[str]
    cwd: str
    device_count: int
    share_milli: int
    memory_mib: int
    model: str
    priority: int
    priority_class: str
    queue: str
    opportunistic: bool = Field(
        False, description="Runs (or ran) as a time-sharing guest on idle share granted to others."
    )
    paused: bool = Field(False, description="A guest paused (SIGSTOP) while its device's owners are busy.")
    state: str = Field(description="queued, running, preempted, succeeded, failed, cancelled, stopped or lost.")
    reason: str = Field(description="Why it is in its state now (for waiting work: what it waits for).")
    exit_code: int | None
    pid: int | None
    slices: list[SliceGrant] | None
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    seq: int


class SliceUse(_Open):
    job: str
    name: str
    share_milli: int
    memory_mib: int = Field(description="Device-memory quota (MiB), 0 = none.")
    used_memory_mib: int | None = Field(description="Device memory the job's processes use now; null = unknown.")
    paused: bool = Field(description="Paused by the time-slicer (or, for a guest, by time-sharing) at this moment.")
    opportunistic: bool = Field(False, description="A time-sharing guest on share granted to others.")


class DeviceView(_Open):
    index: int
    uuid: str
    model: str
    memory_mib: int
    free_share_milli: int
    free_memory_mib: int
    utilisation_pct: float | None = Field(description="How busy the device is (0-100); null = cannot tell.")
    used_memory_mib: int | None = Field(description="Device memory in use by anyone; null = cannot tell.")
    slices: list[SliceUse]


class PoolView(_Open):
    backend: str
    share_step_milli: int
    lending: bool
    devices: list[DeviceView]
    running: int
    queued: int
    preempted: int = Field(0, description="Jobs stopped to seat higher-class work, waiting to start again.")


class QuotaBucket(_Open):
    bucket: str = Field(description="A device model, or * for any model the queue names no bucket for.")
    guarantee_share_milli: int
    borrowing_limit_share_milli: int | None = Field(description="Beyond the guarantee; null = no limit.")
    used_share_milli: int
    guarantee_memory_mib: int
    used_memory_mib: int


class QueueView(_Open):
    queue: str
    weight: float
    buckets: list[QuotaBucket]
    used_share_milli: int
    borrowed_share_milli: int = Field(description="Share in use beyond the guarantee (borrowed from idle capacity).")
    used_cpu_milli: int
    pending: int = Field(description="Jobs waiting in this queue (queued or preempted).")


class LeaseView(_Open):
    id: str
    job: str
    state: str = Field(description="queued, starting, ready or ended.")
    reason: str
    epoch: int
    share_milli: int
    memory_mib: int
    unix: str = Field(description="The worker's unix socket, for a client on the pool's machine.")
    tcp_port: int | None = Field(description="The pool's --remote-listen port (TLS); null = local clients only.")
    client: str
    calls: int
    bytes_in: int
    bytes_out: int
    idle_s: float | None
    token: str | None = Field(None, description="Only in the answer that issues it (create, new token).")


class EventView(_Open):
    id: int
    ts: float
    job_id: str | None
    kind: str
    message: str


class UtilisationPoint(_Open):
    ts: float
    allocated_share_milli: dict[str, int]
    utilisation_pct: dict[str, float | None] = Field(default_factory=dict)


JobRef = Annotated[str, Path(min_length=1, max_length=MAX_NAME_CHARS, description="Job id or name.")]
LeaseRef = Annotated[str, Path(min_length=1, max_length=MAX_NAME_CHARS, description="Lease id.")]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "Refused: the message names the field, the value and what is allowed.",
        401: "Missing or wrong bearer token.",
        404: "No such job or lease.",
        413: f"Body over {MAX_BODY_BYTES} bytes.",
    }
    return {code: {"model": Problem, "description": meaning[code]} for code in codes}


class GuardMiddleware:
    """Security headers on every response, and bodies over ``MAX_BODY_BYTES`` refused with 413 before any
    handler reads them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            await self._too_large(scope, receive, send_guarded)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await self._too_large(scope, receive, send_guarded)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_guarded)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over {MAX_BODY_BYTES} bytes (1 MiB): not allowed"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _printable(value: object) -> object:
    """``value`` with every string made encodable: a lone surrogate (which UTF-8 cannot carry) becomes the
    text of its escape, so that echoing bad input back can never fail."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}  # type: ignore[misc]
    return value


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [{"msg": str(exc)}]
    return JSONResponse({"detail": _printable(jsonable_encoder(errors))}, status_code=422)


def create_app(
    pool: Pool, lock: threading.RLock, token: str | None = None, leases: LeaseManager | None = None
) -> FastAPI:
    app = FastAPI(
        title="flexai pool",
        version=__version__,
        description="Embedded XPU pool of one machine.",
        docs_url=None,  # the interactive docs load third-party script; the dashboard's policy forbids that
        redoc_url=None,
    )
    app.add_middleware(GuardMiddleware)
    app.add_exception_handler(RequestValidationError, _refused)

    def authorise(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    guarded = [Depends(authorise)]
    auth = (401,) if token is not None else ()

    def find(ref: str) -> JobRecord:
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(status_code=404, detail=f"job {ref!r} not found") from None
        with lock:
            job = pool.store.job(ref)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job {ref!r} not found")
        return job

    def job_view(job: JobRecord) -> JobView:
        view = pool.job_view(job)
        if leases is not None:
            view = {**view, **leases.job_extra(job.id)}
        return JobView.model_validate(view)

    @app.get("/api/v1/pool", dependencies=guarded, responses=_errors(*auth))
    def get_pool() -> PoolView:
        with lock:
            return PoolView.model_validate(pool.pool_view())

    @app.get("/api/v1/jobs", dependencies=guarded, responses=_errors(*auth))
    def list_jobs() -> list[JobView]:
        with lock:
            return [job_view(j) for j in pool.store.jobs()]

    @app.post("/api/v1/jobs", status_code=201, dependencies=guarded, responses=_errors(400, 413, *auth))
    def submit(body: SubmitBody) -> JobView:
        with lock:
            try:
                job = pool.submit(JobSubmission(**body.model_dump()))
            except SubmitError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
            pool.tick()
            return job_view(pool.store.job(job.id) or job)

    @app.get("/api/v1/jobs/{job_id}", dependencies=guarded, responses=_errors(404, *auth))
    def get_job(job_id: JobRef) -> JobView:
        job = find(job_id)
        with lock:
            return job_view(job)

    @app.post("/api/v1/jobs/{job_id}/cancel", dependencies=guarded, responses=_errors(404, 413, *auth))
    def cancel(job_id: JobRef) -> JobView:
        job = find(job_id)
        with lock:
            return job_view(pool.cancel(job.id))

    if leases is not None:  # remote XPU leases (flexai.local.lease)
        def lease_manager() -> LeaseManager:
            assert leases is not None
            return leases

        def lease_id(ref: str) -> str:
            manager = lease_manager()
            if ref not in manager.leases and ref not in manager._ended:
                raise HTTPException(status_code=404, detail=f"lease {ref[:40]!r} not found")
            return ref

        @app.post("/api/v1/leases", status_code=201, dependencies=guarded, responses=_errors(400, 413, *auth))
        def create_lease(body: LeaseBody, request: Request) -> LeaseView:
            """Lease a slice for a remote XPU client: a worker is started in it as a job of kind ``lease``."""
            manager = lease_manager()
            client = f"{request.client.host}:{request.client.port}" if request.client and request.client.host else ""
            with lock:
                try:
                    view = manager.create(body.share_milli, body.memory_mib, body.name, client)
                except SubmitError as exc:
                    raise HTTPException(status_code=400, detail=str(exc)) from None
                pool.tick()
                return LeaseView.model_validate(view)

        @app.get("/api/v1/leases", dependencies=guarded, responses=_errors(*auth))
        def list_leases() -> list[LeaseView]:
            manager = lease_manager()
            with lock:
                return [LeaseView.model_validate(manager.view(i)) for i in list(manager.leases)]

        @app.get("/api/v1/leases/{lease}", dependencies=guarded, responses=_errors(404, *auth))
        def get_lease(lease: LeaseRef) -> LeaseView:
            with lock:
                return LeaseView.model_validate(lease_manager().view(lease_id(lease)))

        @app.delete("/api/v1/leases/{lease}", dependencies=guarded, responses=_errors(404, *auth))
        def end_lease(lease: LeaseRef) -> LeaseView:
            with lock:
                manager = lease_manager()
                ref = lease_id(lease)
                return LeaseView.model_validate(manager.end(ref) if ref in manager.leases else manager.view(ref))

        @app.post("/api/v1/leases/{lease}/token", dependencies=guarded, responses=_errors(404, *auth))
        def new_lease_token(lease: LeaseRef) -> LeaseView:
            """A new token with the next epoch; every earlier token of the lease is refused from now on."""
            with lock:
                manager = lease_manager()
                ref = lease_id(lease)
                if ref not in manager.leases:
                    raise HTTPException(status_code=404, detail=f"lease {ref!r} has ended")
                return LeaseView.model_validate(manager.new_token(ref))

    @app.get("/api/v1/queues", dependencies=guarded, responses=_errors(*auth))
    def queues() -> list[QueueView]:
        with lock:
            return [QueueView.model_validate(q) for q in pool.queue_view()]

    @app.get(
        "/api/v1/jobs/{job_id}/logs",
        dependencies=guarded,
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "The job's output from `offset` to its end now, streamed in chunks. "
                "`X-Flexai-Finished: true` when the job had ended before the read (the output is complete); "
                "`X-Flexai-Next-Offset` is the offset to ask for next.",
            },
            **_errors(404, *auth),
        },
    )
    def logs(
        job_id: JobRef,
        offset: Annotated[int, Query(ge=0, le=MAX_INT64, description="Byte offset to start from.")] = 0,
    ) -> StreamingResponse:
        job = find(job_id)
        finished = job.state not in ACTIVE_STATES
        path = pool.log_path(job.id)
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        start = min(offset, size)

        def chunks() -> Iterator[bytes]:
            if start >= size:
                return
            with path.open("rb") as fh:
                fh.seek(start)
                left = size - start
                while left > 0:
                    data = fh.read(min(LOG_CHUNK_BYTES, left))
                    if not data:
                        return
                    left -= len(data)
                    yield data

        headers = {
            "X-Flexai-Job-State": job.state,
            "X-Flexai-Finished": "true" if finished else "false",
            "X-Flexai-Next-Offset": str(max(size, offset)),
        }
        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers=headers)

    @app.get("/api/v1/events", dependencies=guarded, responses=_errors(*auth))
    def events(
        after: Annotated[
            int | None, Query(ge=0, le=MAX_INT64, description="Only events after this id, oldest first.")
        ] = None,
        since: Annotated[
            float | None,
            Query(ge=0, le=MAX_SINCE_TS, allow_inf_nan=False, description="Only events at or after (epoch s)."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS, description="At most this many (the newest).")] = 1000,
    ) -> list[EventView]:
        with lock:
            return [EventView.model_validate(e.__dict__) for e in pool.store.events(after, limit, since)]

    @app.get("/api/v1/utilisation", dependencies=guarded, responses=_errors(*auth))
    def utilisation() -> list[UtilisationPoint]:
        with lock:
            return [UtilisationPoint.model_validate(p) for p in pool.utilisation_history]

    def asset(name: str) -> str:
        return (resources.files("flexai.local") / name).read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return asset("dashboard.html")

    @app.get("/dashboard.js", include_in_schema=False)
    def dashboard_script() -> Response:
        return Response(asset("dashboard.js"), media_type="text/javascript; charset=utf-8")

    @app.get("/dashboard.css", include_in_schema=False)
    def dashboard_style() -> Response:
        return Response(asset("dashboard.css"), media_type="text/css; charset=utf-8")

    return app
