"""The Hi Scheduler: scenario tables for preemption, queues, gangs and backfill; property tests for invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flexai.hi import HiConfig, HiError, HiScheduler, PriorityClass, QueueSpec, Quota, WorkItem
from flexai.model import ClusterState, Node, Request
from flexai.model.workload import WorkloadProfile
from flexai.scheduler import PolicyContext, Scheduler, create_policy

HIGH, NORMAL, LOW = PriorityClass.HIGH, PriorityClass.NORMAL, PriorityClass.LOW
GRID = WorkloadProfile.from_requests(
    [Request(device_count=1, share_milli=s) for s in range(100, 1001, 100)]
    + [Request(device_count=k, share_milli=1000) for k in (2, 4)],
    coverage=1.0,
)


def make(nodes: list[tuple[str, int]], config: HiConfig | None = None, queues=(), policy: str = "flex") -> HiScheduler:
    cluster = [Node(name, 64_000, 256_000, count, "A100", 81_920) for name, count in nodes]
    engine = Scheduler(ClusterState(cluster), create_policy(policy, PolicyContext(profile=GRID)))
    return HiScheduler(engine, config or HiConfig(), queues)


def item(
    name: str,
    share: int = 1000,
    cls: PriorityClass = LOW,
    t: float = 0.0,
    count: int = 1,
    queue: str = "default",
    gang: str = "",
    gang_size: int = 1,
    memory: int = 0,
    min_runtime: float | None = None,
) -> WorkItem:
    request = Request(device_count=count, share_milli=share, device_memory_mib=memory)
    return WorkItem(
        name,
        request,
        cls,
        queue=queue,
        gang=gang,
        gang_size=gang_size,
        submit_time_s=t,
        name=name,
        min_runtime_s=min_runtime,
    )


def run(hi: HiScheduler, now: float, *items: WorkItem):
    for it in items:
        hi.submit(it, now)
    result = hi.cycle(now)
    for p in result.preemptions:
        hi.requeue(p.victim.id, now)
    return result


def started(result) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {s.item.id: (s.placement.node_index, s.placement.device_indices) for s in result.starts}


# --------------------------------------------------------------------------------- preemption choice (scenarios)
PREEMPTION_SCENARIOS = [
    # (what, devices on the node, running (name, share, class, start time), preemptor (share, class, count),
    #  expected victims)
    ("a high slice frees the one low job in its way", 1, [("l0", 1000, LOW, 0)], (600, HIGH, 1), {"l0"}),
    (
        "one victim whose slice is enough beats a whole-device victim (least share freed beyond the need)",
        2,
        [("whole", 1000, LOW, 0), ("seventy", 700, LOW, 0), ("thirty", 300, LOW, 0)],
        (600, HIGH, 1),
        {"seventy"},
    ),
    (
        "fewest victims first: one 60 % slice rather than two 30 % slices",
        2,
        [("a30", 300, LOW, 0), ("b30", 300, LOW, 0), ("c40", 400, LOW, 0), ("d60", 600, LOW, 0)],
        (600, HIGH, 1),
        {"d60"},
    ),
    (
        "same count: least lost work (the job that started last)",
        2,
        [("old", 1000, LOW, 0), ("new", 1000, LOW, 500)],
        (1000, HIGH, 1),
        {"new"},
    ),
    (
        "whole devices: empty the two devices that hold the fewest jobs",
        3,
        [("g0a", 300, LOW, 0), ("g0b", 300, LOW, 0), ("g0c", 300, LOW, 0), ("g1", 1000, LOW, 0), ("g2", 500, LOW, 0)],
        (1000, HIGH, 2),
        {"g1", "g2"},
    ),
    ("a normal job may preempt low work", 1, [("l0", 1000, LOW, 0)], (500, NORMAL, 1), {"l0"}),
    ("equal class is never a victim", 1, [("l0", 1000, NORMAL, 0)], (500, NORMAL, 1), set()),
    ("high is never a victim", 1, [("h0", 1000, HIGH, 0)], (500, HIGH, 1), set()),
    ("normal is protected for its minimum runtime", 1, [("n0", 1000, NORMAL, 900)], (500, HIGH, 1), set()),
    ("normal past its minimum runtime may be preempted", 1, [("n0", 1000, NORMAL, 0)], (500, HIGH, 1), {"n0"}),
]


@pytest.mark.parametrize(
    "what,devices,running,preemptor,victims", PREEMPTION_SCENARIOS, ids=[s[0] for s in PREEMPTION_SCENARIOS]
)
def test_preemption_choice(what, devices, running, preemptor, victims) -> None:
    hi = make([("n0", devices)], HiConfig(normal_min_runtime_s=600, preemption_delay_s=0))
    for name, share, cls, start in sorted(running, key=lambda r: r[3]):
        result = run(hi, start, item(name, share, cls, t=start))
        assert name in started(result), f"setup: {name} did not start: {hi.reason(name)}"
    share, cls, count = preemptor
    result = run(hi, 1000, item("p", share, cls, t=1000, count=count))
    assert {p.victim.id for p in result.preemptions} == victims
    if victims:
        assert "p" in started(result)
        start = next(s for s in result.starts if s.item.id == "p")
        assert set(start.after) == victims
        for p in result.preemptions:
            assert p.reason.startswith("preempted by p to free ")
    else:
        assert "p" not in started(result)
        assert hi.reason("p")


def test_preemption_reason_names_preemptor_share_and_device() -> None:
    hi = make([("n0", 2)])
    run(hi, 0, item("big", 1000), item("small", 300))
    result = run(hi, 10, item("job-x", 300, HIGH, t=10), item("job-y", 1000, HIGH, t=10))
    reasons = sorted(p.reason for p in result.preemptions)
    assert any("preempted by job-" in r and "% of GPU" in r and "on n0" in r for r in reasons), reasons


def test_hole_is_reserved_for_the_preemptor() -> None:
    hi = make([("n0", 1)])
    run(hi, 0, item("low", 1000))
    result = run(hi, 10, item("high", 600, HIGH, t=10), item("other-low", 400, LOW, t=5))
    assert "high" in started(result)
    grants = hi.state.grants
    assert "high" in grants and "low" not in grants
    # The victim went back to its queue and waits; nothing took the hole from under the preemptor.
    assert "low" in hi.pending


def test_no_ping_pong_back_off_and_lineage() -> None:
    hi = make([("n0", 1)], HiConfig(preempt_backoff_s=1000, preemption_delay_s=0))
    run(hi, 0, item("low", 1000))
    run(hi, 10, item("normal", 1000, NORMAL, t=10, min_runtime=0))
    assert "normal" in hi.running and "low" in hi.pending
    hi.release("normal")
    result = run(hi, 20)
    assert "low" in started(result)  # restarted
    # A fresh high arrival may not preempt it again within the back-off…
    result = run(hi, 30, item("high", 1000, HIGH, t=30))
    assert not result.preemptions
    # …and may after it.
    result = run(hi, 1100)
    assert {p.victim.id for p in result.preemptions} == {"low"}
    assert hi.preempt_count["low"] == 2


def test_preemption_delay_waits_for_resources_to_free_by_themselves() -> None:
    hi = make([("n0", 1)], HiConfig(preemption_delay_s=300))
    run(hi, 0, item("low", 1000))
    result = run(hi, 10, item("high", 1000, HIGH, t=10))
    assert not result.preemptions and result.next_wakeup_s == pytest.approx(310)
    result = run(hi, 310)
    assert {p.victim.id for p in result.preemptions} == {"low"}


# --------------------------------------------------------------------------------- queues
def gpus(n: float) -> Quota:
    return Quota(share_milli={"*": int(n * 1000)})


def test_borrowed_device_is_given_back_when_its_owner_submits() -> None:
    queues = [QueueSpec("a", guarantee=gpus(1)), QueueSpec("b", guarantee=gpus(1))]
    hi = make([("n0", 2)], HiConfig(normal_min_runtime_s=0, preemption_delay_s=0), queues)
    result = run(hi, 0, item("a1", 1000, NORMAL, queue="a"), item("a2", 1000, NORMAL, queue="a", t=1))
    assert set(started(result)) == {"a1", "a2"}  # a borrows b's idle device
    result = run(hi, 10, item("b1", 1000, NORMAL, queue="b", t=10))
    # One of a's jobs goes (a keeps its guarantee); either is the borrower, they started together.
    assert len(result.preemptions) == 1 and result.preemptions[0].victim.queue == "a"
    assert "b1" in started(result)
    view = {row["queue"]: row for row in hi.queue_view()}
    assert view["b"]["used_share_milli"] == 1000 and view["a"]["pending"] == 1


def test_borrowing_limit_holds_and_the_reason_says_so() -> None:
    queues = [QueueSpec("a", guarantee=gpus(1), borrowing_limit=gpus(0.5))]
    hi = make([("n0", 4)], queues=queues)
    result = run(hi, 0, *(item(f"a{i}", 500, LOW, queue="a", t=i) for i in range(5)))
    assert len(started(result)) == 3  # 1.0 guaranteed + 0.5 borrowed
    assert hi.reason("a3").startswith("waits for queue a's quota: 1.5 devices in use, 1.0 guaranteed, limit 1.5")


def test_fair_share_between_queues_without_guarantees() -> None:
    queues = [QueueSpec("a"), QueueSpec("b", weight=1.0)]
    hi = make([("n0", 4)], HiConfig(preemption="none"), queues)
    items = [item(f"a{i}", 1000, LOW, queue="a", t=i) for i in range(6)]
    items += [item(f"b{i}", 1000, LOW, queue="b", t=10 + i) for i in range(6)]
    result = run(hi, 20, *items)
    placed = started(result)
    assert sum(k.startswith("a") for k in placed) == 2 and sum(k.startswith("b") for k in placed) == 2


# --------------------------------------------------------------------------------- gangs
def test_gang_is_all_or_nothing() -> None:
    hi = make([("n0", 2), ("n1", 1)])
    run(hi, 0, item("x", 1000, HIGH))
    gang = [item(f"g{i}", 1000, NORMAL, gang="g", gang_size=3, t=1) for i in range(3)]
    result = run(hi, 1, *gang)
    assert not started(result) and not any(g.id in hi.state.grants for g in gang)
    assert "gang g: 2 of 3 members fit now" in hi.reason("g0")
    hi.release("x")
    result = run(hi, 2)
    assert set(started(result)) == {"g0", "g1", "g2"}


def test_incomplete_gang_waits_and_says_so() -> None:
    hi = make([("n0", 4)])
    result = run(hi, 0, item("g0", 500, gang="g", gang_size=3), item("g1", 500, gang="g", gang_size=3))
    assert not result.starts
    assert hi.reason("g0").startswith("gang g: 2 of 3 members submitted")


def test_two_gangs_never_split_the_cluster() -> None:
    hi = make([("n0", 2), ("n1", 2)])
    a = [item(f"a{i}", 1000, gang="a", gang_size=3, t=0) for i in range(3)]
    b = [item(f"b{i}", 1000, gang="b", gang_size=3, t=1) for i in range(3)]
    result = run(hi, 1, *a, *b)
    assert set(started(result)) == {"a0", "a1", "a2"}  # one gang whole, the other holds nothing
    assert not any(x.id in hi.state.grants for x in b)


def test_gang_not_started_in_time_is_released() -> None:
    hi = make([("n0", 2)], HiConfig(gang_timeout_s=60))
    result = run(hi, 0, *(item(f"g{i}", 1000, gang="g", gang_size=2) for i in range(2)))
    assert len(result.starts) == 2
    hi.started("g0")  # g1 never reports that it started
    result = run(hi, 61)
    assert {p.victim.id for p in result.preemptions} == {"g0", "g1"}
    assert "did not start within 60 s" in result.preemptions[0].reason


# --------------------------------------------------------------------------------- backfill with reservation
def test_backfill_never_delays_the_head() -> None:
    hi = make([("n0", 2), ("n1", 2)], HiConfig(preemption="none"))
    run(hi, 0, item("x0", 1000, t=0), item("y1", 1000, t=0), item("y2", 500, t=0))
    # n0 has one device free, n1 half a device: the 2-device head fits nowhere and holds the node closest.
    result = run(hi, 1, item("head", 1000, count=2, t=1), item("small", 1000, t=2), item("tiny", 500, t=3))
    placed = started(result)
    assert "head" not in placed
    assert "small" not in placed  # only the head's node had a whole device: it is held
    assert placed.get("tiny", (None,))[0] != hi._reserved_node  # noqa: SLF001
    assert hi.reason("small").startswith("held behind head, first in line for")


def test_one_cycle_admits_everything_that_fits_in_every_queue() -> None:
    hi = make([("n0", 8)], queues=[QueueSpec(f"q{i}") for i in range(4)])
    items = [item(f"q{i}-{j}", 500, queue=f"q{i}", t=j) for i in range(4) for j in range(4)]
    assert len(started(run(hi, 0, *items))) == 16


def test_waiting_reason_names_the_gap() -> None:
    hi = make([("n0", 1)])
    run(hi, 0, item("a", 500, HIGH))
    run(hi, 1, item("b", 600, HIGH, t=1))
    assert hi.reason("b").startswith("needs 60 % on one device; the most free on any device is 50 %")


def test_bad_input_is_refused_with_field_and_value() -> None:
    with pytest.raises(HiError, match="priority_class='urgent' is not allowed: high, normal or low"):
        PriorityClass.parse("urgent")
    with pytest.raises(HiError, match="gang_size=3 is not allowed"):
        item("x", gang_size=3)
    with pytest.raises(HiError, match="preemption='magic' is not allowed"):
        HiConfig(preemption="magic")
    hi = make([("n0", 1)])
    hi.submit(item("x"))
    with pytest.raises(HiError, match="already known"):
        hi.submit(item("x"))


# --------------------------------------------------------------------------------- properties
actions = st.lists(
    st.tuples(
        st.sampled_from(["submit", "release", "cycle"]),
        st.sampled_from([100, 300, 500, 700, 1000]),
        st.sampled_from([1, 1, 1, 2]),
        st.sampled_from(list(PriorityClass)),
        st.sampled_from(["a", "b"]),
        st.integers(0, 5),
    ),
    min_size=5,
    max_size=60,
)


def _drive(steps, reclaim: bool, gangs: bool):
    queues = [QueueSpec("a", guarantee=gpus(2), borrowing_limit=gpus(2)), QueueSpec("b", guarantee=gpus(1))]
    hi = make([("n0", 2), ("n1", 4)], HiConfig(reclaim=reclaim, preemption_delay_s=0, normal_min_runtime_s=5), queues)
    log = []
    now = 0.0
    for n, (action, share, count, cls, queue, pick) in enumerate(steps):
        now += 1
        if action == "submit":
            share = 1000 if count > 1 else share
            if gangs and pick == 0:
                for g in range(2):
                    hi.submit(item(f"g{n}-{g}", share, cls, t=now, count=count, queue=queue, gang=f"g{n}", gang_size=2))
            else:
                hi.submit(item(f"j{n}", share, cls, t=now, count=count, queue=queue))
        elif action == "release" and hi.running:
            victim = sorted(hi.running)[pick % len(hi.running)]
            hi.release(victim)
        classes = {r.item.id: (r.item.priority_class, r.item.queue, r.model) for r in hi.running.values()}
        borrowers = {q for q in ("a", "b") if hi.queues.over_guarantee(q, "A100")}
        result = hi.cycle(now)
        for s in result.starts:
            hi.started(s.item.id)
        for p in result.preemptions:
            by = hi.running.get(p.by)
            log.append(
                (classes[p.victim.id], by.item.priority_class if by else None, by.item.queue if by else None, borrowers)
            )
            hi.requeue(p.victim.id, now)
        state = hi.state
        assert (state.free_share_milli >= 0).all() and (state.free_device_memory_mib >= 0).all()
        assert set(state.grants) == set(hi.running)
        for gang in {x.item.gang for x in result.starts if x.item.gang}:
            assert sum(x.item.gang == gang for x in result.starts) == 2, "a gang is never partly placed"
        limit_a = 4000
        assert hi.queues.use["a"].total_share_milli <= limit_a, "queue a's borrowing limit holds"
    return hi, log


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_never_preempt_an_equal_or_higher_class(steps) -> None:
    _, log = _drive(steps, reclaim=False, gangs=True)
    for (victim_cls, _, _), by_cls, _, _ in log:
        assert victim_cls < by_cls and victim_cls is not HIGH


# Found by this property in CI: candidate victims were cached per node only, so a normal preemptor that asked
# right after a high one got the high one's list, with normal victims of its own queue in it.
CACHED_VICTIMS_CASE = [
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 2, NORMAL, "a", 0),
    ("release", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, NORMAL, "a", 0),
    ("submit", 1000, 1, NORMAL, "b", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 2, NORMAL, "a", 0),
    ("submit", 100, 2, NORMAL, "b", 0),
    ("submit", 1000, 1, NORMAL, "b", 0),
    ("release", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 100, 1, LOW, "a", 0),
    ("submit", 1000, 1, HIGH, "a", 0),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
@example(CACHED_VICTIMS_CASE)
def test_reclaim_only_takes_back_borrowed_capacity(steps) -> None:
    _, log = _drive(steps, reclaim=True, gangs=False)
    for (victim_cls, victim_queue, _), by_cls, by_queue, borrowers in log:
        assert victim_cls is not HIGH
        assert victim_cls < by_cls or (victim_queue != by_queue and victim_queue in borrowers)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_decisions_are_deterministic(steps) -> None:
    first, _ = _drive(steps, reclaim=True, gangs=True)
    second, _ = _drive(steps, reclaim=True, gangs=True)
    assert first.state.grants == second.state.grants
    assert first.preempt_count == second.preempt_count


@pytest.mark.parametrize(
    "case,waiting_class,victims",
    [
        ("high preempts its own queue's normal work at the limit", HIGH, 1),
        ("normal preempts its own queue's low work at the limit", NORMAL, 1),
        ("low never preempts for quota", LOW, 0),
    ],
)
def test_an_item_at_its_queues_limit_preempts_its_own_queues_lower_work(
    case: str, waiting_class: PriorityClass, victims: int
) -> None:
    """A queue at its borrowing limit does not make its higher-class work wait behind its own lower-class work
    (kube-scheduler and Kueue preempt lower priorities within a queue); free devices are not enough."""
    config = HiConfig(normal_min_runtime_s=0.0)
    hi = make([("n0", 4)], config, queues=[QueueSpec("small", Quota({"*": 1000}), Quota({"*": 1000}))])
    lower = NORMAL if waiting_class is HIGH else LOW
    run(hi, 0.0, item("a", 1000, lower, queue="small"), item("b", 1000, lower, queue="small"))  # at its limit
    result = run(hi, 1.0, item("top", 1000, waiting_class, t=1.0, queue="small"))
    assert len(result.preemptions) == victims, case
    assert all(p.victim.queue == "small" and p.victim.priority_class < waiting_class for p in result.preemptions)
    assert ("top" in hi.running) is bool(victims), case
    if not victims:
        assert "waits for queue small's quota" in hi.reason("top")
