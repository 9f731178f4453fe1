"""REST API of the pool daemon (FastAPI; OpenAPI at /openapi.json, docs at /docs) and its web dashboard."""

from __future__ import annotations

import hmac
import threading
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, field_validator

from flexai import __version__
from flexai.local.pool import JobSubmission, Pool, SubmitError


class SubmitBody(BaseModel):
    command: list[str] = Field(min_length=1, description="The command and its arguments.")
    share_milli: int = Field(1000, ge=1, le=1000, description="Compute share per device, 1000 = whole device.")
    memory_mib: int = Field(0, ge=0, description="Device memory per device (MiB); 0 = no quota.")
    count: int = Field(1, ge=1, le=64, description="Number of devices.")
    model: str = Field("", description="Device model the job must run on; empty = any.")
    priority: int = Field(0, description="Higher starts first.")
    name: str = Field("", max_length=200)
    cwd: str = Field("/", description="Working directory of the job.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the job.")

    @field_validator("command")
    @classmethod
    def _no_nul_in_command(cls, value: list[str]) -> list[str]:
        for i, part in enumerate(value):
            if "\x00" in part:
                raise ValueError(f"command[{i}] contains a NUL byte: not allowed in a process argument")
        return value

    @field_validator("env")
    @classmethod
    def _valid_environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or "=" in key or "\x00" in key or "\x00" in item:
                raise ValueError(f"env key {key!r}: names need no '=' and no NUL byte, values no NUL byte")
        return value


class LogChunk(BaseModel):
    text: str
    next_offset: int
    finished: bool
    state: str


def create_app(pool: Pool, lock: threading.RLock, token: str | None = None) -> FastAPI:
    app = FastAPI(title="flexai pool", version=__version__, description="Embedded XPU pool of one machine.")

    def authorise(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    guarded = [Depends(authorise)]

    @app.get("/api/v1/pool", dependencies=guarded)
    def get_pool() -> dict[str, object]:
        with lock:
            return pool.pool_view()

    @app.get("/api/v1/jobs", dependencies=guarded)
    def list_jobs() -> list[dict[str, object]]:
        with lock:
            return [j.public() for j in pool.store.jobs()]

    @app.post("/api/v1/jobs", status_code=201, dependencies=guarded)
    def submit(body: SubmitBody) -> dict[str, object]:
        with lock:
            try:
                job = pool.submit(JobSubmission(**body.model_dump()))
            except SubmitError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
            pool.tick()
            return (pool.store.job(job.id) or job).public()

    @app.get("/api/v1/jobs/{job_id}", dependencies=guarded)
    def get_job(job_id: str) -> dict[str, object]:
        with lock:
            job = pool.store.job(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job {job_id!r} not found")
        return job.public()

    @app.post("/api/v1/jobs/{job_id}/cancel", dependencies=guarded)
    def cancel(job_id: str) -> dict[str, object]:
        with lock:
            try:
                return pool.cancel(job_id).public()
            except KeyError:
                raise HTTPException(status_code=404, detail=f"job {job_id!r} not found") from None

    @app.get("/api/v1/jobs/{job_id}/logs", dependencies=guarded)
    def logs(job_id: str, offset: Annotated[int, Query(ge=0)] = 0) -> LogChunk:
        with lock:
            job = pool.store.job(job_id)
            if job is None:
                raise HTTPException(status_code=404, detail=f"job {job_id!r} not found")
            path = pool.log_path(job.id)
        text = b""
        if path.exists():
            with path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read(1 << 20)
        finished = job.state not in ("queued", "running")
        return LogChunk(
            text=text.decode("utf-8", "replace"), next_offset=offset + len(text), finished=finished, state=job.state
        )

    @app.get("/api/v1/events", dependencies=guarded)
    def events(after: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, object]]:
        with lock:
            return [e.__dict__ for e in pool.store.events(after)]

    @app.get("/api/v1/utilisation", dependencies=guarded)
    def utilisation() -> list[dict[str, object]]:
        with lock:
            return list(pool.utilisation_history)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return (resources.files("flexai.local") / "dashboard.html").read_text()

    return app
