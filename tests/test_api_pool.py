"""The pool's REST API under any input: a bounded, deterministic property-based fuzz of its OpenAPI document
(schemathesis, in-process, no job processes), and the limits one by one."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.config import SchemathesisConfig

from flexai.local.api import MAX_BODY_BYTES, create_app
from flexai.local.pool import Pool
from flexai.local.store import JobRecord
from tests.pool_helpers import no_process_pool

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]
FUZZ_EXAMPLES = 150


def test_no_input_makes_a_server_error_or_breaks_the_schema(tmp_path: Path) -> None:
    """Every operation of the OpenAPI document, with data that fits the schema and data that does not."""
    app = create_app(no_process_pool(tmp_path), threading.RLock())
    # Refusals the API documents: a refused value (400/422), an unknown job (404), a body over 1 MiB (413).
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "413", "422"]}}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[str, int] = {}

    @given(case=cases)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    def call(case) -> None:  # noqa: ANN001
        response = case.call_and_validate(checks=CHECKS)
        key = f"{case.method} {case.path} {response.status_code}"
        seen[key] = seen.get(key, 0) + 1

    call()
    print(sorted(seen.items()))
    assert len({k.rsplit(" ", 1)[0] for k in seen}) >= 7  # every operation was exercised


# ---------------------------------------------------------------------------------------------- one by one
@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return no_process_pool(tmp_path)


@pytest.fixture
def client(pool: Pool) -> TestClient:
    return TestClient(create_app(pool, threading.RLock()))


def finished_job(pool: Pool, state: str = "succeeded") -> JobRecord:
    job = JobRecord(
        id="0123456789ab",
        name="train",
        command=["true"],
        cwd="/",
        env={},
        device_count=1,
        share_milli=1000,
        memory_mib=0,
        model="",
        priority=0,
    )
    pool.store.insert_job(job, "queued")
    pool.store.update_job(job.id, state=state)
    return job


def raw_json(body: object) -> dict[str, object]:
    """Request arguments for a JSON body that may hold what UTF-8 cannot (escaped as JSON allows)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


OUT_OF_BOUNDS = [
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "priority": 2**63}}, "priority"),
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "priority": -(2**80)}}, "priority"),
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "memory_mib": 2**64}}, "memory_mib"),
    ("POST", "/api/v1/jobs", {"json": {"command": []}}, "command"),
    ("POST", "/api/v1/jobs", {"json": {"command": [""]}}, "command[0] is empty"),
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "cwd": "relative/dir"}}, "cwd"),
    ("POST", "/api/v1/jobs", raw_json({"command": ["true"], "name": "bad \ud800"}), '"name"'),  # lone surrogates
    ("POST", "/api/v1/jobs", raw_json({"command": ["true \udcff"]}), '"command",0'),
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "env": {f"V{i}": "" for i in range(4097)}}}, "env"),
    (
        "POST",
        "/api/v1/jobs",
        {
            "json": {
                "command": ["true"],
                "env": {
                    "A": "x" * 100_000,
                    "B": "y" * 100_000,
                    "C": "z" * 100_000,
                    "D": "w" * 100_000,
                    "E": "v" * 100_000,
                    "F": "u" * 100_000,
                },
            }
        },
        "at most 524288",
    ),
    ("POST", "/api/v1/jobs", {"json": {"command": ["true"], "name": "n" * 201}}, "name"),
    ("GET", "/api/v1/events", {"params": {"after": 2**63}}, "after"),
    ("GET", "/api/v1/events", {"params": {"since": "nan"}}, "since"),
    ("GET", "/api/v1/events", {"params": {"limit": 0}}, "limit"),
    ("GET", "/api/v1/events", {"params": {"limit": 10_001}}, "limit"),
    ("GET", "/api/v1/jobs/0123456789ab/logs", {"params": {"offset": 2**63}}, "offset"),
    ("GET", "/api/v1/jobs/" + "j" * 201, {}, "job_id"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "field"), OUT_OF_BOUNDS)
def test_out_of_bounds_input_is_refused_naming_the_field(
    client: TestClient, pool: Pool, method: str, path: str, kwargs: dict, field: str
) -> None:
    finished_job(pool)
    answer = client.request(method, path, **kwargs)
    assert answer.status_code == 422, answer.text[:300]
    assert field in answer.text
    assert pool.store.job_count() == 1  # nothing half-accepted


def test_a_huge_log_offset_is_an_empty_read_not_an_error(client: TestClient, pool: Pool) -> None:
    job = finished_job(pool)
    pool.log_path(job.id).write_bytes(b"hello\n")
    answer = client.get(f"/api/v1/jobs/{job.id}/logs", params={"offset": 2**62})
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["x-flexai-finished"] == "true"


def test_a_body_over_1_mib_is_refused_with_413(client: TestClient, pool: Pool) -> None:
    big = {"command": ["true"], "name": "x", "env": {"PAD": "p" * MAX_BODY_BYTES}}
    answer = client.post("/api/v1/jobs", json=big)
    assert answer.status_code == 413 and "1 MiB" in answer.json()["detail"]

    def chunked():  # noqa: ANN202  (no Content-Length: the limit holds while reading)
        yield b'{"command": ["true"], "name": "'
        for _ in range(40):
            yield b"n" * 32_768
        yield b'"}'

    answer = client.post("/api/v1/jobs", content=chunked(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert pool.store.job_count() == 0


def test_the_whole_log_comes_back_in_chunks(client: TestClient, pool: Pool) -> None:
    job = finished_job(pool)
    lines = b"".join(b"line %07d of a long training log\n" % n for n in range(110_000))
    assert len(lines) > 3 * 1024 * 1024
    pool.log_path(job.id).write_bytes(lines)
    with client.stream("GET", f"/api/v1/jobs/{job.id}/logs") as answer:
        chunks = list(answer.iter_raw())
        assert answer.headers["x-flexai-finished"] == "true"
        assert answer.headers["x-flexai-next-offset"] == str(len(lines))
    assert b"".join(chunks) == lines
    middle = client.get(f"/api/v1/jobs/{job.id}/logs", params={"offset": 2_000_000})
    assert middle.content == lines[2_000_000:]


def test_events_are_the_newest_by_default(client: TestClient, pool: Pool) -> None:
    with pool.store.tx() as db:  # one transaction: 1,500 fsyncs would take seconds
        for n in range(1500):
            pool.store._event(db, None, "note", f"event {n}")
    newest = client.get("/api/v1/events").json()
    assert len(newest) == 1000 and newest[-1]["message"] == "event 1499" and newest[0]["message"] == "event 500"
    assert [e["message"] for e in client.get("/api/v1/events", params={"limit": 3}).json()] == [
        "event 1497",
        "event 1498",
        "event 1499",
    ]
    first = newest[0]["id"]
    page = client.get("/api/v1/events", params={"after": first, "limit": 2}).json()  # paging forward
    assert [e["id"] for e in page] == [first + 1, first + 2]
    assert client.get("/api/v1/events", params={"since": time.time() + 60}).json() == []


def test_no_interactive_docs_with_third_party_script(client: TestClient) -> None:
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 200
