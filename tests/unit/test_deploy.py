"""deploy/kubernetes: the core objects against Kubernetes' own schemas, the KEDA and
ServiceMonitor objects for the fields they need (tests/process/test_deploy_validate.py runs the
ConfigMap's mappings through `workers validate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from workers.app.wiring import DRAIN_MARGIN_S

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return document


@pytest.mark.parametrize(
    "name", ["configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml"]
)
def test_core_objects_match_kubernetes_schemas(name: str) -> None:
    # strict: an unknown field (a typo) is an error, as `kubectl apply --validate=strict` says.
    kubernetes_validate.validate(load(name), kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_drain_and_wiring() -> None:
    deployment, service = load("deployment.yaml"), load("service.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][-2:] == ["run", "/etc/esm-workers/mappings.yaml"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"secretRef": {"name": "esm-workers"}} in container["envFrom"]
    assert pod["volumes"][0]["configMap"]["name"] == load("configmap.yaml")["metadata"]["name"]
    mappings = yaml.safe_load(load("configmap.yaml")["data"]["mappings.yaml"])
    port = mappings["metrics"]["port"]
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert mappings["metrics"]["host"] == "0.0.0.0"
    # The drain on SIGTERM may take the longest function timeout and the settling after it;
    # Kubernetes must wait longer before it kills the pod.
    longest = max(f.get("timeout_s", 30) for f in mappings["functions"].values())
    assert pod["terminationGracePeriodSeconds"] > longest + DRAIN_MARGIN_S
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitor_scrapes_the_metrics_port() -> None:
    monitor, service = load("servicemonitor.yaml"), load("service.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def test_keda_scaled_object_scales_the_deployment_on_lag() -> None:
    scaled = load("keda-scaledobject.yaml")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert metadata["serverAddress"].startswith("http")
    assert "esm_offset_lag" in metadata["query"] and "esm_stalled_units" in metadata["query"]
    assert float(metadata["threshold"]) > 0  # KEDA takes the threshold as a string
