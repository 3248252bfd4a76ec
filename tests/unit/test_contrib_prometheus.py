"""contrib/prometheus/ uses only what synapse-acme exports: every metric named in the alert
rules, their tests and the Grafana dashboard is one of synapse_acme.metrics.METRICS, and every
alert rule has a unit test (promtool runs them: tests/integration/test_contrib_prometheus.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from synapse_acme.metrics import METRICS

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
RULES = CONTRIB / "synapse-acme.rules.yml"
RULE_TESTS = CONTRIB / "synapse-acme.rules.test.yml"
DASHBOARD = CONTRIB / "grafana-dashboard.json"

#: PromQL functions, operators and the label names the expressions group or match by.
PROMQL_WORDS = {"sum", "by", "on", "rate", "increase", "time", "bool", "or", "and"}
LABELS = {"name", "instance", "result", "endpoint", "status"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def identifiers(expr: str) -> set[str]:
    """The bare words of a PromQL expression: label matchers, ranges, strings and Grafana
    variables removed."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    return set(_IDENT.findall(expr))


def dashboard_exprs(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(dashboard_exprs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_exprs(item))
    return found


def test_the_dashboard_references_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [e for e in dashboard_exprs(dashboard) if e != "prometheus"]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        expr = re.sub(r"label_values\((\w+), *\w+\)", r"\1", expr)
        words = identifiers(expr)
        unknown = words - set(METRICS) - PROMQL_WORDS - LABELS
        assert not unknown, (expr, unknown)
        used |= words & set(METRICS)
    # Every metric has a panel (the placeholder flag only through status and alerts).
    assert set(METRICS) - used == {"synapse_acme_certificate_placeholder"}


def test_the_alert_rules_reference_only_exported_metrics_and_each_has_a_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules}
    assert alerts == {
        "SynapseAcmeCertificateExpiringSoon",
        "SynapseAcmeRenewalFailing",
        "SynapseAcmeServedCertificateStale",
    }
    for rule in rules:
        words = identifiers(rule["expr"])
        assert words - PROMQL_WORDS <= set(METRICS), rule["expr"]
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    tested: dict[str, list[bool]] = {}
    for case in tests["tests"]:
        for series in case["input_series"]:
            metric = series["series"].split("{", 1)[0]
            assert metric in METRICS, metric
        for check in case["alert_rule_test"]:
            tested.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    # Each alert is tested both firing and not (yet) firing.
    assert {alert: sorted(set(results)) for alert, results in tested.items()} == {
        alert: [False, True] for alert in alerts
    }
