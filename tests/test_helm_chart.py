"""The Helm chart charts/flexai, checked without a cluster.

Without the ``helm`` binary (the usual case here) the templates are checked statically: balanced actions
and blocks, every ``.Values`` reference present in values.yaml, only known kinds and apiVersions, and the
files kept free of template logic (the KubeSchedulerConfiguration, RBAC, ServiceAccounts) rendered with a
few value substitutions and parsed. With ``helm`` on PATH, ``helm lint`` and ``helm template`` run too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from flexai.k8s import names  # noqa: E402

CHART = Path(__file__).resolve().parents[1] / "charts" / "flexai"
TEMPLATES = CHART / "templates"
RELEASE_NAMESPACE = "flexai-system"
FULLNAME = "flexai"  # what "flexai.fullname" gives for `helm install flexai charts/flexai`

ALLOWED_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
EXPECTED_KINDS = {kind for _, kind in ALLOWED_KINDS}

ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
OPENERS = ("if", "range", "with", "define", "block")


def template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.is_file())


def manifest_files() -> list[Path]:
    return [p for p in template_files() if p.suffix == ".yaml"]


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.strip(".").split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------- static checks


def test_chart_yaml() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "flexai"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]


def test_values_document_every_area(values: dict[str, Any]) -> None:
    assert set(values) >= {"image", "agent", "scheduler", "webhook", "rbac", "metrics"}
    assert values["agent"]["devices"] == "auto"
    assert 1000 % values["agent"]["shareStepMilli"] == 0
    assert values["scheduler"]["kubeScheduler"]["image"]["repository"] == "registry.k8s.io/kube-scheduler"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", values["scheduler"]["kubeScheduler"]["image"]["tag"])
    assert isinstance(values["scheduler"]["replicas"], int)
    assert isinstance(values["scheduler"]["extender"]["port"], int)
    assert isinstance(values["scheduler"]["leaderElection"]["enabled"], bool)
    assert isinstance(values["webhook"]["certManager"]["enabled"], bool)
    assert set(values["webhook"]["tls"]) == {"secretName", "caBundle"}
    assert isinstance(values["rbac"]["create"], bool)
    assert values["metrics"]["serviceMonitor"]["enabled"] is False
    # Every key is documented: a comment line sits above each top-level section.
    text = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(text):
        if re.match(r"^[a-zA-Z]", line):
            assert text[i - 1].startswith("#"), f"values.yaml: {line!r} has no comment above it"


def test_expected_templates_exist() -> None:
    present = {p.name for p in template_files()}
    assert present >= {
        "_helpers.tpl",
        "NOTES.txt",
        "agent-daemonset.yaml",
        "scheduler-configmap.yaml",
        "scheduler-deployment.yaml",
        "webhook.yaml",
        "webhook-configurations.yaml",
        "certificate.yaml",
        "rbac.yaml",
        "serviceaccounts.yaml",
        "servicemonitor.yaml",
        "queues-configmap.yaml",
    }


@pytest.mark.parametrize("path", template_files(), ids=lambda p: p.name)
def test_actions_and_blocks_are_balanced(path: Path) -> None:
    text = path.read_text()
    # Every "{{" closes before the next one opens, and no "}}" stands outside an action.
    outside = ACTION.sub("", text)
    assert "{{" not in outside and "}}" not in outside, f"{path.name}: unbalanced {{{{ }}}}"
    for match in ACTION.finditer(text):
        assert "{{" not in match.group(2), f"{path.name}: nested action {match.group(0)!r}"
    stack: list[str] = []
    for match in ACTION.finditer(text):
        body = match.group(2).strip()
        if body.startswith("/*"):
            assert body.endswith("*/"), f"{path.name}: unclosed comment"
            continue
        word = body.split(" ", 1)[0] if body else ""
        if word in OPENERS:
            stack.append(word)
        elif word == "end":
            assert stack, f"{path.name}: {{{{ end }}}} without an open block"
            stack.pop()
        elif word == "else":
            assert stack and stack[-1] in ("if", "with", "range"), f"{path.name}: else outside if/with/range"
    assert not stack, f"{path.name}: unclosed {stack}"


@pytest.mark.parametrize("path", template_files(), ids=lambda p: p.name)
def test_every_values_reference_exists(path: Path, values: dict[str, Any]) -> None:
    for match in ACTION.finditer(path.read_text()):
        for ref in VALUES_REF.findall(match.group(2)):
            try:
                lookup(values, ref)
            except KeyError:
                pytest.fail(f"{path.name}: .Values{ref} is not in values.yaml")


def top_level(doc: str, key: str) -> list[str]:
    return re.findall(rf"^{key}:\s*(\S+)\s*$", doc, re.M)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_kinds_and_api_versions_are_known(path: Path) -> None:
    for doc in re.split(r"^---\s*$", path.read_text(), flags=re.M):
        kinds, versions = top_level(doc, "kind"), top_level(doc, "apiVersion")
        if not kinds and not versions:
            continue  # only comments or template logic between documents
        assert len(kinds) == 1 and len(versions) == 1, f"{path.name}: one kind and apiVersion per document"
        assert (versions[0], kinds[0]) in ALLOWED_KINDS, f"{path.name}: {versions[0]} {kinds[0]} is not allowed"


def test_all_expected_kinds_are_defined() -> None:
    found = set()
    for path in manifest_files():
        found.update(top_level(path.read_text(), "kind"))
    assert found == EXPECTED_KINDS


# ---------------------------------------------------------------------- files rendered by substitution


def render_simple(path: Path, values: dict[str, Any]) -> str:
    """Render a template that has no logic beyond value substitution and whole-line if/end wrappers
    (taken as true): enough for the ConfigMap, RBAC and ServiceAccounts. Fails on anything else."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\{\{-?\s*(if|end|else)\b.*?-?\}\}", stripped):
            continue
        lines.append(line)
    text = "\n".join(lines) + "\n"

    def substitute(match: re.Match[str]) -> str:
        expr = match.group(2).strip()
        if expr.startswith("/*"):
            return ""
        if expr == ".Release.Namespace":
            return RELEASE_NAMESPACE
        if expr == ".Release.Name":
            return "flexai"
        if expr in ('include "flexai.fullname" .', "$fullname"):
            return FULLNAME
        if expr == 'include "flexai.labels" . | nindent 4':  # pragma: no cover - covered by the regex below
            return ""
        nindent = re.fullmatch(r'include "flexai\.(?:selector)?[lL]abels" \. \| nindent (\d+)', expr)
        if nindent:
            return "\n" + " " * int(nindent.group(1)) + "app.kubernetes.io/name: flexai"
        value = re.fullmatch(r"\.Values((?:\.\w+)+)( \| quote)?", expr)
        if value:
            found = lookup(values, value.group(1))
            if isinstance(found, bool):
                return "true" if found else "false"
            return f'"{found}"' if value.group(2) else str(found)
        raise AssertionError(f"{path.name}: {match.group(0)!r} is template logic this check cannot render")

    # "{{-" trims the whitespace before the action (newline included), as Go templates do.
    out = []
    pos = 0
    for match in ACTION.finditer(text):
        chunk = text[pos : match.start()]
        if match.group(1):
            chunk = chunk.rstrip()
        out.append(chunk)
        out.append(substitute(match))
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kube_scheduler_config(configmap: dict[str, Any]) -> dict[str, Any]:
    assert configmap["kind"] == "ConfigMap"
    return yaml.safe_load(configmap["data"]["config.yaml"])


def check_kube_scheduler_config(config: dict[str, Any], values: dict[str, Any]) -> None:
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert config["kind"] == "KubeSchedulerConfiguration"
    assert [p["schedulerName"] for p in config["profiles"]] == [names.SCHEDULER_NAME]
    assert config["leaderElection"]["leaderElect"] is values["scheduler"]["leaderElection"]["enabled"]
    assert config["leaderElection"]["resourceNamespace"] == RELEASE_NAMESPACE
    (extender,) = config["extenders"]
    assert extender["urlPrefix"] == f"http://127.0.0.1:{values['scheduler']['extender']['port']}"
    assert extender["filterVerb"] == "filter"
    assert extender["prioritizeVerb"] == "prioritize"
    assert extender["bindVerb"] == "bind"
    assert extender["weight"] == values["scheduler"]["extender"]["weight"]
    # kube-scheduler sends node names only; the extender's own list+watch is the source of truth.
    assert extender["nodeCacheCapable"] is True
    # kube-scheduler's adaptive sample: the Hi Scheduler nominates a node outside it (status.nominatedNodeName).
    assert config["percentageOfNodesToScore"] == values["scheduler"]["percentageOfNodesToScore"] == 0
    # Preemption is the Hi Scheduler's alone: kube-scheduler's own would choose victims without the slices.
    (profile,) = config["profiles"]
    assert values["scheduler"]["extender"]["hi"] is True
    assert profile["plugins"]["postFilter"]["disabled"] == [{"name": "DefaultPreemption"}]
    assert extender["enableHTTPS"] is False
    managed = {r["name"]: r["ignoredByScheduler"] for r in extender["managedResources"]}
    assert managed == {
        names.RESOURCE_VXPU: False,
        names.RESOURCE_SHARE: True,
        names.RESOURCE_MEMORY: True,
        names.RESOURCE_REMOTE: True,  # no node advertises it: the extender places the remote slice
    }


def test_kube_scheduler_configuration(values: dict[str, Any]) -> None:
    (configmap,) = load_docs(render_simple(TEMPLATES / "scheduler-configmap.yaml", values))
    assert configmap["metadata"]["name"] == f"{FULLNAME}-scheduler-config"
    check_kube_scheduler_config(kube_scheduler_config(configmap), values)


def test_scheduler_pod_runs_kube_scheduler_with_the_extender_sidecar() -> None:
    text = (TEMPLATES / "scheduler-deployment.yaml").read_text()
    assert ".Values.scheduler.kubeScheduler.image.repository" in text
    assert "- --config=/etc/flexai/config.yaml" in text
    assert "- scheduler\n" in text and "- k8s\n" in text
    assert "- --port\n            - {{ .Values.scheduler.extender.port | quote }}" in text
    assert '{{ include "flexai.fullname" . }}-scheduler-config' in text


def test_agent_daemonset_mounts_the_device_plugin_folder() -> None:
    text = (TEMPLATES / "agent-daemonset.yaml").read_text()
    assert "path: /var/lib/kubelet/device-plugins" in text
    assert "mountPath: /var/lib/kubelet/device-plugins" in text
    assert "privileged: {{ .Values.agent.privileged }}" in text
    for arg in ("- agent", "- --devices", "- --node-name", "- $(NODE_NAME)", "fieldPath: spec.nodeName"):
        assert arg in text


def rules_of(docs: list[dict[str, Any]], kind: str, suffix: str) -> list[dict[str, Any]]:
    (role,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return role["rules"]


def test_rbac_is_least_privilege(values: dict[str, Any]) -> None:
    docs = load_docs(render_simple(TEMPLATES / "rbac.yaml", values))
    for doc in docs:
        for rule in doc.get("rules", []):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    assert rules_of(docs, "ClusterRole", "-agent") == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        # Only with agent.remote.enabled (this check renders every "if" as true): the pods' lease-token Secrets.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "update", "delete"]},
    ]
    assert values["agent"]["remote"]["enabled"] is False
    # The extender binds with the placement in the Binding: it patches no pod, only the status of pending ones
    # (nominatedNodeName). It preempts through the Eviction API (PodDisruptionBudgets hold): it deletes no pod.
    scheduler = {(r["resources"][0], tuple(r["verbs"])) for r in rules_of(docs, "ClusterRole", "-scheduler")}
    assert scheduler == {
        ("nodes", ("get", "list", "watch")),
        ("pods", ("get", "list", "watch")),
        ("pods/binding", ("create",)),
        ("pods/status", ("patch",)),
        ("pods/eviction", ("create",)),
        ("events", ("create",)),
    }
    assert rules_of(docs, "Role", "-scheduler-leases") == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert {"system:kube-scheduler", "system:volume-scheduler", "extension-apiserver-authentication-reader"} <= bound
    accounts = load_docs(render_simple(TEMPLATES / "serviceaccounts.yaml", values))
    subjects = {s["name"] for d in docs if "subjects" in d for s in d["subjects"]}
    assert subjects <= {a["metadata"]["name"] for a in accounts}
    webhook_sa = [a for a in accounts if a["metadata"]["name"].endswith("-webhook")]
    assert webhook_sa and webhook_sa[0]["automountServiceAccountToken"] is False


def test_agents_may_change_only_their_own_node(values: dict[str, Any]) -> None:
    """RBAC lets agents patch nodes; the admission policy keeps each to its own Node's inventory annotation."""
    docs = load_docs(render_simple(TEMPLATES / "rbac.yaml", values))
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
    ]
    (who,) = spec["matchConditions"]
    assert (
        who["expression"]
        == f"request.userInfo.username == 'system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}-agent'"
    )
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert "request.userInfo.extra['authentication.kubernetes.io/node-name'][0]" in variables["nodeName"]
    rules = [v["expression"] for v in spec["validations"]]
    assert rules[0] == "variables.nodeName == object.metadata.name"
    assert "k == 'flexai.io/inventory'" in rules[1] and names.ANNOTATION_INVENTORY == "flexai.io/inventory"
    assert "object.spec == oldObject.spec" in rules[2]
    assert values["rbac"]["agentOwnNodePolicy"] is True


def test_agent_and_extender_flags_follow_the_values(values: dict[str, Any]) -> None:
    from flexai.k8s.deviceplugin.plugin import DEVICE_LIST_STRATEGIES

    agent = (TEMPLATES / "agent-daemonset.yaml").read_text()
    assert "- --device-list-strategy\n            - {{ .Values.agent.deviceListStrategy | quote }}" in agent
    assert values["agent"]["deviceListStrategy"] in DEVICE_LIST_STRATEGIES
    scheduler = (TEMPLATES / "scheduler-deployment.yaml").read_text()
    assert "- --assume-ttl\n            - {{ .Values.scheduler.extender.assumeTTLSeconds | quote }}" in scheduler
    assert "- --inventory-timeout\n            - {{ .Values.scheduler.extender.inventoryTimeoutSeconds | quote }}" in (
        scheduler
    )
    assert "- --queues\n            - /etc/flexai/queues/queues.yaml" in scheduler
    assert "name: {{ include \"flexai.fullname\" . }}-queues" in scheduler
    assert values["scheduler"]["extender"]["hi"] is True and values["queues"] == {}
    limits = values["scheduler"]["extender"]["resources"]["limits"]
    assert limits["memory"] == "1Gi"  # the measured footprint at 150,000 pods fits (BENCHMARKS.md)


def test_webhook_configurations_call_the_webhook_paths() -> None:
    text = (TEMPLATES / "webhook-configurations.yaml").read_text()
    assert "path: /mutate" in text and "path: /validate" in text
    assert text.count('admissionReviewVersions: ["v1"]') == 2
    assert text.count('operations: ["CREATE"]') == 2
    assert "cert-manager.io/inject-ca-from" in text
    assert ".Values.webhook.tls.caBundle" in text
    webhook = (TEMPLATES / "webhook.yaml").read_text()
    assert "--tls-cert" in webhook and "--tls-key" in webhook and "path: /healthz" in webhook


# ------------------------------------------------------------------------------------ with helm, if any

HELM = shutil.which("helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="helm is not installed; the static checks above ran")


KUBE_VERSION = ("--kube-version", "1.30.0")
"""Rendered for the oldest Kubernetes with every API the chart can use (helm's own default depends on its build)."""
WITH_VAP = ("--api-versions", "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy")
"""What a 1.30+ API server's discovery tells helm install (helm template knows no kinds offline)."""


def helm_template(*sets: str, extra: tuple[str, ...] = WITH_VAP) -> list[dict[str, Any]]:
    command = [str(HELM), "template", "flexai", str(CHART), "-n", RELEASE_NAMESPACE, *KUBE_VERSION, *extra]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return load_docs(done.stdout)


@needs_helm
def test_helm_lint() -> None:
    done = subprocess.run(
        [str(HELM), "lint", str(CHART), *KUBE_VERSION], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_helm
@pytest.mark.parametrize(
    "sets",
    [
        (),
        (
            "webhook.certManager.enabled=false",
            "webhook.tls.secretName=flexai-tls",
            "webhook.tls.caBundle=Q0E=",
            "metrics.serviceMonitor.enabled=true",
            "agent.privileged=true",
            "agent.runtimeClassName=nvidia",
            "webhook.translateBareGpu=true",
        ),
        ("agent.enabled=false", "webhook.enabled=false"),
    ],
    ids=["defaults", "manual-certs-and-monitoring", "scheduler-only"],
)
def test_helm_template_renders_known_kinds(sets: tuple[str, ...], values: dict[str, Any]) -> None:
    docs = helm_template(*sets)
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) in ALLOWED_KINDS
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-scheduler-config")]
    check_kube_scheduler_config(kube_scheduler_config(configmap), values)
    kinds = {d["kind"] for d in docs}
    assert ("DaemonSet" in kinds) is ("agent.enabled=false" not in sets)
    assert ("ValidatingAdmissionPolicy" in kinds) is ("agent.enabled=false" not in sets)
    assert ("MutatingWebhookConfiguration" in kinds) is ("webhook.enabled=false" not in sets)


@needs_helm
def test_helm_leaves_the_agent_policy_out_where_the_api_server_has_none() -> None:
    kinds = {d["kind"] for d in helm_template(extra=())}  # no ValidatingAdmissionPolicy kind discovered
    assert "ValidatingAdmissionPolicy" not in kinds and "DaemonSet" in kinds


@needs_helm
def test_helm_refuses_manual_certs_without_a_secret() -> None:
    done = subprocess.run(
        [str(HELM), "template", "flexai", str(CHART), *KUBE_VERSION, "--set", "webhook.certManager.enabled=false"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "webhook.tls.secretName is required" in done.stderr
