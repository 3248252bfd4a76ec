"""contrib/prometheus/ under Prometheus's own tool: the rules load, and `promtool test rules`
runs the unit test of every alert rule; a rule with its threshold changed fails them (the
tests are not vacuous)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.integration.prometheus import promtool
from tests.unit.test_contrib_prometheus import CONTRIB, RULE_TESTS, RULES


def test_promtool_checks_the_rules_and_runs_every_alert_test() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_changed_rule_fails_its_test(tmp_path: Path) -> None:
    for name in (RULES.name, RULE_TESTS.name):
        shutil.copy(CONTRIB / name, tmp_path / name)
    for old, new in (
        ("< 14 * 86400", "< 13 * 86400"),
        ("for: 24h", "for: 12h"),
        ("for: 10m", "for: 20m"),
    ):
        rules = (CONTRIB / RULES.name).read_text()
        assert rules.count(old) == 1, old
        (tmp_path / RULES.name).write_text(rules.replace(old, new))
        tested = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
        assert tested.returncode != 0, (old, new, tested.stdout)
