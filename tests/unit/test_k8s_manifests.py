"""deploy/k8s/: every manifest validates against the Kubernetes schemas of a pinned version
(bundled by the `kubernetes-validate` package: offline, strict, so an unknown field fails)
and KEDA's resources against their CRD schemas (tests/data/keda/); then the manifests agree
with each other and with the product: the settings they give are a valid configuration,
the grace period covers the shutdown grace, every Secret and key referenced exists, KEDA
watches the queue the workers consume, the pod is sized from BENCHMARKS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sandqueue import metrics
from sandqueue.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
KEDA_SCHEMAS = REPO / "tests/data/keda"
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes still widely run that these manifests target."""
REDIS_SCALER_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                     "usernameFromEnv", "passwordFromEnv", "listName", "listLength",
                     "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"}
PROMETHEUS_SCALER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold",
                          "namespace", "customHeaders", "ignoreNullValues", "queryParameters",
                          "unsafeSsl", "authModes"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


FILES = sorted(K8S.rglob("*.yaml"))
DEFAULT = [d for f in FILES if f.parent == K8S for d in _documents(f)]
"""What `kubectl apply -f deploy/k8s/` applies (not optional/)."""


def _one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs or DEFAULT
                if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _container(deployment: str) -> dict[str, Any]:
    spec = _one("Deployment", deployment)["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    return container


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_its_schema(path: Path) -> None:
    docs = _documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            schema = json.loads((KEDA_SCHEMAS / f"{doc['kind'].lower()}.schema.json").read_text())
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "sandqueue"


def test_the_validation_fails_on_a_wrong_manifest() -> None:
    """The schemas do catch mistakes (a misspelt field, a number where KEDA wants text)."""
    worker = json.loads(json.dumps(_one("Deployment", "sandqueue-worker")))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(_one("ScaledObject", "sandqueue-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 50
    schema = json.loads((KEDA_SCHEMAS / "scaledobject.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, schema)


def _secret_data(name: str) -> dict[str, str]:
    secret = _one("Secret", name)
    data: dict[str, str] = secret["stringData"]
    return data


def _environment(deployment: str) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (references resolved)."""
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(_secret_data(source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["key"] in _secret_data(ref["name"]), ref
            env[item["name"]] = _secret_data(ref["name"])[ref["key"]]
    return env


@pytest.mark.parametrize("deployment", ["sandqueue-worker", "sandqueue-api"])
def test_the_settings_the_manifests_give_are_a_valid_configuration(
        deployment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _environment(deployment)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(_env_file=None)
    assert settings.redis_url.endswith("@sandqueue-redis:6379/0")
    assert settings.provider == "e2b"
    if deployment == "sandqueue-worker":
        assert settings.metrics_port and settings.metrics_host == "0.0.0.0"
        assert settings.pool == "threads" and settings.health_file


def test_the_worker_is_given_time_to_hand_its_tasks_back() -> None:
    grace = float(_environment("sandqueue-worker")["SANDQUEUE_SHUTDOWN_GRACE_S"])
    pod = _one("Deployment", "sandqueue-worker")["spec"]["template"]["spec"]
    margin = pod["terminationGracePeriodSeconds"] - grace
    assert 15 <= margin <= 120, "grace + time for the hand-back, not much more"


def test_the_worker_pod_is_sized_from_the_density_benchmark() -> None:
    bench = (REPO / "BENCHMARKS.md").read_text()
    in_flight, peak_mb = map(int, re.search(
        r"\| (\d+) in flight in one process.*?peak RSS \*\*(\d+) MB\*\*", bench).groups())
    concurrency = int(_environment("sandqueue-worker")["SANDQUEUE_CONCURRENCY"])
    assert concurrency <= in_flight, "more in flight per pod than the benchmark measured"
    resources = _container("sandqueue-worker")["resources"]
    request = _mebibytes(resources["requests"]["memory"])
    assert request >= peak_mb * 1.5, "headroom over the measured peak"
    assert _mebibytes(resources["limits"]["memory"]) >= request


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def test_the_worker_exposes_its_metrics_port_to_prometheus() -> None:
    env = _environment("sandqueue-worker")
    template = _one("Deployment", "sandqueue-worker")["spec"]["template"]
    ports = {p["containerPort"] for p in _container("sandqueue-worker")["ports"]}
    assert int(env["SANDQUEUE_METRICS_PORT"]) in ports
    assert template["metadata"]["annotations"]["prometheus.io/port"] == \
        env["SANDQUEUE_METRICS_PORT"]


def test_redis_persists_on_a_volume() -> None:
    redis_set = _one("StatefulSet", "sandqueue-redis")
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    container = redis_set["spec"]["template"]["spec"]["containers"][0]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.mark.parametrize("variant", ["keda.yaml", "optional/keda-inflight.yaml"])
def test_keda_scales_the_worker_deployment_on_its_queue(variant: str) -> None:
    docs = _documents(K8S / variant) + DEFAULT
    scaled = _one("ScaledObject", "sandqueue-worker", _documents(K8S / variant))
    assert _one("Deployment", scaled["spec"]["scaleTargetRef"]["name"], docs)
    env = _environment("sandqueue-worker")
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] == "redis":
            assert set(meta) <= REDIS_SCALER_KEYS
            assert meta["listName"] == env["SANDQUEUE_QUEUE"]
            assert meta["listLength"] == env["SANDQUEUE_CONCURRENCY"]
            host = meta["address"].split(".")[0]
            assert _one("Service", host)["spec"]["ports"][0]["port"] == \
                int(meta["address"].rsplit(":", 1)[1])
            auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["key"] in _secret_data(ref["name"])
        else:
            assert trigger["type"] == "prometheus" and set(meta) <= PROMETHEUS_SCALER_KEYS
            names = set(re.findall(r"\bsandqueue_[a-z_]+\b", meta["query"]))
            assert names and names <= metrics.registered_names()
            assert meta["threshold"] == env["SANDQUEUE_CONCURRENCY"]
    cap = int(env["SANDQUEUE_MAX_LIVE_SANDBOXES"])
    per_worker = int(env["SANDQUEUE_CONCURRENCY"])
    assert scaled["spec"]["maxReplicaCount"] <= -(-cap // per_worker) + 1, \
        "workers beyond the fleet's sandbox cap would only wait for slots"
