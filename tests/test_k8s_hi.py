"""The extender's workload decisions through flexai.hi, against the fake API server: classes from priority
bands, queues from labels and the queues ConfigMap, gangs all or nothing, preemption through the Eviction
API with PodDisruptionBudgets honoured."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from flexai.hi import HiConfig, PriorityClass
from flexai.k8s import names
from flexai.k8s.apiclient import KubeClient
from flexai.k8s.service import SchedulerService
from flexai.k8s.workload import QueueConfigError, class_of, parse_queues, pod_work
from tests.fake_apiserver import FakeApiServer
from tests.k8s_objects import node, pod
from tests.pool_helpers import wait_for

QUEUES_YAML = """
queues:
  team-a:
    weight: 2
    guarantee: {devices: 10, cpu: 200}
    borrowingLimit: {devices: 6}
  team-b:
    guarantee: {devices: {A100: 10}}
  team-c:
    guarantee: {devices: 8}
    borrowingLimit: {devices: 4}
"""


# ---------------------------------------------------------------------- reading pods and the ConfigMap


def test_priority_bands_and_override() -> None:
    assert class_of(2_000_000_000) is PriorityClass.HIGH
    assert class_of(1_000_000) is PriorityClass.HIGH
    assert class_of(0, "system-node-critical") is PriorityClass.HIGH
    assert class_of(999_999) is PriorityClass.NORMAL and class_of(0) is PriorityClass.NORMAL
    assert class_of(-1) is PriorityClass.LOW
    p = pod("x", namespace="ns1")
    p["spec"]["priority"] = 5
    work = pod_work(p)
    assert (work.priority_class, work.priority, work.queue, work.gang) == (PriorityClass.NORMAL, 5, "ns1", "")
    p["metadata"]["annotations"][names.ANNOTATION_PRIORITY_CLASS] = "low"
    p["metadata"]["labels"] = {names.LABEL_QUEUE: "team-a", names.LABEL_GANG: "g", names.LABEL_GANG_SIZE: "4"}
    work = pod_work(p)
    assert (work.priority_class, work.queue, work.gang, work.gang_size) == (PriorityClass.LOW, "team-a", "ns1/g", 4)
    p["metadata"]["annotations"][names.ANNOTATION_PRIORITY_CLASS] = "urgent"
    with pytest.raises(ValueError, match="flexai.io/priority-class='urgent' is not allowed: high, normal or low"):
        pod_work(p)
    volcano = pod("v")
    volcano["metadata"]["annotations"][names.ANNOTATION_VOLCANO_GROUP] = "pg1"
    with pytest.raises(ValueError, match="gang-size"):
        pod_work(volcano)


def test_queue_config_is_parsed_and_checked() -> None:
    specs = {s.name: s for s in parse_queues(QUEUES_YAML)}
    assert specs["team-a"].weight == 2 and specs["team-a"].guarantee.share_milli == {"*": 10_000}
    assert specs["team-a"].guarantee.cpu_milli == 200_000
    assert specs["team-a"].borrowing_limit is not None and specs["team-a"].borrowing_limit.share_milli == {"*": 6000}
    assert specs["team-b"].guarantee.share_milli == {"A100": 10_000} and specs["team-b"].borrowing_limit is None
    assert parse_queues("") == [] and parse_queues(json.dumps({"queues": {"q": {}}}))[0].name == "q"
    bad = {
        "queues: [1]": "queues=[1] is not allowed",
        "queues: {a: {guarantee: {gpus: 1}}}": "queues.a.guarantee.gpus is not allowed: devices, memoryMiB or cpu",
        "queues: {a: {guarantee: {devices: -1}}}": "queues.a.guarantee.devices['*']=-1 is not allowed",
        "queues: {a: {weight: 0}}": "queues.a: queue a: weight=0.0 is not allowed",
        "queues: {a: {priority: 1}}": "queues.a.priority is not allowed",
        "queues: {a: [": "not YAML or JSON",
    }
    for text, message in bad.items():
        with pytest.raises(QueueConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
            parse_queues(text)


# ---------------------------------------------------------------------- against the fake API server


class Harness:
    """kube-scheduler's part: filter, prioritize and bind each pending pod, round after round."""

    def __init__(self, gpus_per_node: dict[str, int], queues: str = "", nominate: bool = False, **hi: float) -> None:
        """``nominate``: the service's nominator thread runs too (off by default: the rounds decide alone)."""
        self.server = FakeApiServer()
        self.server.start()
        config = HiConfig(**hi) if hi else HiConfig(normal_min_runtime_s=0.0, preempt_backoff_s=0.0)
        self.service = SchedulerService(
            KubeClient(self.server.url),
            leader_election=False,
            queues=parse_queues(queues),
            hi_config=config,
            nominate=nominate,
        )
        self.nodes = list(gpus_per_node)
        for name, gpus in gpus_per_node.items():
            self.server.add_node(node(name, gpus, cpu="512", memory="4096Gi"))
        self.service.start()
        assert self.service.wait_synced(10)

        def known() -> bool:
            with self.service.extender.lock:
                return self.service.cluster.state is not None and len(self.service.cluster.index_of) == len(self.nodes)

        wait_for(known)
        self.bridge = self.service.extender.bridge
        assert self.bridge is not None

    def stop(self) -> None:
        self.service.stop()
        self.server.stop()

    def settle(self) -> None:
        """Wait until the extender's view shows every pod as the API server holds it."""

        def same() -> bool:
            with self.server.lock:
                want = {
                    f"uid-{p['metadata']['name']}": p["spec"].get("nodeName") or "" for p in self.server.pods.values()
                }
            with self.service.extender.lock:
                have = {k: r.node for k, r in self.service.cluster.pods.items()}
            return want == have

        wait_for(same, timeout_s=10)

    def pending(self) -> list[dict]:
        with self.server.lock:
            return [json.loads(json.dumps(p)) for p in self.server.pods.values() if not p["spec"].get("nodeName")]

    def round(self) -> int:
        self.settle()
        extender = self.service.extender
        bound = 0
        for p in self.pending():
            result = extender.filter({"Pod": p, "NodeNames": self.nodes})
            passed = result["NodeNames"]
            if not passed:
                assert set(result["FailedNodes"]) | set(result["FailedAndUnresolvableNodes"]) == set(self.nodes)
                continue
            assert len(passed) == 1
            scores = extender.prioritize({"Pod": p, "NodeNames": passed})
            assert scores == [{"Host": passed[0], "Score": 10}]
            meta = p["metadata"]
            answer = extender.bind(
                {"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"], "Node": passed[0]}
            )
            assert answer == {"Error": ""}, answer
            bound += 1
            self.check_ledger()
        return bound

    def run(self, rounds: int = 40) -> None:
        quiet = 0
        for _ in range(rounds):
            evictions = len(self.server.evictions) + len(self.server.refused_evictions)
            bound = self.round()
            self.check_ledger()
            self.check_gangs()
            moved = bound or len(self.server.evictions) + len(self.server.refused_evictions) != evictions
            quiet = 0 if moved else quiet + 1
            if quiet >= 3:
                return

    def check_ledger(self) -> None:
        """No slice granted twice: the bound pods' slices stay within every device, in the API server and in
        both ledgers."""
        used: Counter[tuple[str, str]] = Counter()
        with self.server.lock:
            for stored in self.server.pods.values():
                raw = stored["metadata"].get("annotations", {}).get(names.ANNOTATION_PLACEMENT)
                if raw and stored["spec"].get("nodeName"):
                    placement = names.Placement.from_json(raw)
                    for s in placement.slices:
                        used[(placement.node, s.uuid)] += s.share_milli
        assert not used or max(used.values()) <= 1000
        with self.service.extender.lock:
            state = self.service.cluster.state
            assert state is not None and (state.free_share_milli >= 0).all()
            assert self.bridge.hi is not None and (self.bridge.hi.state.free_share_milli >= 0).all()

    def check_gangs(self) -> None:
        members: dict[str, list[bool]] = {}
        with self.server.lock:
            for stored in self.server.pods.values():
                gang = (stored["metadata"].get("labels") or {}).get(names.LABEL_GANG)
                if gang:
                    members.setdefault(gang, []).append(bool(stored["spec"].get("nodeName")))
        for gang, bound in members.items():
            assert all(bound) or not any(bound), f"gang {gang}: {sum(bound)} of {len(bound)} bound"


def workload_pod(
    name: str, share: int, queue: str, cls: str, count: int = 1, gang: str = "", gang_size: int = 0
) -> dict:
    p = pod(name, count, share, 4096, cpu="1", mem="1Gi")
    labels = {names.LABEL_QUEUE: queue}
    if gang:
        labels |= {names.LABEL_GANG: gang, names.LABEL_GANG_SIZE: str(gang_size)}
    p["metadata"]["labels"] = labels
    if cls == "high":
        p["spec"]["priority"] = 1_000_000
    elif cls == "low":
        p["spec"]["priority"] = -10
    else:
        p["spec"]["priority"] = 100
    return p


def test_two_hundred_pods_three_queues_two_gangs_preemption_through_evictions() -> None:
    h = Harness({f"node-{i}": 8 for i in range(4)}, QUEUES_YAML)
    try:
        shares = [100, 200, 300, 500, 1000]
        queues = ["team-a", "team-b", "team-c"]
        # First the lower classes (they fill the cluster and beyond), then two gangs, then the high pods.
        low_normal = []
        for i in range(150):
            cls = "low" if i % 3 == 0 else "normal"
            low_normal.append(workload_pod(f"w{i:03d}", shares[i % 5], queues[i % 3], cls))
        for p in low_normal:
            h.server.add_pod(p)
        h.run(rounds=6)
        for g in ("g1", "g2"):
            for k in range(4):
                h.server.add_pod(workload_pod(f"{g}-{k}", 1000, "team-b", "normal", gang=g, gang_size=4))
        h.run(rounds=6)
        highs = [workload_pod(f"h{i:02d}", shares[i % 4], queues[i % 3], "high") for i in range(42)]
        for p in highs:
            h.server.add_pod(p)
        h.run()
        h.settle()
        with h.server.lock:
            stored = dict(h.server.pods)
        # 200 pods submitted; no high pod waits while lower work could be evicted: every high pod is bound
        # (the 42 high pods ask for 12.6 of the 32 devices).
        assert len(low_normal) + 8 + len(highs) == 200
        unbound_high = [
            p["metadata"]["name"]
            for p in highs
            if not stored[f"default/{p['metadata']['name']}"]["spec"].get("nodeName")
        ]
        with h.service.extender.lock:  # on failure, say why from hi
            why = {n: h.bridge.hi.reason(f"uid-{n}") for n in unbound_high if h.bridge.hi is not None}
        assert unbound_high == [], why
        # Preemption went through the Eviction API only; the scheduler deleted nothing.
        assert h.server.evictions and h.server.pod_deletes == 0
        gone = {f"default/{p['metadata']['name']}" for p in low_normal} - set(stored)
        assert gone == set(h.server.evictions)
        # Victims were lower-class pods.
        assert all(not k.split("/")[1].startswith(("h", "g")) for k in h.server.evictions)
        h.check_ledger()
        h.check_gangs()
        assert sum(1 for s in stored.values() if s["spec"].get("nodeName")) > 60
        # Each eviction names its preemptor in an event.
        assert sum(1 for e in h.server.events if e["reason"] == "FlexaiPreempted") == len(h.server.evictions)
        # Waiting pods say why, from hi.
        waiting = [p for p in h.pending()]
        if waiting:
            result = h.service.extender.filter({"Pod": waiting[0], "NodeNames": h.nodes})
            assert all(text.startswith("flexai: ") for text in result["FailedNodes"].values())
    finally:
        h.stop()


def test_a_pdb_refusal_keeps_the_victim_and_rolls_the_preemption_back() -> None:
    h = Harness({"node-0": 1}, normal_min_runtime_s=0.0, preempt_backoff_s=60.0)
    offset = [0.0]
    h.service.cluster.clock = lambda: time.time() + offset[0]  # the bridge's time: moved on below
    try:
        h.server.add_pod(workload_pod("low", 1000, "q", "low"))
        h.run()
        h.settle()
        assert h.server.pods["default/low"]["spec"].get("nodeName") == "node-0"
        h.server.protect("default", "low")
        h.server.add_pod(workload_pod("high", 1000, "q", "high"))
        h.settle()
        high = h.pending()[0]
        result = h.service.extender.filter({"Pod": high, "NodeNames": h.nodes})
        assert result["NodeNames"] == []
        assert h.server.refused_evictions == ["default/low"] and h.server.evictions == []
        assert "default/low" in h.server.pods
        with h.service.extender.lock:
            hi = h.bridge.hi
            assert hi is not None
            assert "uid-low" in hi.running and "uid-high" in hi.pending and not h.bridge.nominated
            assert hi.state.grants["uid-low"].node_index == 0 and "uid-high" not in hi.state.grants
        h.check_ledger()
        # The refused victim is protected for the back-off: the high pod waits, with hi's reason.
        result = h.service.extender.filter({"Pod": high, "NodeNames": h.nodes})
        assert result["NodeNames"] == [] and h.server.refused_evictions == ["default/low"]
        assert result["FailedNodes"]["node-0"].startswith("flexai: needs 1 whole device on one node")
        # The budget allows it again and the back-off is over: evicted, and the high pod takes the device.
        h.server.protected.clear()
        offset[0] = 61.0
        h.run()
        assert h.server.evictions == ["default/low"] and h.server.pod_deletes == 0
        assert h.server.pods["default/high"]["spec"].get("nodeName") == "node-0"
        h.check_ledger()
    finally:
        h.stop()


def test_a_queue_over_its_borrowing_limit_waits_with_the_quota_reason() -> None:
    h = Harness({"node-0": 4}, "queues: {small: {guarantee: {devices: 1}, borrowingLimit: {devices: 1}}}")
    try:
        for i in range(3):
            h.server.add_pod(workload_pod(f"s{i}", 1000, "small", "normal"))
        h.run()
        h.settle()
        bound = [k for k, p in h.server.pods.items() if p["spec"].get("nodeName")]
        assert len(bound) == 2
        (waiting,) = h.pending()
        result = h.service.extender.filter({"Pod": waiting, "NodeNames": h.nodes})
        assert "waits for queue small's quota" in result["FailedNodes"]["node-0"]
    finally:
        h.stop()


def test_a_high_pod_in_a_queue_at_its_limit_evicts_its_own_queues_lower_work() -> None:
    """A queue at its borrowing limit: its high pod takes the room of its own lower-class work (evicted), as
    kube-scheduler and Kueue preempt lower priorities within a queue; waiting on the quota would leave it
    pending while work it may preempt holds the quota. (The 200-pod test above hit this by chance: which
    queue ended at its limit with high pods still pending depended on timing.)"""
    h = Harness({"node-0": 4}, "queues: {small: {guarantee: {devices: 1}, borrowingLimit: {devices: 1}}}")
    try:
        for i in range(2):
            h.server.add_pod(workload_pod(f"n{i}", 1000, "small", "normal"))
        h.run()
        h.settle()
        assert sorted(k for k, p in h.server.pods.items() if p["spec"].get("nodeName")) == ["default/n0", "default/n1"]
        # Two devices are free, but the queue's 2 devices are used: only its own normal work can make room.
        h.server.add_pod(workload_pod("high", 1000, "small", "high"))
        h.run()
        h.settle()
        assert h.server.pods["default/high"]["spec"].get("nodeName") == "node-0", h.service.extender.filter(
            {"Pod": h.server.pods["default/high"], "NodeNames": h.nodes}
        )["FailedNodes"]
        assert len(h.server.evictions) == 1 and h.server.evictions[0] in ("default/n0", "default/n1")
        assert h.server.pod_deletes == 0
        h.check_ledger()
        with h.service.extender.lock:
            hi = h.bridge.hi
            assert hi is not None and hi.queues.use["small"].total_share_milli == 2000
    finally:
        h.stop()


def test_moves_are_off_on_kubernetes_until_they_can_be_carried_out() -> None:
    """Hi's defragmentation moves are not carried out by the extender yet: asking for them turns them off (a move
    in Hi's ledger without an eviction and a rebind would leave the ledger and the cluster apart)."""
    from flexai.k8s.cluster import KubeCluster
    from flexai.k8s.hibridge import MOVES_NOT_SUPPORTED, HiBridge

    bridge = HiBridge(KubeCluster(), config=HiConfig(defrag_max_moves=4, consolidation_interval_s=60.0))
    assert (bridge.config.defrag_max_moves, bridge.config.consolidation_interval_s) == (0, 0.0)
    assert bridge.moves_off == MOVES_NOT_SUPPORTED
    assert HiBridge(KubeCluster()).moves_off == ""
