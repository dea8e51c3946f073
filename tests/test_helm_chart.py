"""deploy/helm/kv-indexer: the chart rendered by Helm's own Go SDK (helm-python-sdk, no
cluster and no network), every object validated against the Kubernetes API schemas of
pinned versions (kubernetes-validate, strict: unknown fields fail), every pod checked
against Pod Security "restricted", and the commands the pods run put through the real
argument parsers. Broken values must fail the render or the validation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from indexer.config import parse_service_config
from kvcore import __version__
from publisher.cli import BRIDGE_SETTINGS, parse_bridge_args
from tests.support.pod_security import pod_spec_of, restricted_violations

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "kv-indexer"
# The oldest Kubernetes the chart supports (gRPC probes are GA from 1.27) and a recent one.
KUBE_VERSIONS = ("1.27.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # Prometheus Operator: no schema shipped
EVERYTHING_ON: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "workers": {"vllm": {"enabled": True}, "sglang": {"enabled": True}},
}

Doc = dict[str, Any]


def render(values: dict[str, Any] | None = None) -> list[Doc]:
    """The chart's objects for a release `kvi` in namespace `serving`."""
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name="kvi", namespace="serving")
    docs = []
    for template, text in sorted(rendered.items()):
        if template.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def schema_errors(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} on {version}: "
                                f"{exc.message} at {list(exc.path)}")
    return problems


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pods(docs: list[Doc]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        spec = pod_spec_of(doc)
        if spec is not None:
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec


def env_of(container: Doc) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def defaults() -> list[Doc]:
    return render()


@pytest.fixture(scope="module")
def everything() -> list[Doc]:
    return render(EVERYTHING_ON)


def test_chart_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    """`helm lint --strict` finds nothing above info (the chart has no icon: info)."""
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    broken = helm.lint(str(CHART), {"indexer": {"replicas": "two"}}, strict=True)
    assert any("replicas" in error for error in broken["errors"])


def test_default_objects(defaults: list[Doc]) -> None:
    """Deployment, Service, headless Service, PDB and ServiceAccount; nothing optional."""
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in defaults)
    assert kinds == [("Deployment", "kvi-kv-indexer"), ("PodDisruptionBudget", "kvi-kv-indexer"),
                     ("Service", "kvi-kv-indexer"), ("Service", "kvi-kv-indexer-headless"),
                     ("ServiceAccount", "kvi-kv-indexer")]
    assert one(defaults, "Service", "kvi-kv-indexer-headless")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_validates_against_kubernetes_schemas(values: dict[str, Any]) -> None:
    docs = render(values)
    assert len(docs) >= 5
    assert schema_errors(docs) == []


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_pods_meet_restricted_pod_security(values: dict[str, Any]) -> None:
    found = list(pods(render(values)))
    assert found
    assert {name: restricted_violations(spec) for name, spec in found} == {
        name: [] for name, _ in found}


def test_indexer_probes_and_ports(defaults: list[Doc]) -> None:
    """gRPC health probes on the gRPC port; the Services reach the named ports."""
    deployment = one(defaults, "Deployment", "kvi-kv-indexer")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("kvi-kv-indexer", "kvi-kv-indexer-headless"):
        service = one(defaults, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    pdb = one(defaults, "PodDisruptionBudget", "kvi-kv-indexer")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_indexer_configuration_parses(defaults: list[Doc]) -> None:
    """The container's args and KV_INDEXER_* variables pass `kv-indexer serve`'s parser."""
    (container,) = one(defaults, "Deployment", "kvi-kv-indexer")["spec"]["template"]["spec"][
        "containers"]
    env = {k: v for k, v in env_of(container).items() if v is not None}
    config = parse_service_config(container["args"], environ=env)
    assert config.redis_url == "redis://redis-master:6379/0"
    assert config.nats_url == "nats://nats:4222"
    assert config.grpc_listen == "0.0.0.0:50051"
    assert config.metrics_listen == "0.0.0.0:9400"
    assert config.partitions == 8
    assert str(config.data_dir).startswith("/data/")  # the writable emptyDir


def test_url_secrets_replace_values() -> None:
    docs = render({"indexer": {"natsUrlSecret": {"name": "urls", "key": "nats"},
                               "redisUrlSecret": {"name": "urls", "key": "redis"}}})
    (container,) = one(docs, "Deployment", "kvi-kv-indexer")["spec"]["template"]["spec"][
        "containers"]
    by_name = {e["name"]: e for e in container["env"]}
    for name, key in (("KV_INDEXER_NATS_URL", "nats"), ("KV_INDEXER_REDIS_URL", "redis")):
        assert by_name[name] == {"name": name, "valueFrom": {"secretKeyRef": {
            "name": "urls", "key": key}}}
    assert schema_errors(docs) == []


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_worker_sidecar_matches_its_engine(everything: list[Doc], flavor: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's --kv-events-config, model and block size agree with its sidecar, whose
    environment passes `kv-publisher bridge`'s parser; engine images are pinned."""
    spec = one(everything, "Deployment", f"kvi-kv-indexer-{flavor}")["spec"]["template"]["spec"]
    engine, sidecar = spec["containers"]
    assert sidecar["name"] == "kv-publisher"
    tag = engine["image"].rpartition(":")[2]
    assert tag and tag != "latest" and "/" not in tag, engine["image"]
    args = engine["args"]
    config = json.loads(args[args.index("--kv-events-config") + 1])
    assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
    for name in {f"KV_PUBLISHER_{suffix}" for _flag, suffix, *_ in BRIDGE_SETTINGS}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env_of(sidecar).items():
        monkeypatch.setenv(name, value if value is not None else "10.0.0.1")
    bridge = parse_bridge_args([])
    assert bridge.flavor == flavor
    for bridge_side, engine_side in ((bridge.zmq_endpoint, config["endpoint"]),
                                     (bridge.replay_endpoint, config["replay_endpoint"])):
        assert urlsplit(bridge_side).hostname == "127.0.0.1"
        assert urlsplit(bridge_side).port == urlsplit(engine_side.replace("*", "x")).port
    assert bridge.topic == config["topic"]
    model_flag, block_flag = (("--model", "--block-size") if flavor == "vllm"
                              else ("--model-path", "--page-size"))
    assert bridge.model == args[args.index(model_flag) + 1]
    assert bridge.block_size == args[args.index(block_flag) + 1]


def test_monitors_select_what_exists(everything: list[Doc]) -> None:
    """ServiceMonitor (Prometheus Operator CRD, no schema here) selects the Service's labels
    and names its metrics port; the PodMonitor names the sidecars' port."""
    service = one(everything, "Service", "kvi-kv-indexer")
    monitor = one(everything, "ServiceMonitor", "kvi-kv-indexer")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    pod_monitor = one(everything, "PodMonitor", "kvi-kv-indexer-publishers")
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    for flavor in ("vllm", "sglang"):
        worker = one(everything, "Deployment", f"kvi-kv-indexer-{flavor}")
        assert selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "bridge-metrics"


def test_network_policy_admits_grpc_and_metrics(everything: list[Doc]) -> None:
    policy = one(everything, "NetworkPolicy", "kvi-kv-indexer")
    ports = [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]]
    assert ports == ["grpc", "metrics"]


# --- broken values fail ---------------------------------------------------------------------

@pytest.mark.parametrize(("values", "says"), [
    ({"indexer": {"replicas": "two"}}, "replicas"),
    ({"indexer": {"natsUrl": "http://nats:4222"}}, "natsUrl"),
    ({"workers": {"vllm": {"image": "vllm/vllm-openai:latest"}}}, "image"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"indexer": {"redisUrl": ""}}, "redisUrl"),  # two replicas, no shared index
    ({"indexer": {"partitions": 2}}, "partitions"),  # not above the replicas
], ids=["replicas-not-int", "nats-scheme", "latest-tag", "pull-policy", "no-redis", "partitions"])
def test_broken_values_fail_the_render(values: dict[str, Any], says: str) -> None:
    with pytest.raises(helm.HelmError, match=says):
        render(values)


def test_values_helm_accepts_but_kubernetes_refuses_are_caught() -> None:
    """A probe period that is no integer passes the chart's schema but not the API's."""
    docs = render({"indexer": {"probes": {"readiness": {"periodSeconds": "often"}}}})
    assert any("periodSeconds" in p or "often" in p for p in schema_errors(docs))


def test_restricted_check_catches_each_rule(defaults: list[Doc]) -> None:
    """The checker is no rubber stamp: each weakening of the indexer's pod is reported."""
    base = pod_spec_of(one(defaults, "Deployment", "kvi-kv-indexer"))
    assert base is not None and restricted_violations(base) == []
    weakenings = {
        "no seccomp": lambda s: [c["securityContext"].pop("seccompProfile") for c in
                                 s["containers"]] + [s["securityContext"].pop("seccompProfile")],
        "root": lambda s: s["securityContext"].update(runAsNonRoot=False) or [
            c["securityContext"].pop("runAsNonRoot") for c in s["containers"]],
        "escalation": lambda s: s["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"),
        "capabilities": lambda s: s["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "hostPort": lambda s: s["containers"][0]["ports"][0].update(hostPort=50051),
    }
    for name, weaken in weakenings.items():
        spec = copy.deepcopy(base)
        weaken(spec)
        assert restricted_violations(spec), name
