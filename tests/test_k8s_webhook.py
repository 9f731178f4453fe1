"""Admission webhook: AdmissionReview v1 bodies in, translated pods and refusals out (no cluster needed)."""

from __future__ import annotations

import base64
import copy
import json
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from flexai.k8s.names import (
    ANNOTATION_MODEL,
    ANNOTATION_TRANSLATED,
    RESOURCE_MEMORY,
    RESOURCE_SHARE,
    RESOURCE_VXPU,
    SCHEDULER_NAME,
)
from flexai.k8s.webhook import (
    ANNOTATION_MEMORY_PERCENTAGE,
    QuantityError,
    WebhookOptions,
    create_webhook_app,
    inspect_pod,
    parse_quantity,
    review,
)

# ------------------------------------------------------------------------------------------------- helpers


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(document: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """A small RFC 6902 applier (add, replace, remove) for objects and arrays: enough for the webhook."""
    doc = copy.deepcopy(document)
    for op in patch:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent: Any = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(last)] = op["value"]
            else:
                assert last in parent, f"replace of a missing member {op['path']}"
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:  # pragma: no cover - the webhook emits only the three above
            raise AssertionError(f"unexpected op {op}")
    return doc


def container(name: str = "main", limits: dict[str, Any] | None = None, requests: dict[str, Any] | None = None):
    resources: dict[str, Any] = {}
    if limits is not None:
        resources["limits"] = limits
    if requests is not None:
        resources["requests"] = requests
    return {"name": name, "image": "pytorch/pytorch:latest", "resources": resources}


def pod(*containers: dict[str, Any], annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "trainer", "namespace": "ml"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"schedulerName": "default-scheduler", "containers": list(containers), **spec},
    }


def admission(obj: Any, uid: str = "1f0e7c5a-0000-4000-8000-000000000001", operation: str = "CREATE") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ml",
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


def mutated(obj: dict[str, Any], options: WebhookOptions | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(AdmissionReview response, the pod after its patch)."""
    answer = review(admission(obj), "mutate", options)
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert response["allowed"] is True, response
    if "patch" not in response:
        return response, obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return response, apply_patch(obj, patch)


def limits_of(obj: dict[str, Any], index: int = 0, part: str = "limits") -> dict[str, Any]:
    return obj["spec"]["containers"][index]["resources"][part]


# -------------------------------------------------------------------------------------------- translation

FLEX_30 = {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "8192"}

TRANSLATIONS = [
    # (case, limits written by the user, flexai limits expected, translated-from annotation or None)
    ("flexai native", dict(FLEX_30), FLEX_30, None),
    ("flexai memory as bytes", {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "8Gi"}, FLEX_30, None),
    ("flexai share without count", {RESOURCE_SHARE: "500"}, {RESOURCE_VXPU: "1", RESOURCE_SHARE: "500"}, None),
    (
        "hami count+mem+cores",
        {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8192", "nvidia.com/gpucores": "30"},
        FLEX_30,
        "hami",
    ),
    (
        "hami mem as quantity",
        {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8Gi", "nvidia.com/gpucores": "30"},
        FLEX_30,
        "hami",
    ),
    (
        "hami mem only, default count",
        {"nvidia.com/gpumem": "4000"},
        {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "4000"},
        "hami",
    ),
    (
        "hami whole devices with memory",
        {"nvidia.com/gpu": "2", "nvidia.com/gpumem": "20000"},
        {RESOURCE_VXPU: "2", RESOURCE_MEMORY: "20000"},
        "hami",
    ),
    (
        "hami cores 100 on 4 devices",
        {"nvidia.com/gpu": "4", "nvidia.com/gpucores": "100"},
        {RESOURCE_VXPU: "4", RESOURCE_SHARE: "1000"},
        "hami",
    ),
    (
        "volcano",
        {"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-memory": "8192", "volcano.sh/vgpu-cores": "30"},
        FLEX_30,
        "volcano",
    ),
    ("volcano number only", {"volcano.sh/vgpu-number": "2"}, {RESOURCE_VXPU: "2"}, "volcano"),
    (
        "huawei",
        {"huawei.com/vgpu-number": "1", "huawei.com/vgpu-cores": "30", "huawei.com/vgpu-memory.1Gi": "8"},
        FLEX_30,
        "huawei",
    ),
    (
        "huawei half GiB",
        {"huawei.com/vgpu-number": "1", "huawei.com/vgpu-memory.1Gi": "0.5"},
        {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "512"},
        "huawei",
    ),
    (
        "other resources kept",
        {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1", "nvidia.com/gpucores": "50"},
        {"cpu": "4", "memory": "16Gi", RESOURCE_VXPU: "1", RESOURCE_SHARE: "500"},
        "hami",
    ),
]


@pytest.mark.parametrize(("case", "limits", "expected", "source"), TRANSLATIONS, ids=[t[0] for t in TRANSLATIONS])
def test_translation_per_convention(case: str, limits: dict, expected: dict, source: str | None) -> None:
    original = pod(container(limits=limits, requests=dict(limits)), annotations={"team": "vision"})
    response, after = mutated(original)
    assert after["spec"]["schedulerName"] == SCHEDULER_NAME
    assert limits_of(after) == expected
    assert limits_of(after, part="requests") == expected
    annotations = after["metadata"]["annotations"]
    assert annotations["team"] == "vision"
    assert annotations.get(ANNOTATION_TRANSLATED) == source
    assert original["spec"]["schedulerName"] == "default-scheduler", "the input must not be modified"


# What used to be refused or left behind (so that the pod failed or waited forever), with each project's
# documented defaults: (case, limits, options, flexai limits, annotations the pod gets, env the container gets).
HAMI_RULES = [
    (
        "hami cores off the step round up to it",
        {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "25", "nvidia.com/gpumem": "1000"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "1000"},
        {},
        {},
    ),
    (
        "hami cores 0 is no core limit: the whole device",
        {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "0", "nvidia.com/gpumem": "1000"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "1000", RESOURCE_MEMORY: "1000"},
        {},
        {},
    ),
    (
        "hami cores missing is no core limit too",
        {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "1000"},
        {},
        {},
    ),
    (
        "hami memory missing is the whole device memory",
        {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300"},
        {ANNOTATION_MEMORY_PERCENTAGE: '{"main": 100}'},
        {},
    ),
    (
        "hami memory missing, device memory known",
        {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30"},
        {"device_memory_mib": 81920},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "81920"},
        {},
        {},
    ),
    (
        "hami part of two GPUs",
        {"nvidia.com/gpu": "2", "nvidia.com/gpucores": "50", "nvidia.com/gpumem": "4096"},
        {},
        {RESOURCE_VXPU: "2", RESOURCE_SHARE: "500", RESOURCE_MEMORY: "4096"},
        {},
        {},
    ),
    (
        "hami priority becomes CUDA_TASK_PRIORITY",
        {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30", "nvidia.com/gpumem": "1000", "nvidia.com/priority": "1"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "1000"},
        {},
        {"CUDA_TASK_PRIORITY": "1"},
    ),
    (
        "hami priority on a bare nvidia gpu is stripped too",
        {"nvidia.com/gpu": "1", "nvidia.com/priority": "0"},
        {},
        {"nvidia.com/gpu": "1"},
        {},
        {"CUDA_TASK_PRIORITY": "0"},
    ),
    (
        "volcano memory percentage",
        {"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-cores": "30", "volcano.sh/vgpu-memory-percentage": "50"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300"},
        {ANNOTATION_MEMORY_PERCENTAGE: '{"main": 50}'},
        {},
    ),
    (
        "volcano memory percentage, device memory known",
        {"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-memory-percentage": "50"},
        {"device_memory_mib": 40960},
        {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "20480"},
        {},
        {},
    ),
    (
        "volcano cores 0",
        {"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-cores": "0", "volcano.sh/vgpu-memory": "1024"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "1000", RESOURCE_MEMORY: "1024"},
        {},
        {},
    ),
    (
        "huawei vgpu-type names the device model",
        {
            "huawei.com/vgpu-number": "1",
            "huawei.com/vgpu-cores": "20",
            "huawei.com/vgpu-memory.1Gi": "4",
            "huawei.com/vgpu-type.T4": "1",
        },
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "200", RESOURCE_MEMORY: "4096"},
        {ANNOTATION_MODEL: "*T4*"},
        {},
    ),
    (
        "huawei vNPU: 4 of 30 AI cores of an Ascend 910",
        {"huawei.com/Ascend910-4c": "1"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "200"},
        {ANNOTATION_MODEL: "Ascend910*", ANNOTATION_MEMORY_PERCENTAGE: '{"main": 13}'},
        {},
    ),
    (
        "huawei vNPU template with memory",
        {"huawei.com/Ascend910B-5c.1cpu.16g": "1"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300", RESOURCE_MEMORY: "16384"},
        {ANNOTATION_MODEL: "Ascend910B*"},
        {},
    ),
    (
        "huawei vNPU of an Ascend 310P",
        {"huawei.com/Ascend310P-2c.1cpu": "1"},
        {},
        {RESOURCE_VXPU: "1", RESOURCE_SHARE: "300"},
        {ANNOTATION_MODEL: "Ascend310P*", ANNOTATION_MEMORY_PERCENTAGE: '{"main": 25}'},
        {},
    ),
]


@pytest.mark.parametrize(
    ("case", "limits", "options", "expected", "annotations", "env"), HAMI_RULES, ids=[r[0] for r in HAMI_RULES]
)
def test_requests_of_other_projects_never_fail_nor_wait(
    case: str, limits: dict, options: dict, expected: dict, annotations: dict, env: dict
) -> None:
    """Each project's keys and documented defaults become flexai's; nothing unknown is left in the pod."""
    original = pod(container(limits=limits, requests=dict(limits)))
    _, after = mutated(original, WebhookOptions(**options))
    assert limits_of(after) == expected and limits_of(after, part="requests") == expected
    got = after["metadata"].get("annotations") or {}
    assert {k: v for k, v in got.items() if k != ANNOTATION_TRANSLATED} == annotations
    assert {e["name"]: e["value"] for e in after["spec"]["containers"][0].get("env", [])} == env
    assert review(admission(after), "validate", WebhookOptions(**options))["response"]["allowed"] is True


def test_a_container_keeps_its_own_task_priority() -> None:
    mine = container(limits={"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30", "nvidia.com/priority": "1"})
    mine["env"] = [{"name": "CUDA_TASK_PRIORITY", "value": "0"}]
    _, after = mutated(pod(mine))
    assert after["spec"]["containers"][0]["env"] == [{"name": "CUDA_TASK_PRIORITY", "value": "0"}]
    assert "nvidia.com/priority" not in limits_of(after)


def test_a_model_the_pod_names_itself_wins_over_huawei_vgpu_type() -> None:
    obj = pod(
        container(limits={"huawei.com/vgpu-number": "1", "huawei.com/vgpu-type.T4": "1"}),
        annotations={ANNOTATION_MODEL: "A100"},
    )
    _, after = mutated(obj)
    assert after["metadata"]["annotations"][ANNOTATION_MODEL] == "A100"
    assert limits_of(after) == {RESOURCE_VXPU: "1"}


def test_uid_is_echoed_and_patch_is_rfc6902() -> None:
    answer = review(admission(pod(container(limits=dict(FLEX_30))), uid="abc-123"), "mutate")
    assert answer["response"]["uid"] == "abc-123"
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert patch == [{"op": "replace", "path": "/spec/schedulerName", "value": SCHEDULER_NAME}]


def test_scheduler_name_added_when_missing_and_untouched_when_already_ours() -> None:
    obj = pod(container(limits=dict(FLEX_30)))
    del obj["spec"]["schedulerName"]
    _, after = mutated(obj)
    assert after["spec"]["schedulerName"] == SCHEDULER_NAME

    ours = pod(container(limits=dict(FLEX_30)), schedulerName=SCHEDULER_NAME)
    response, _ = mutated(ours)
    assert "patch" not in response


def test_annotations_created_when_pod_has_none() -> None:
    obj = pod(container(limits={"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30"}))
    assert "annotations" not in obj["metadata"]
    _, after = mutated(obj)
    assert after["metadata"]["annotations"] == {
        ANNOTATION_TRANSLATED: "hami",
        ANNOTATION_MEMORY_PERCENTAGE: '{"main": 100}',
    }


def test_several_containers_and_conventions_in_one_pod() -> None:
    obj = pod(
        container("a", limits={"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1024", "nvidia.com/gpucores": "20"}),
        container("sidecar", limits={"cpu": "100m"}),
        container(
            "b", limits={"volcano.sh/vgpu-number": "1", "volcano.sh/vgpu-cores": "20", "volcano.sh/vgpu-memory": "1024"}
        ),
        initContainers=[
            container(
                "init",
                limits={
                    "huawei.com/vgpu-number": "1",
                    "huawei.com/vgpu-cores": "20",
                    "huawei.com/vgpu-memory.1Gi": "1",
                },
            )
        ],
    )
    _, after = mutated(obj)
    slice_20 = {RESOURCE_VXPU: "1", RESOURCE_SHARE: "200", RESOURCE_MEMORY: "1024"}
    assert limits_of(after, 0) == slice_20
    assert limits_of(after, 1) == {"cpu": "100m"}
    assert limits_of(after, 2) == slice_20
    assert after["spec"]["initContainers"][0]["resources"]["limits"] == slice_20
    assert after["metadata"]["annotations"][ANNOTATION_TRANSLATED] == "hami,huawei,volcano"
    slices = inspect_pod(obj).slices
    assert [(s.container, s.convention) for s in slices] == [("init", "huawei"), ("a", "hami"), ("b", "volcano")]


def test_containers_of_one_pod_with_different_slices_are_refused_at_creation() -> None:
    """The extender gives every device of a pod the same slice: say so at creation, not by a pod that waits."""
    obj = pod(
        container("a", limits={"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30", "nvidia.com/gpumem": "1000"}),
        container("b", limits={"nvidia.com/gpu": "1", "nvidia.com/gpucores": "50", "nvidia.com/gpumem": "1000"}),
    )
    response = review(admission(obj), "mutate")["response"]
    assert response["allowed"] is False and response["status"]["code"] == 422
    assert (
        "'a' 300m share and 1000 MiB, 'b' 500m share and 1000 MiB ask for different slices"
        in (response["status"]["message"])
    )


def test_bare_nvidia_gpu_is_left_to_the_nvidia_device_plugin_by_default() -> None:
    obj = pod(container(limits={"nvidia.com/gpu": "2"}))
    response, after = mutated(obj)
    assert "patch" not in response
    assert after == obj
    assert review(admission(obj), "validate")["response"]["allowed"] is True


def test_bare_nvidia_gpu_is_translated_when_asked() -> None:
    obj = pod(container(limits={"nvidia.com/gpu": "2"}))
    _, after = mutated(obj, WebhookOptions(translate_bare_gpu=True))
    assert limits_of(after) == {RESOURCE_VXPU: "2"}
    assert after["spec"]["schedulerName"] == SCHEDULER_NAME
    assert after["metadata"]["annotations"][ANNOTATION_TRANSLATED] == "hami"


def test_default_share_for_translated_requests_without_cores() -> None:
    obj = pod(container(limits={"nvidia.com/gpumem": "4000"}))
    _, after = mutated(obj, WebhookOptions(default_share_milli=200))
    assert limits_of(after) == {RESOURCE_VXPU: "1", RESOURCE_SHARE: "200", RESOURCE_MEMORY: "4000"}
    native = pod(container(limits={RESOURCE_VXPU: "1"}))
    _, after_native = mutated(native, WebhookOptions(default_share_milli=200))
    assert limits_of(after_native) == {RESOURCE_VXPU: "1"}, "flexai's own names keep flexai's default"


def test_memory_percentage_kept_as_annotation_when_device_memory_unknown() -> None:
    obj = pod(container("train", limits={"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "25"}))
    _, after = mutated(obj)
    assert limits_of(after) == {RESOURCE_VXPU: "1"}
    annotations = after["metadata"]["annotations"]
    assert json.loads(annotations[ANNOTATION_MEMORY_PERCENTAGE]) == {"train": 25}
    assert annotations[ANNOTATION_TRANSLATED] == "hami"


def test_memory_percentage_resolved_with_uniform_device_memory() -> None:
    obj = pod(container(limits={"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "25"}))
    _, after = mutated(obj, WebhookOptions(device_memory_mib=81920))
    assert limits_of(after) == {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "20480"}
    assert ANNOTATION_MEMORY_PERCENTAGE not in after["metadata"]["annotations"]


def test_annotation_keys_are_json_pointer_escaped() -> None:
    obj = pod(container(limits={"volcano.sh/vgpu-number": "1"}), annotations={})
    answer = review(admission(obj), "mutate")
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    paths = [op["path"] for op in patch]
    assert "/metadata/annotations/flexai.io~1translated-from" in paths
    assert apply_patch(obj, patch)["metadata"]["annotations"] == {
        ANNOTATION_TRANSLATED: "volcano",
        ANNOTATION_MEMORY_PERCENTAGE: '{"main": 100}',
    }


UNTOUCHED = [
    ("no resources", pod({"name": "main", "image": "nginx"})),
    ("cpu and memory", pod(container(limits={"cpu": "1", "memory": "1Gi"}, requests={"cpu": "500m"}))),
    ("other extended resource", pod(container(limits={"example.com/fpga": "1"}))),
    ("bare nvidia gpu", pod(container(limits={"nvidia.com/gpu": "1"}))),
    ("no containers", {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": []}}),
]


@pytest.mark.parametrize(("case", "obj"), UNTOUCHED, ids=[u[0] for u in UNTOUCHED])
@pytest.mark.parametrize("kind", ["mutate", "validate"])
def test_pods_without_flexai_or_alias_resources_are_untouched(case: str, obj: dict, kind: str) -> None:
    response = review(admission(obj), kind)["response"]  # type: ignore[arg-type]
    assert response["allowed"] is True
    assert "patch" not in response and "patchType" not in response
    assert "status" not in response


def test_other_kinds_operations_and_subresources_are_allowed_unchanged() -> None:
    bad = pod(container(limits={"nvidia.com/gpucores": "35"}))
    update = admission(bad, operation="UPDATE")
    assert review(update, "mutate")["response"] == {"uid": update["request"]["uid"], "allowed": True}
    deployment = admission({"spec": {}})
    deployment["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    deployment["request"]["resource"] = {"group": "apps", "version": "v1", "resource": "deployments"}
    assert review(deployment, "validate")["response"]["allowed"] is True
    binding = admission(bad)
    binding["request"]["subResource"] = "binding"
    assert review(binding, "validate")["response"]["allowed"] is True


# ---------------------------------------------------------------------------------------------- refusals

REFUSALS = [
    # (case, limits, options, status code, fragments the message must contain)
    ("share off step", {RESOURCE_VXPU: "1", RESOURCE_SHARE: "350"}, {}, 422, ["flexai.io/vxpu-share=350", "10 %"]),
    ("share zero", {RESOURCE_VXPU: "1", RESOURCE_SHARE: "0"}, {}, 422, ["flexai.io/vxpu-share=0", "1 % to 100 %"]),
    ("cores above 100", {"volcano.sh/vgpu-cores": "150"}, {}, 422, ["volcano.sh/vgpu-cores=150", "100 %"]),
    ("share off custom step", {RESOURCE_SHARE: "300"}, {"share_step_milli": 250}, 422, ["25 % share step"]),
    ("count zero", {RESOURCE_VXPU: "0"}, {}, 422, ["flexai.io/vxpu=0", "1 to 16"]),
    ("count above max", {"huawei.com/vgpu-number": "17"}, {}, 422, ["huawei.com/vgpu-number=17", "1 to 16"]),
    ("count above custom max", {RESOURCE_VXPU: "9"}, {"max_devices": 8}, 422, ["flexai.io/vxpu=9", "1 to 8"]),
    ("hami cores negative", {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "-10"}, {}, 422, ["gpucores=-10"]),
    ("hami priority negative", {"nvidia.com/gpu": "1", "nvidia.com/priority": "-1"}, {}, 422, ["priority=-1"]),
    ("vNPU of too many cores", {"huawei.com/Ascend310P-16c": "1"}, {}, 422, ["Ascend310P-16c", "1 to 8"]),
    (
        "two vNPU templates",
        {"huawei.com/Ascend910-2c": "1", "huawei.com/Ascend910-4c": "1"},
        {},
        422,
        ["several vNPU templates"],
    ),
    ("memory negative", {RESOURCE_VXPU: "1", RESOURCE_MEMORY: "-5"}, {}, 422, ["flexai.io/vxpu-memory=-5", "negative"]),
    (
        "memory above device",
        {"nvidia.com/gpumem": "100Gi"},
        {"max_memory_mib": 81920},
        422,
        ["nvidia.com/gpumem=100Gi", "102400 MiB", "0 to 81920 MiB"],
    ),
    (
        "memory twice",
        {"nvidia.com/gpumem": "1000", "nvidia.com/gpumem-percentage": "10"},
        {},
        422,
        ["nvidia.com/gpumem=1000", "nvidia.com/gpumem-percentage=10", "one of"],
    ),
    ("memory percentage 0", {"nvidia.com/gpumem-percentage": "0"}, {}, 422, ["gpumem-percentage=0", "1 to 100"]),
    (
        "conventions mixed",
        {RESOURCE_VXPU: "1", "nvidia.com/gpumem": "1000"},
        {},
        422,
        ["flexai.io/vxpu, nvidia.com/gpumem", "flexai and hami", "one convention per container"],
    ),
    (
        "flexai with bare nvidia gpu",
        {RESOURCE_VXPU: "1", "nvidia.com/gpu": "1"},
        {},
        422,
        ["flexai and hami"],
    ),
    (
        "volcano and huawei",
        {"volcano.sh/vgpu-number": "1", "huawei.com/vgpu-cores": "20"},
        {},
        422,
        ["volcano and huawei"],
    ),
    ("unparsable memory", {"nvidia.com/gpumem": "8 GB"}, {}, 400, ["nvidia.com/gpumem=8 GB", "8Gi"]),
    ("unparsable count", {RESOURCE_VXPU: "two"}, {}, 400, ["flexai.io/vxpu=two", "Kubernetes quantity"]),
    ("fractional count", {"volcano.sh/vgpu-number": "1.5"}, {}, 400, ["vgpu-number=1.5", "whole number"]),
    ("milli share", {RESOURCE_SHARE: "300m"}, {}, 400, ["flexai.io/vxpu-share=300m", "whole number"]),
    ("fractional MiB", {RESOURCE_MEMORY: "10.5"}, {}, 400, ["flexai.io/vxpu-memory=10.5", "whole number of MiB"]),
]


@pytest.mark.parametrize(("case", "limits", "options", "code", "fragments"), REFUSALS, ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("kind", ["mutate", "validate"])
def test_impossible_requests_are_refused(
    case: str, limits: dict, options: dict, code: int, fragments: list[str], kind: str
) -> None:
    answer = review(admission(pod(container("worker", limits=limits)), uid="u-9"), kind, WebhookOptions(**options))  # type: ignore[arg-type]
    response = answer["response"]
    assert response["uid"] == "u-9"
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == code
    message = response["status"]["message"]
    assert "container 'worker'" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_limits_and_requests_must_agree() -> None:
    obj = pod(container(limits={"nvidia.com/gpumem": "4000"}, requests={"nvidia.com/gpumem": "2000"}))
    response = review(admission(obj), "validate")["response"]
    assert response["allowed"] is False
    assert "nvidia.com/gpumem is 4000 in limits but 2000 in requests" in response["status"]["message"]


def test_every_problem_is_named_once() -> None:
    obj = pod(
        container("a", limits={RESOURCE_VXPU: "0"}),
        container("b", limits={"nvidia.com/gpucores": "150"}),
    )
    message = review(admission(obj), "validate")["response"]["status"]["message"]
    assert message.count("container 'a'") == 1 and message.count("container 'b'") == 1


def test_malformed_admission_reviews_are_refused_not_crashed() -> None:
    assert review({}, "mutate")["response"] == {
        "uid": "",
        "allowed": False,
        "status": {"code": 400, "message": "request: missing (allowed: an AdmissionReview v1 with a request object)"},
    }
    no_spec = review(admission({"kind": "Pod"}), "validate")["response"]
    assert no_spec["allowed"] is False and no_spec["status"]["code"] == 400
    odd = pod(container(limits={RESOURCE_VXPU: True}), "not a container")  # type: ignore[arg-type]
    answer = review(admission(odd), "mutate")["response"]
    assert answer["allowed"] is False and "flexai.io/vxpu=true" in answer["status"]["message"]
    with pytest.raises(ValueError, match="allowed 'mutate' or 'validate'"):
        review(admission(odd), "admit")  # type: ignore[arg-type]


def test_options_from_the_charts_flags() -> None:
    assert WebhookOptions.from_flags() == WebhookOptions()
    opts = WebhookOptions.from_flags(50, 8, 81920, 40960, 200, True)
    assert opts == WebhookOptions(50, 8, 81920, True, 40960, 200)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="share_step_milli 300"):
        WebhookOptions(share_step_milli=300)
    with pytest.raises(ValueError, match="max_devices 0"):
        WebhookOptions(max_devices=0)
    with pytest.raises(ValueError, match="default_share_milli 150"):
        WebhookOptions(default_share_milli=150)
    with pytest.raises(ValueError, match="max_memory_mib 0"):
        WebhookOptions(max_memory_mib=0)
    with pytest.raises(ValueError, match="device_memory_mib -1"):
        WebhookOptions(device_memory_mib=-1)


@pytest.mark.parametrize(
    ("text", "number", "suffixed"),
    [
        ("30", Decimal(30), False),
        (30, Decimal(30), False),
        ("8Gi", Decimal(8 << 30), True),
        ("500Mi", Decimal(500 << 20), True),
        ("2G", Decimal(2_000_000_000), True),
        ("1.5Ki", Decimal(1536), True),
        ("300m", Decimal("0.3"), True),
        ("1e3", Decimal(1000), False),
        ("-5", Decimal(-5), False),
        (" 12 ", Decimal(12), False),
    ],
)
def test_parse_quantity(text: object, number: Decimal, suffixed: bool) -> None:
    assert parse_quantity(text) == (number, suffixed)


@pytest.mark.parametrize("bad", ["", "8 GB", "Gi", "1.2.3", "abc", "8gi", None, True, [1], float("nan")])
def test_parse_quantity_refuses(bad: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(bad)


# -------------------------------------------------------------------------------------------------- HTTP


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_webhook_app(WebhookOptions(max_memory_mib=81920)))


def test_http_mutate(client: TestClient) -> None:
    obj = pod(container(limits={"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8192", "nvidia.com/gpucores": "30"}))
    reply = client.post("/mutate", json=admission(obj, uid="h-1"))
    assert reply.status_code == 200
    body = reply.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    assert body["response"]["uid"] == "h-1" and body["response"]["allowed"] is True
    after = apply_patch(obj, json.loads(base64.b64decode(body["response"]["patch"])))
    assert limits_of(after) == FLEX_30
    assert after["spec"]["schedulerName"] == SCHEDULER_NAME


def test_http_validate(client: TestClient) -> None:
    good = client.post("/validate", json=admission(pod(container(limits=dict(FLEX_30))), uid="h-2")).json()
    assert good["response"] == {"uid": "h-2", "allowed": True}
    too_big = pod(container(limits={RESOURCE_VXPU: "1", RESOURCE_MEMORY: "96Gi"}))
    bad = client.post("/validate", json=admission(too_big, uid="h-3")).json()["response"]
    assert bad["allowed"] is False and bad["status"]["code"] == 422
    assert "flexai.io/vxpu-memory=96Gi" in bad["status"]["message"]


def test_http_health_metrics_and_bad_bodies(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/mutate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/validate", json=[1, 2]).status_code == 400
    client.post("/mutate", json=admission(pod(container(limits=dict(FLEX_30)))))
    client.post("/mutate", json=admission(pod(container(limits={"cpu": "1"}))))
    metrics = client.get("/metrics").text
    assert 'flexai_webhook_reviews_total{kind="mutate",outcome="patched"} 1' in metrics
    assert 'flexai_webhook_reviews_total{kind="mutate",outcome="allowed"} 1' in metrics
    assert 'flexai_webhook_reviews_total{kind="mutate",outcome="bad_request"} 1' in metrics
    assert 'flexai_webhook_reviews_total{kind="validate",outcome="bad_request"} 1' in metrics
    assert client.get("/mutate").status_code == 405


def test_edge_shapes_of_pods_and_requests() -> None:
    # Requests without the device keys stay as they are; a pod without metadata gets its annotations.
    obj = pod(container(limits={"volcano.sh/vgpu-number": "1", "cpu": "1"}, requests={"cpu": "1"}))
    del obj["metadata"]
    _, after = mutated(obj)
    assert limits_of(after, part="requests") == {"cpu": "1"}
    assert after["metadata"] == {
        "annotations": {ANNOTATION_TRANSLATED: "volcano", ANNOTATION_MEMORY_PERCENTAGE: '{"main": 100}'}
    }
    # containers that is not a list is skipped; a request naming only the resource is still a pod.
    odd = pod(container(limits=dict(FLEX_30)), initContainers={"not": "a list"})
    body = admission(odd)
    del body["request"]["kind"]
    assert review(body, "validate")["response"]["allowed"] is True
    assert review(body, "mutate")["response"]["patchType"] == "JSONPatch"
