"""deploy/monitoring: the Grafana dashboard's expressions parse (promtool, as recording rules)
and name only metrics and labels the binaries export; the prometheus-adapter rule reads a
metric they export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from checks import REPO

MONITORING = REPO / "deploy/monitoring"


def sources() -> str:
    return "".join(
        p.read_text() for d in ("shared/src", "worker/src", "scheduler/src", "producer/src") for p in (REPO / d).rglob("*.rs")
    )


def exported() -> tuple[set[str], set[str]]:
    """The metrics the binaries describe, and the labels their metrics set."""
    text = sources()
    metrics = set(re.findall(r'describe_\w+!\(\s*"(llmq_\w+)"', text))
    labels = set(re.findall(r'"(\w+)" =>', text)) | {"le"}
    return metrics, labels


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """An expression with Grafana's variables as a query would have them."""
    return expr.replace("$__rate_interval", "5m").replace("$queue", ".*")


def test_the_dashboard_is_generated_from_its_script():
    """grafana-dashboard.json is what dashboard.py writes (run it after changing a panel)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", MONITORING / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads((MONITORING / "grafana-dashboard.json").read_text()) == module.dashboard()


def test_every_dashboard_expression_parses(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is needed: make promtool-deps")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"llmq:dashboard:expr_{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_and_the_adapter_name_only_what_the_binaries_export():
    metrics, labels = exported()
    assert "llmq_queue_backlog" in metrics and "queue" in labels, "the parse of the sources broke"
    adapter = (MONITORING / "prometheus-adapter.yaml").read_text()
    board_exprs = dashboard_exprs()
    for expr in board_exprs + [adapter]:
        for name in re.findall(r"\bllmq_\w+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in metrics, f"{name} is not a metric the binaries export: {expr}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, f"`{label}` is not a label of llmq's metrics: {expr}"
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for p in board["panels"]:
        for t in p.get("targets", []):
            for label in re.findall(r"\{\{(\w+)\}\}", t["legendFormat"]):
                assert label in labels, f"legend `{label}`: {p['title']}"
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "queue"} <= names
