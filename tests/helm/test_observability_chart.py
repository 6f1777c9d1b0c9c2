"""The chart's Grafana dashboard and alerts: rendered by a real helm, the dashboard's queries checked
against the metric names the code exports, the alert rules checked and unit-tested by a real promtool
(built from its Go module by scripts/promtool-build)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import forge_operator.k8s.metrics  # noqa: F401  (registers the operator's metrics)
import forge_operator.training.metrics  # noqa: F401  (registers the trainings' metrics)

ROOT = Path(__file__).resolve().parents[2]
ON = {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}
METRIC = re.compile(r"\bforge_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every series name the operator's registry can export (suffixes included)."""
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("forge_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


@pytest.fixture(scope="module")
def promtool() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "promtool-build")], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"promtool could not be built:\n{out.stderr}"
    return out.stdout.strip()


def rendered(helm, kind: str, values: dict | None = None) -> list[dict]:
    return [d for d in helm.template(values) if d["kind"] == kind]


def test_off_by_default(helm):
    kinds = {d["kind"] for d in helm.template()}
    assert "PrometheusRule" not in kinds
    assert not [d for d in helm.template() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_queries_only_metrics_the_code_exports(helm):
    (cm,) = [d for d in rendered(helm, "ConfigMap", ON) if d["metadata"]["name"] == "forge-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's default label
    assert cm["metadata"]["namespace"] == "forge-system"
    dashboard = json.loads(cm["data"]["forge.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used - exported_names() == set(), "the dashboard queries metrics nobody exports"
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Loss", "Tokens/s (all GPUs)", "MFU", "ETA", "Restarts", "GPU-hours", "Reconcile duration"):
        assert wanted in titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    elsewhere = rendered(helm, "ConfigMap", {**ON, "grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                                                       "labels": {"grafana_dashboard": "forge"}}})
    (cm,) = [d for d in elsewhere if d["metadata"]["name"] == "forge-dashboard"]
    assert (cm["metadata"]["namespace"], cm["metadata"]["labels"]["grafana_dashboard"]) == ("monitoring", "forge")


def test_alert_rules_pass_promtool_checks_and_unit_tests(helm, promtool, tmp_path):
    (rule,) = rendered(helm, "PrometheusRule", ON)
    groups = rule["spec"]["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    assert alerts == {"ForgeTrainingStalled", "ForgeTrainingRestartingRepeatedly", "ForgeTrainingGPUBudgetNearlySpent",
                      "ForgeOperatorNotReconciling", "ForgeOperatorReconcileErrors"}
    used = {m for g in groups for r in g["rules"] for m in METRIC.findall(r["expr"])}
    assert used - exported_names() == set(), "an alert on a metric nobody exports"

    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(ROOT / "tests" / "helm" / "alerts.test.yaml", tmp_path)
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts.test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout + test.stderr


def test_operator_logs_and_values_are_checked(helm):
    (deploy,) = rendered(helm, "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["FORGE_LOG_FORMAT"], env["FORGE_LOG_LEVEL"]) == ("json", "info")
    assert "logging" in helm.template_error({"logging": {"format": "xml"}})
    assert "gpuHoursRatio" in helm.template_error({"prometheusRule": {"gpuHoursRatio": 2}})
