"""`flexai serve --config FILE`: queues, quotas and preemption settings in TOML; every bad key refused in one line
naming the key, the value and what is allowed (exit 2). And the client side of priority classes and queues:
`flexai run --priority/--queue`, `flexai ps`, `flexai queues`."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import flexai.cli.pool_cmds as pool_cmds
from flexai.cli.main import app
from flexai.hi import HiConfig, QueueSpec, Quota
from flexai.local.api import create_app
from flexai.local.config import ConfigError, PoolSettings, parse_config
from flexai.local.pool import Pool, PoolConfig
from flexai.node.devices import discover
from tests.pool_helpers import NoProcessPool

GOOD = """
[hi]
normal_min_runtime_s = 0
preempt_backoff_s = 60
preemption_grace_s = 3
preemption = "k8s-default"
reservation = false

[queues.a]
weight = 2
guarantee = { devices = 1 }
borrowing_limit = { share = "50%" }

[queues.b.guarantee]
share = "150%"
memory = "80GiB"

[queues.b.guarantee.models]
A100 = { devices = 1, memory = 81920 }

[queues.c]
"""


def test_a_good_file() -> None:
    settings = parse_config(GOOD)
    assert settings == PoolSettings(
        hi=HiConfig(normal_min_runtime_s=0, preempt_backoff_s=60, preemption="k8s-default", reservation=False),
        queues=(
            QueueSpec("a", Quota(share_milli={"*": 1000}), Quota(share_milli={"*": 500}), weight=2),
            QueueSpec(
                "b",
                Quota(share_milli={"*": 1500, "A100": 1000}, memory_mib={"*": 81920, "A100": 81920}),
            ),
            QueueSpec("c"),
        ),
        preemption_grace_s=3,
    )
    assert settings.models_named() == {"A100": "queues.b.guarantee.models.A100"}
    assert parse_config("") == PoolSettings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hi]\nnormal_min_runtime_s = -1", "hi.normal_min_runtime_s=-1 is not allowed: seconds in 0..1e9"),
        (
            "[hi]\npreemption_grace_s = 'soon'",
            "hi.preemption_grace_s='soon' is not allowed: input should be a valid number",
        ),
        ("[hi]\npreemption = 'magic'", "hi.preemption='magic' is not allowed: fraction-aware, k8s-default or none"),
        (
            "[hi]\nstarvation_limit_s = 30",
            "hi.starvation_limit_s is not allowed: an unknown key; hi takes normal_min_runtime_s, preempt_backoff_s, "
            "preemption_delay_s, preemption_grace_s, preemption, reservation",
        ),
        ("[queue.a]\nweight = 1", "queue is not allowed: an unknown key; (top level) takes hi, queues"),
        ("[queues.a]\nweight = 0", "queues.a.weight=0 is not allowed: a number > 0 and <= 1000000"),
        ("[queues.a]\nwieght = 1", "queues.a.wieght is not allowed: an unknown key; queues.a takes weight, guarantee"),
        ("[queues.'a b']", "queues.'a b' is not allowed: a queue name of 1..63 letters, digits"),
        ("[queues.a]\nguarantee = 1", "queues.a.guarantee=1 is not allowed: a table of keys"),
        (
            "[queues.a]\nguarantee = { devices = -1 }",
            "queues.a.guarantee.devices=-1 is not allowed: a number of devices",
        ),
        ("[queues.a]\nguarantee = { gpus = 1 }", "queues.a.guarantee.gpus is not allowed: an unknown key; "),
        (
            "[queues.a]\nguarantee = { share = '1.5' }",
            "queues.a.guarantee.share='1.5' is not allowed: a share of devices",
        ),
        (
            "[queues.a]\nguarantee = { devices = 1, share = '100%' }",
            "queues.a.guarantee is not allowed: give devices or",
        ),
        ("[queues.a]\nguarantee = { memory = '80 parsecs' }", "queues.a.guarantee.memory='80 parsecs' is not allowed"),
        (
            "[queues.a]\nborrowing_limit = { models = { A100 = { devices = 0.0001 } } }",
            "queues.a.borrowing_limit.models.A100.devices=0.0001 is not allowed: a number of devices in steps of 0.001",
        ),
        ("[queues.a\nweight = 1", "not valid TOML: "),
    ],
)
def test_each_bad_key_is_named_with_its_value_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def serve(*args: str):  # noqa: ANN201
    """`flexai serve` in this process, for refusals only (it makes its umask private: restored after)."""
    umask = os.umask(0o077)
    try:
        return CliRunner().invoke(app, ["serve", *args], catch_exceptions=False)
    finally:
        os.umask(umask)


def test_serve_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "pool.toml"
    bad.write_text("[queues.a]\nweight = -2\n")
    result = serve("--devices", "sim:1xA100-80GB", "--state", str(tmp_path / "state"), "--config", str(bad))
    assert result.exit_code == 2 and result.stdout == ""
    assert (
        result.stderr.strip()
        == f"error: --config={str(bad)!r}: queues.a.weight=-2 is not allowed: a number > 0 and <= 1000000"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was made
    missing = serve("--config", str(tmp_path / "nope.toml"), "--state", str(tmp_path / "state"))
    assert missing.exit_code == 2 and "cannot be read: No such file or directory" in missing.stderr


def test_serve_refuses_a_quota_for_a_model_the_pool_does_not_have(tmp_path: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text("[queues.a.guarantee.models]\nH100 = { devices = 1 }\n")
    result = serve("--devices", "sim:1xA100-80GB", "--state", str(tmp_path / "state"), "--config", str(config))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "queues.a.guarantee.models.H100 is not allowed: this pool has A100" in result.stderr


# ---------------------------------------------------------------------------------------------- the client side
@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    backend, devices = discover("sim:2xA100-80GB")
    queues = (QueueSpec("a", Quota(share_milli={"*": 1000}), Quota(share_milli={"*": 500})),)
    return NoProcessPool(tmp_path / "state", backend, devices, PoolConfig(queues=queues))


@pytest.fixture
def connect(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    client = TestClient(create_app(pool, threading.RLock()), raise_server_exceptions=False)

    def init(self: pool_cmds.PoolClient, state: Path) -> None:
        self.where = "http://testserver"
        self.http = client

    monkeypatch.setattr(pool_cmds.PoolClient, "__init__", init)
    return client


def flexai(*args: str):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("high", ("high", 0)),
        ("LOW", ("low", 0)),
        ("7", ("normal", 7)),
        ("-3", ("normal", -3)),
        ("high:5", ("high", 5)),
        ("low:-2", ("low", -2)),
    ],
)
def test_priority_takes_a_class_an_integer_or_both(given: str, expected: tuple[str, int]) -> None:
    assert pool_cmds.parse_priority(given) == expected


@pytest.mark.parametrize("given", ["urgent", "high:", "high:x", "5:high", "", "１"])
def test_a_bad_priority_is_refused_in_one_line(connect: TestClient, pool: Pool, given: str) -> None:
    result = flexai("run", "--priority", given, "--", "true")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: --priority={given!r} is not allowed: high, normal, low, an integer")
    assert pool.store.job_count() == 0


def test_run_records_class_and_queue_and_ps_shows_them(connect: TestClient, pool: Pool) -> None:
    result = flexai("run", "--priority", "high:5", "--queue", "a", "--share", "30%", "--", "true")
    assert result.exit_code == 0, result.stderr
    job = pool.store.job(result.stdout.strip())
    assert job is not None and (job.priority_class, job.priority, job.queue) == ("high", 5, "a")
    default = pool.store.job(flexai("run", "--", "true").stdout.strip())
    assert default is not None and (default.priority_class, default.priority, default.queue) == ("normal", 0, "default")
    listed = json.loads(flexai("ps", "--json").stdout)
    assert [(j["priority_class"], j["queue"], j["state"]) for j in listed] == [
        ("high", "a", "succeeded"),
        ("normal", "default", "succeeded"),
    ]
    table = flexai("ps").stdout
    assert "high:5" in table and "queue" in table
    refused = flexai("run", "--queue", "nope", "--", "true")
    assert refused.exit_code == 2 and "queue='nope' is not allowed: a, default" in refused.stderr


def test_queues_shows_guarantee_use_borrowing_and_pending(connect: TestClient, pool: Pool) -> None:
    rows = json.loads(flexai("queues", "--json").stdout)
    assert [r["queue"] for r in rows] == ["a", "default"]
    a = rows[0]
    assert a["buckets"] == [
        {
            "bucket": "*",
            "guarantee_share_milli": 1000,
            "borrowing_limit_share_milli": 500,
            "used_share_milli": 0,
            "guarantee_memory_mib": 0,
            "used_memory_mib": 0,
        }
    ]
    assert (a["used_share_milli"], a["borrowed_share_milli"], a["pending"]) == (0, 0, 0)
    table = flexai("queues").stdout
    for cell in ("queue", "guaranteed", "borrowing limit", "no limit", "0.5"):
        assert cell in table, table
    assert connect.get("/api/v1/queues").json() == rows


def test_the_readme_example_is_a_good_file() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## One machine: the embedded pool") :]
    example = section[section.index("```toml") + len("```toml") : section.index("```", section.index("```toml") + 7)]
    settings = parse_config("\n".join(line.removeprefix("  ") for line in example.splitlines()))
    assert [q.name for q in settings.queues] == ["a", "b"]
    assert settings.queues[1].guarantee == Quota(share_milli={"A100": 1000}, memory_mib={"A100": 81920})
