"""The PrometheusRule's alerts, unit-tested with ``promtool test rules``.

promtool comes from Debian's ``prometheus`` package (``./run test`` installs it
as root with apt, like Chromium); without it these tests skip (fail in CI) and
say so. The rules are the base PrometheusRule's ``spec`` (the overlays only add
a label to the object); the tests are ``deploy/prometheus/rules-test.yaml``.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import BASE, DEPLOY, require  # noqa: E402

RULES = BASE / "prometheusrule.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules-test.yaml"


def _promtool() -> str:
    found = shutil.which("promtool")
    require(found, "promtool not installed (Debian: apt-get install prometheus; ./run test does it as root)")
    assert found
    return found


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(RULES.read_text())["spec"]
    return spec


def _run(spec: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(RULE_TESTS, tmp_path / "rules-test.yaml")
    return subprocess.run([_promtool(), "test", "rules", "rules-test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def _alert(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                found: dict[str, Any] = rule
                return found
    raise AssertionError(f"no alert {name}")


def test_rules_are_valid(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_spec()))
    proc = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_fire_as_specified(tmp_path: Path) -> None:
    proc = _run(_spec(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The rule tests are not a no-op: an auth alert that cannot fire, or a not-ready
    alert that ignores bridge_ready, fails them."""
    for name, expr in (
        ("MediaBridgeCartesiaAuthFailing",
         'sum by (namespace, pod, status) (rate(bridge_cartesia_errors_total{status="429"}[5m])) > 0'),
        ("MediaBridgeNotReady", "max by (namespace, pod) (bridge_ready) == 1"),
    ):
        spec = copy.deepcopy(_spec())
        _alert(spec, name)["expr"] = expr
        proc = _run(spec, tmp_path)
        assert proc.returncode != 0, f"breaking {name} went unnoticed"
        assert name in proc.stdout + proc.stderr


def test_auth_alert_names_the_credential() -> None:
    alert = _alert(_spec(), "MediaBridgeCartesiaAuthFailing")
    assert alert["labels"]["severity"] == "page"
    assert "CARTESIA_API_KEY" in alert["annotations"]["description"]
    assert '401|403' in alert["expr"]
