"""Offline checks of deploy/: the image recipe, the Kubernetes manifests and the monitoring.

- every kustomization renders (``kubectl kustomize``) and every object validates in strict mode
  against several Kubernetes versions; the two prometheus-operator CRDs against their pydantic models;
- cross-references: selectors, ports, probe paths, scale targets, grace >= drain, secrets by reference,
  the ConfigMap through the bridge's own config validation, the Cartesia plan budget;
- every metric name used by the HPA, the adapter rule, the alerts and the dashboard is declared by the
  bridge's /metrics (a real ``media-bridge serve`` subprocess, plus a fast in-process check);
- hadolint on the Dockerfile, yamllint on deploy/.

Nothing here needs a cluster or a container engine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import (  # noqa: E402
    ADAPTER_VALUES,
    BASE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    LOADTEST,
    OVERLAYS,
    REPO,
    SERIES_LABELS,
    TARGET_LABELS,
    Exposition,
    Selector,
    adapter_exprs,
    by_kind,
    configmap_env,
    free_port,
    grafana_exprs,
    kustomizations,
    load_json,
    metric_label_names,
    one,
    overlay_dirs,
    parse_exposition,
    pod_templates,
    promql_selectors,
    render,
    require,
    selector_matches,
)

#: Kubernetes versions every rendered object must validate against (kubernetes-validate 1.37 ships 1.32-1.37).
K8S_VERSIONS = ("1.32.0", "1.35.0", "1.37.0")
#: Custom resources kubernetes-validate has no schema for; validated by test_crds_validate instead.
KNOWN_CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
#: The app's HTTP surface (bridge/server.py), the contract these manifests rely on.
APP_PATHS = {
    "/twilio/voice",
    "/twilio/stream-status",
    "/twilio/connect-action",
    "/twilio/media",
    "/metrics",
    "/healthz",
    "/readyz",
}
PLAN_ANNOTATION = "media-bridge/cartesia-plan-concurrency"
DUMMY_SECRETS = {
    "TWILIO_AUTH_TOKEN": "test-token",
    "CARTESIA_API_KEY": "sk-test",
    "AGENT_TOKEN": "agent-test",
}

KUSTOMIZATIONS = kustomizations()
OVERLAYS_ = overlay_dirs()


def _id(p: Path) -> str:
    return str(p.relative_to(DEPLOY / "k8s"))


def bridge_deployment(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    deployment: dict[str, Any] = one(docs, "Deployment")
    return deployment


def bridge_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = bridge_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def pod_labels(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    labels: dict[str, str] = bridge_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    return labels


def duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value))


# --- Rendering and schema validation --------------------------------------------------------------


def test_layout() -> None:
    for path in (
        DOCKERFILE,
        REPO / ".dockerignore",
        DEPLOY / "README.md",
        DEPLOY / ".yamllint",
        DASHBOARD,
        ADAPTER_VALUES,
        BASE / "kustomization.yaml",
        OVERLAYS / "production" / "kustomization.yaml",
        LOADTEST / "job.yaml",
    ):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_kustomize_renders(path: Path) -> None:
    docs = render(path)
    kinds = {d["kind"] for d in docs}
    if path.parent == OVERLAYS:
        expected = {
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ServiceMonitor",
            "PrometheusRule",
        }
        assert expected <= kinds, f"{_id(path)} lacks {expected - kinds}"
        if path.name == "production":
            assert "Ingress" in kinds
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert namespaces == {one(docs, "Namespace")["metadata"]["name"]}, (
            "every object in the overlay's namespace"
        )
    else:
        assert kinds == {"Job"}
    assert not by_kind(docs, "Secret"), "secrets are created out of band, never rendered from the repo"


def _validate(obj: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_kubernetes_validate_strict(path: Path, version: str) -> None:
    import kubernetes_validate

    errors = []
    for obj in render(path):
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            _validate(obj, version)
        except kubernetes_validate.SchemaNotFoundError as e:
            # kubernetes-validate only warns about these; an unknown API is an error here.
            if key not in KNOWN_CRDS:
                errors.append(f"{where}: no schema (unknown API or CRD): {e.message}")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    assert not errors, f"k8s {version}:\n" + "\n".join(errors)


def test_strict_validation_is_not_a_noop() -> None:
    """The validator rejects an unknown field and an unknown kind, so the test above means something."""
    import kubernetes_validate

    deployment = copy.deepcopy(bridge_deployment(render(OVERLAYS / "production")))
    _validate(deployment, K8S_VERSIONS[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, K8S_VERSIONS[0])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        _validate(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}, K8S_VERSIONS[0]
        )


def _crd_model(kind: str) -> Any:
    from cloudcoil.models.prometheus_operator import v1

    return {"ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}[kind]


def _validate_crd(obj: dict[str, Any]) -> None:
    """Validate with the prometheus-operator pydantic models, strictly.

    The models ignore unknown fields; dumping what was set and comparing with the input catches them
    (a misspelt ``interval`` or ``annotations`` would otherwise be silently dropped by the operator).
    """
    model = _crd_model(obj["kind"]).model_validate(obj)
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped == obj, f"{obj['kind']}/{obj['metadata']['name']}: fields the CRD does not know:\n" + _diff(
        obj, dumped
    )


def _diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return "".join(_diff(a[k], b.get(k, "<missing>"), f"{path}.{k}") for k in a)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return "".join(_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    return "" if a == b else f"  {path}: {a!r} != {b!r}\n"


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_crds_validate(path: Path) -> None:
    docs = render(path)
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in KNOWN_CRDS]
    assert {d["kind"] for d in crds} == {"ServiceMonitor", "PrometheusRule"}
    for obj in crds:
        _validate_crd(obj)


def test_crd_validation_is_not_a_noop() -> None:
    sm = copy.deepcopy(one(render(OVERLAYS / "production"), "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="intervall"):
        _validate_crd(sm)
    sm["spec"]["endpoints"][0] = {"port": "http", "interval": "fifteen seconds"}
    with pytest.raises(Exception, match="interval"):
        _validate_crd(sm)


# --- Cross-references -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_selectors_and_ports(path: Path) -> None:
    docs = render(path)
    dep = bridge_deployment(docs)
    labels = pod_labels(docs)
    container = bridge_container(docs)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert selector_matches(dep["spec"]["selector"], labels), "Deployment selector must match its pods"

    svc = one(docs, "Service")
    assert selector_matches(svc["spec"]["selector"], labels), "Service selector must match the bridge pods"
    for port in svc["spec"]["ports"]:
        target = port["targetPort"]
        assert target in port_names or target in port_names.values(), (
            f"Service targetPort {target} not a container port"
        )
    assert svc["spec"].get("sessionAffinity", "None") == "None"

    # The container serves on the port it declares.
    args = container["args"]
    assert args[0] == "serve"
    assert int(args[args.index("--port") + 1]) == port_names["http"]
    assert args[args.index("--host") + 1] == "0.0.0.0"

    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    types = {m["type"] for m in hpa["spec"]["metrics"]}
    assert {"Pods", "Resource"} <= types, "scale on active calls per pod and on CPU"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = one(docs, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], labels), "PDB must select the bridge pods"
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"], "PDB would block every eviction"

    sm = one(docs, "ServiceMonitor")
    assert selector_matches(sm["spec"]["selector"], svc["metadata"]["labels"]), (
        "ServiceMonitor must select the Service"
    )
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports, f"ServiceMonitor port {ep['port']} not on the Service"
        assert ep.get("path", "/metrics") == "/metrics"
        assert duration_s(ep.get("scrapeTimeout", "10s")) <= duration_s(ep.get("interval", "30s"))

    np_ = one(docs, "NetworkPolicy")
    assert selector_matches(np_["spec"]["podSelector"], labels), "NetworkPolicy must apply to the bridge pods"
    for rule in np_["spec"]["ingress"]:
        for port in rule.get("ports") or []:
            assert port["port"] in port_names or port["port"] in port_names.values(), (
                f"NetworkPolicy port {port}"
            )

    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            paths = rule["http"]["paths"]
            for p in paths:
                backend = p["backend"]["service"]
                assert backend["name"] == svc["metadata"]["name"]
                assert backend["port"].get("name") in svc_ports or backend["port"].get("number") in {
                    sp["port"] for sp in svc["spec"]["ports"]
                }
            exposed = {a for a in APP_PATHS if any(_ingress_routes(p, a) for p in paths)}
            twilio = {"/twilio/voice", "/twilio/stream-status", "/twilio/connect-action", "/twilio/media"}
            assert exposed == twilio, (
                f"Ingress must expose exactly Twilio's endpoints, exposes {sorted(exposed)}"
            )


def _ingress_routes(path: dict[str, Any], app_path: str) -> bool:
    prefix = str(path["path"])
    if path["pathType"] == "Exact":
        return app_path == prefix
    return app_path == prefix or app_path.startswith(prefix.rstrip("/") + "/")


def test_ingress_websocket_timeouts() -> None:
    ing = one(render(OVERLAYS / "production"), "Ingress")
    ann = ing["metadata"]["annotations"]
    for key in (
        "nginx.ingress.kubernetes.io/proxy-read-timeout",
        "nginx.ingress.kubernetes.io/proxy-send-timeout",
    ):
        assert int(ann[key]) >= 3600, f"{key} must outlive a call"
    assert ing["spec"].get("tls"), "Twilio needs https/wss"
    public = urlsplit(
        configmap_env(render(OVERLAYS / "production"), bridge_container(render(OVERLAYS / "production")))[
            "PUBLIC_URL"
        ]
    )
    assert public.scheme == "https"
    assert public.hostname in {r["host"] for r in ing["spec"]["rules"]}, (
        "PUBLIC_URL host must be the Ingress host"
    )
    assert public.hostname in {h for t in ing["spec"]["tls"] for h in t["hosts"]}


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_probes_and_drain(path: Path) -> None:
    docs = render(path)
    container = bridge_container(docs)
    pod = bridge_deployment(docs)["spec"]["template"]["spec"]
    port_names = {p["name"] for p in container["ports"]}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in APP_PATHS, f"{kind} path {probe['path']} is not served by the bridge"
        assert probe["port"] in port_names
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", "drain relies on /readyz going 503"

    env = configmap_env(docs, container)
    from bridge.config import ENV_VARS

    drain = float(env.get("DRAIN_GRACE_S") or ENV_VARS["DRAIN_GRACE_S"][0] or 0)
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop["exec"]["command"]
        pre_stop_s = float(next(c for c in reversed(cmd) if re.fullmatch(r"\d+(\.\d+)?", c)))
    assert pre_stop_s >= 2 * container["readinessProbe"].get("periodSeconds", 10) or pre_stop_s >= 5
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= drain + pre_stop_s + 5, (
        f"terminationGracePeriodSeconds {grace} < DRAIN_GRACE_S {drain} + preStop {pre_stop_s} + 5 s to close"
    )

    strategy = bridge_deployment(docs)["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0", "0%"), "never drop capacity in a rollout"


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_pods_are_restricted_and_sized(path: Path) -> None:
    for workload, template in pod_templates(render(path)):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("readOnlyRootFilesystem") is True
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (
                    f"{workload['kind']} {c['name']}: {key}"
                )


def _mib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)?", quantity)
    assert m, quantity
    return float(m.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, None: 1 / 2**20}[m.group(2)]


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_sizing_follows_max_calls(path: Path) -> None:
    """<= 1 MB RSS per call plus the interpreter fits the limit; the HPA acts before MAX_CALLS refuses."""
    docs = render(path)
    container = bridge_container(docs)
    env = configmap_env(docs, container)
    max_calls = int(env["MAX_CALLS"])
    assert _mib(container["resources"]["limits"]["memory"]) >= max_calls * 1.0 + 256
    hpa = one(docs, "HorizontalPodAutoscaler")
    (calls_metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    target = float(calls_metric["pods"]["target"]["averageValue"])
    assert 0.5 * max_calls <= target <= 0.8 * max_calls, "scale out well before MAX_CALLS refuses calls"


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_secrets_by_reference(path: Path) -> None:
    docs = render(path)
    container = bridge_container(docs)
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in container["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert {"TWILIO_AUTH_TOKEN", "CARTESIA_API_KEY"} <= set(refs)
    for name in ("TWILIO_AUTH_TOKEN", "CARTESIA_API_KEY"):
        assert not refs[name].get("optional"), (
            f"{name} must be required: unset means unsigned / embedded emulator"
        )
    for cm in by_kind(docs, "ConfigMap"):
        assert not set(cm.get("data") or {}) & set(DUMMY_SECRETS), "secret in a ConfigMap"
    assert not [v for v in container["env"] if v["name"] in DUMMY_SECRETS and "value" in v]


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_config_is_valid_for_the_bridge(path: Path) -> None:
    """The overlay's settings pass the bridge's own start-up validation (bridge/config.py)."""
    from bridge.config import ENV_VARS, Config

    docs = render(path)
    container = bridge_container(docs)
    env = configmap_env(docs, container)
    unknown = set(env) - set(ENV_VARS)
    assert not unknown, f"ConfigMap keys the bridge does not read: {sorted(unknown)}"
    secret_names = {v["name"] for v in container["env"] if "valueFrom" in v}
    assert secret_names <= set(ENV_VARS)
    config = Config.from_env({**env, **DUMMY_SECRETS})
    assert not config.use_emulator


@pytest.mark.parametrize("path", OVERLAYS_, ids=_id)
def test_cartesia_plan_budget(path: Path) -> None:
    """CARTESIA_MAX_CONCURRENCY x (maxReplicas + maxSurge) <= the account's plan concurrency."""
    docs = render(path)
    hpa = one(docs, "HorizontalPodAutoscaler")
    plan = int(hpa["metadata"]["annotations"][PLAN_ANNOTATION])
    per_pod = int(configmap_env(docs, bridge_container(docs))["CARTESIA_MAX_CONCURRENCY"])
    surge_raw = bridge_deployment(docs)["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    max_replicas = hpa["spec"]["maxReplicas"]
    if isinstance(surge_raw, str) and surge_raw.endswith("%"):
        surge = math.ceil(max_replicas * int(surge_raw[:-1]) / 100)
    else:
        surge = int(surge_raw)
    assert per_pod >= 1
    assert per_pod * (max_replicas + surge) <= plan, (
        f"{per_pod} x ({max_replicas} + {surge}) > plan {plan}: set CARTESIA_MAX_CONCURRENCY = "
        f"{plan // (max_replicas + surge)}"
    )


def test_loadtest_job_targets_staging_service() -> None:
    job = one(render(LOADTEST), "Job")
    staging = render(OVERLAYS / "staging")
    svc = one(staging, "Service")
    ns = job["metadata"]["namespace"]
    assert ns == svc["metadata"]["namespace"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = shlex.split(" ".join([*container.get("command", [])[2:], *container["args"]]))
    assert "media-bridge" in argv and argv[argv.index("media-bridge") + 1] == "loadtest"
    for flag in ("--target", "--calls", "--ramp-s", "--duration-s", "--report"):
        assert flag in argv, f"loadtest {flag} missing"
    target = urlsplit(argv[argv.index("--target") + 1].rstrip(";"))
    assert target.hostname == f"{svc['metadata']['name']}.{ns}.svc.cluster.local"
    assert (target.port or 80) in {p["port"] for p in svc["spec"]["ports"]}
    # The load tester signs the URL it calls; the bridge checks signatures against PUBLIC_URL.
    public = configmap_env(staging, bridge_container(staging))["PUBLIC_URL"]
    assert argv[argv.index("--target") + 1].rstrip(";") == public
    report_mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert argv[argv.index("--report") + 1].rstrip(";") in report_mounts, "report dir must be writable"
    # The NetworkPolicy lets the Job's pods in; the Service does not route calls to them.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    np_ = one(staging, "NetworkPolicy")
    assert any(
        selector_matches(peer["podSelector"], job_labels)
        for rule in np_["spec"]["ingress"]
        for peer in rule["from"]
        if "podSelector" in peer and "namespaceSelector" not in peer
    )
    assert not selector_matches(svc["spec"]["selector"], job_labels)
    secret_env = {v["name"] for v in container.get("env") or [] if "secretKeyRef" in v.get("valueFrom", {})}
    assert "TWILIO_AUTH_TOKEN" in secret_env


# --- Dockerfile -------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contract() -> None:
    instr = _dockerfile()
    words = [w for w, _ in instr]
    assert instr[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "ARG BASE_IMAGE before the first FROM"
    froms = [r for w, r in instr if w == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), (
        "multi-stage from BASE_IMAGE"
    )
    assert any(w == "ARG" and r.startswith("EXTRAS") for w, r in instr), "speech extra as a build arg"
    build = instr[: [i for i, (w, _) in enumerate(instr) if w == "FROM"][1]]
    assert ("ARG", "COMPILE=1") in build, "the mypyc build as a build arg of the build stage, on by default"
    copied = [src for w, r in build if w == "COPY" and "--from" not in r for src in r.split()[:-1]]
    assert "setup.py" in copied, "setup.py (COMPILED_MODULES, the MEDIA_BRIDGE_COMPILE switch) is copied"
    compile_run = " ".join(r for w, r in build if w == "RUN" and "MEDIA_BRIDGE_COMPILE=1" in r)
    assert '"$COMPILE" = 1' in compile_run and "--no-build-isolation" in compile_run, (
        "COMPILE=1 builds with mypyc"
    )
    runtime = instr[max(i for i, (w, _) in enumerate(instr) if w == "FROM") :]
    users = [r for w, r in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as non-root"
    uid = int(users[-1].split(":")[0])
    deployment = bridge_deployment(render(OVERLAYS / "production"))
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    assert any(w == "COPY" and "--from=build" in r and "/opt/venv" in r for w, r in runtime), (
        "venv from build stage"
    )
    assert not any(w == "RUN" and ("gcc" in r or "mypy" in r) for w, r in runtime), (
        "no compiler in the runtime"
    )
    health = " ".join(r for w, r in runtime if w == "HEALTHCHECK")
    assert "/healthz" in health
    expose = [r for w, r in runtime if w == "EXPOSE"]
    cmd = json.loads(next(r for w, r in runtime if w == "CMD"))
    port = cmd[cmd.index("--port") + 1]
    assert expose == [port] and f":{port}/healthz" in health
    assert json.loads(next(r for w, r in runtime if w == "ENTRYPOINT")) == ["media-bridge"]
    assert "HEALTHCHECK" in words


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "**", "allow-list: ignore everything, then re-include"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for word, rest in _dockerfile():
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                name = src.rstrip("*")
                assert name in kept, f"COPY {src} but .dockerignore excludes it"
                if not src.endswith("*"):
                    assert (REPO / name).exists(), f"COPY {src}: no such path in the repo"


# --- Linters ----------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import shutil

    found = shutil.which(name) or (
        str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).is_file() else None
    )
    require(found, f"{name} not installed (pip install the test extra)")
    assert found
    return found


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_clean() -> None:
    proc = subprocess.run(
        [_tool("yamllint"), "--strict", "-f", "parsable", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Metric names used by the HPA, the adapter, the alerts and the dashboard ------------------------


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query this directory ships."""
    docs = render(OVERLAYS / "production")
    out: list[tuple[str, str]] = []
    for group in one(docs, "PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    out += list(grafana_exprs(load_json(DASHBOARD)))
    out += list(adapter_exprs(yaml.safe_load(ADAPTER_VALUES.read_text())))
    return out


def _hpa_metric_names() -> set[str]:
    names = set()
    for path in OVERLAYS_:
        hpa = one(render(path), "HorizontalPodAutoscaler")
        names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    return names


def _check_against(exposition: Exposition) -> None:
    problems = []
    selectors: list[Selector] = []
    for where, expr in _queries():
        selectors += promql_selectors(expr, where)
    assert selectors
    for s in selectors:
        if not s.name.startswith("bridge_"):
            problems.append(f"{s.where}: {s.name} is not a bridge metric")
        elif s.name not in exposition.names:
            problems.append(f"{s.where}: {s.name} is not in the bridge's /metrics")
        else:
            unknown = s.labels - exposition.labels.get(s.name, frozenset()) - TARGET_LABELS - SERIES_LABELS
            if unknown:
                problems.append(f"{s.where}: {s.name} has no label(s) {sorted(unknown)}")
    # The HPA's Pods metric is what the adapter rule serves, and is a bridge gauge.
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    served = {r["name"]["as"] for r in values["rules"]["custom"]}
    for name in _hpa_metric_names():
        if name not in served:
            problems.append(f"HPA metric {name} is not served by the prometheus-adapter rule")
        if name not in exposition.names:
            problems.append(f"HPA metric {name} is not in the bridge's /metrics")
    assert not problems, "\n".join(problems)


def test_queries_parse_and_alerts_are_complete() -> None:
    for where, expr in _queries():
        promql_selectors(expr, where)
    rule = one(render(OVERLAYS / "production"), "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    for a in alerts:
        assert a["labels"]["severity"] in ("page", "warning", "info"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert duration_s(a.get("for", "0s")) >= 60, f"{a['alert']}: needs a for: to avoid flapping"
    exprs = " ".join(a["expr"] for a in alerts)
    # The list: error rate, TTFB p99, underruns (bridge-side proxies), 429s, pool saturation.
    for needle in (
        "bridge_utterances_failed_total",
        "bridge_tts_ttfb_seconds_bucket",
        "bridge_forwarding_delay_seconds_bucket",
        "bridge_playout_overflow_bytes_total",
        'status="429"',
        "bridge_cartesia_admission_queue",
    ):
        assert needle in exprs, f"no alert on {needle}"
    dash = load_json(DASHBOARD)
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_metric_names_exist_in_bridge_metrics() -> None:
    """Fast check against the metric objects themselves (metrics.BridgeMetrics)."""
    from metrics import BridgeMetrics

    m = BridgeMetrics()
    _check_against(parse_exposition(m.render().decode(), metric_label_names(m)))


def test_metric_check_catches_a_typo() -> None:
    from metrics import BridgeMetrics

    m = BridgeMetrics()
    exposition = parse_exposition(m.render().decode(), metric_label_names(m))
    (sel,) = promql_selectors("rate(bridge_active_call[5m])", "typo")
    assert sel.name not in exposition.names
    (sel,) = promql_selectors('rate(bridge_cartesia_errors_total{code="429"}[5m])', "label typo")
    assert "code" not in exposition.labels[sel.name]
    assert "status" in exposition.labels[sel.name]


# --- A real `media-bridge serve` ---------------------------------------------------------------------


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def running_bridge() -> Any:
    require((REPO / "bridge" / "cli.py").is_file(), "bridge/cli.py (media-bridge serve) does not exist yet")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARTESIA_", "TWILIO_", "AGENT_"))}
    env.update(PUBLIC_URL=base, DRAIN_GRACE_S="5", LOG_LEVEL="WARNING", MAX_CALLS="10")
    # The console script is what the image's ENTRYPOINT runs; `python -m` where it is not installed.
    script = Path(sys.executable).parent / "media-bridge"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "bridge.cli"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"media-bridge serve exited {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                if _get(base + "/healthz", 0.5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("media-bridge serve did not answer /healthz within 30 s")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_running_bridge_serves_probes_and_metrics(running_bridge: Any) -> None:
    base, _proc = running_bridge
    assert _get(base + "/healthz")[0] == 200
    deadline = time.monotonic() + 15
    while (status := _get(base + "/readyz")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200, "/readyz must turn 200 once started"
    assert _get(base + "/no-such-path")[0] == 404, "so a 200 on the probe paths means something"
    for path in sorted(APP_PATHS):  # POST-only routes answer 405 to GET, the WebSocket 400 without upgrade
        assert _get(base + path)[0] != 404, f"{path} (used by deploy/) is not routed by the bridge"
    status, text = _get(base + "/metrics")
    assert status == 200
    from metrics import BridgeMetrics

    _check_against(parse_exposition(text, metric_label_names(BridgeMetrics())))


def test_cli_accepts_the_flags_deploy_uses() -> None:
    require((REPO / "bridge" / "cli.py").is_file(), "bridge/cli.py does not exist yet")
    require(
        (REPO / "bridge" / "loadtest" / "cli.py").is_file(),
        "bridge/loadtest/ (media-bridge loadtest) does not exist yet",
    )
    for sub, flags in (
        ("serve", ("--host", "--port")),
        ("loadtest", ("--target", "--calls", "--ramp-s", "--duration-s", "--report")),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bridge.cli", sub, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        for flag in flags:
            assert flag in proc.stdout, f"media-bridge {sub} has no {flag}"


def test_running_bridge_drains_on_sigterm(running_bridge: Any) -> None:
    """The Deployment's grace period assumes SIGTERM -> /readyz 503 -> exit 0 (no calls: at once)."""
    base, proc = running_bridge
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("media-bridge serve did not exit within DRAIN_GRACE_S + 10 s of SIGTERM")
    # /readyz going 503 while calls drain is issue 5's test (it needs calls in progress to observe).
    assert code == 0, f"exit code {code} on SIGTERM"
