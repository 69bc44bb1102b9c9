"""Offline checks of the Kubernetes manifests (k8s/) and the Helm chart (helm/orchestrate).

Every document is validated against the Kubernetes OpenAPI schema bundled with
kubernetes-validate, in strict mode (an unknown or misspelt field fails). On top of
the schema: least-privilege RBAC, pod hardening, the same objects from the chart as
from k8s/, and a release.yaml that orchestrate's own config loader accepts.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orchestrator.config import ReleaseConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CHART = ROOT / "helm" / "orchestrate"
SECOND_VALUES = CHART / "ci" / "ingress-nginx-values.yaml"
MONITORING_VALUES = CHART / "ci" / "monitoring-values.yaml"
# Custom resources: not in Kubernetes' OpenAPI schema. The PrometheusRule's spec is
# checked by promtool and compared with the rule file (tests/test_alert_rules.py).
CRD_API_GROUPS = ("monitoring.coreos.com/",)
HELM = ROOT / ".cache" / "helm" / "helm"
KUBE_VERSION = "1.33"
RELEASE = "orchestrate"
NAMESPACE = "shop"

Doc = dict[str, Any]
ALLOWED_VERBS = {"get", "patch"}
HARDENED_KINDS = {"CronJob", "Deployment"}


# --------------------------------------------------------------------------- sources


def _load_all(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def k8s_docs() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += _load_all(path.read_text())
    return docs


def _helm(*args: str) -> str:
    if not HELM.exists():
        pytest.skip("helm not installed: run ./scripts/setup.sh")
    env = {
        **os.environ,
        # Keep helm away from the user's caches and any cluster.
        "HELM_CACHE_HOME": "/tmp/orchestrate-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/orchestrate-helm/config",
        "HELM_DATA_HOME": "/tmp/orchestrate-helm/data",
        "KUBECONFIG": "/dev/null",
    }
    done = subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@functools.cache
def _rendered(values: Path | None) -> tuple[Doc, ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    return tuple(_load_all(_helm(*args)))


def chart_docs(values: Path | None = None) -> list[Doc]:
    return list(_rendered(values))


SOURCES: dict[str, Callable[[], list[Doc]]] = {
    "k8s": k8s_docs,
    "chart-default": chart_docs,
    "chart-ingress-nginx": lambda: chart_docs(SECOND_VALUES),
    "chart-monitoring": lambda: chart_docs(MONITORING_VALUES),
}


@pytest.fixture(params=list(SOURCES))
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return SOURCES[str(request.param)]()


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[Doc], kind: str) -> Doc:
    found = _of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec(doc: Doc) -> Doc:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _release_yaml(docs: list[Doc]) -> Doc:
    config_maps = [d for d in _of_kind(docs, "ConfigMap") if "release.yaml" in d.get("data", {})]
    assert len(config_maps) == 1
    raw = yaml.safe_load(config_maps[0]["data"]["release.yaml"])
    assert isinstance(raw, dict)
    return raw


# --------------------------------------------------------------------------- schema


def test_every_document_validates_strictly(docs: list[Doc]) -> None:
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_API_GROUPS):
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc["kind"]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_helm_lint_is_clean() -> None:
    _helm("lint", "--strict", str(CHART))
    _helm("lint", "--strict", str(CHART), "--values", str(SECOND_VALUES))
    _helm("lint", "--strict", str(CHART), "--values", str(MONITORING_VALUES))


# --------------------------------------------------------------------------- RBAC


def test_rbac_is_least_privilege(docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing cluster-scoped"
    roles = _of_kind(docs, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
            assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
            assert "secrets" not in rule["resources"], "passwords come from secretKeyRef"
            assert rule.get("resourceNames"), f"every rule is pinned to named objects: {rule}"
            if "configmaps" in rule["resources"]:
                assert rule["verbs"] == ["get"]
    for binding in _of_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert [s["kind"] for s in binding["subjects"]] == ["ServiceAccount"]


def test_k8s_role_covers_the_three_routers() -> None:
    rules = _one(k8s_docs(), "Role")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {
        ("gateway.networking.k8s.io", "httproutes"),
        ("networking.k8s.io", "ingresses"),
        ("", "services"),
        ("", "configmaps"),
    }


def test_chart_rbac_follows_the_router_kind() -> None:
    default = chart_docs()
    rules = _one(default, "Role")["rules"]
    assert {r for rule in rules for r in rule["resources"]} == {"httproutes", "configmaps"}
    assert rules[0]["resourceNames"] == ["web"]

    second = chart_docs(SECOND_VALUES)
    by_namespace = {d["metadata"]["namespace"]: d for d in _of_kind(second, "Role")}
    assert set(by_namespace) == {"shop", "shop-edge"}
    assert {r for rule in by_namespace["shop"]["rules"] for r in rule["resources"]} == {
        "configmaps"
    }
    edge = by_namespace["shop-edge"]["rules"]
    assert edge == [
        {
            "apiGroups": ["networking.k8s.io"],
            "resources": ["ingresses"],
            "resourceNames": ["web-canary-v2"],
            "verbs": ["get", "patch"],
        }
    ]
    bindings = {d["metadata"]["namespace"] for d in _of_kind(second, "RoleBinding")}
    assert bindings == {"shop", "shop-edge"}
    # Webhook disabled: no Deployment, no Service.
    assert not _of_kind(second, "Deployment") and not _of_kind(second, "Service")


# --------------------------------------------------------------------------- hardening


def _containers(doc: Doc) -> Iterator[Doc]:
    spec = _pod_spec(doc)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def test_pods_are_hardened(docs: list[Doc]) -> None:
    workloads = [d for d in docs if d["kind"] in HARDENED_KINDS]
    assert workloads
    for doc in workloads:
        name = f"{doc['kind']} {doc['metadata']['name']}"
        spec = _pod_spec(doc)
        assert spec["serviceAccountName"] == "orchestrate", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), name
        for container in _containers(doc):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["runAsNonRoot"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # A read-only root needs somewhere to write: /tmp is an emptyDir.
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            for env in container.get("env", []):
                if any(word in env["name"] for word in ("PASSWORD", "TOKEN")):
                    assert "value" not in env, f"{name}: {env['name']} must come from a Secret"
                    assert "secretKeyRef" in env["valueFrom"], name


def test_release_cronjob(docs: list[Doc]) -> None:
    cron = _one(docs, "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["activeDeadlineSeconds"] > 0
    pod = _pod_spec(cron)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/orchestrate/orchestrate:0.1.0"
    # --wait-window: a run ends its release (cleanup, done), so the next one starts
    # a new one (docs/recurring.md).
    assert container["command"] + container["args"] == [
        "orchestrate",
        "release",
        "--wait-window",
        "--config",
        "/etc/orchestrate/release.yaml",
    ]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    backups = volumes[mounts["/var/lib/orchestrate/backups"]]
    # Backups outlive the pod: a claim, never an emptyDir, in every shipped source.
    claim = backups["persistentVolumeClaim"]["claimName"]
    claims = {d["metadata"]["name"]: d for d in _of_kind(docs, "PersistentVolumeClaim")}
    if claim in claims:
        assert claims[claim]["spec"]["resources"]["requests"]["storage"]
    else:
        assert claim == "orchestrate-backups" and not claims  # ci values: existingClaim
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets == {
        "ORCHESTRATE_BLUE_PASSWORD": "orchestrate-db",
        "ORCHESTRATE_GREEN_PASSWORD": "orchestrate-db",
    }


def test_job_deadline_and_grace_follow_the_release_deadline(docs: list[Doc]) -> None:
    """activeDeadlineSeconds = release.deadline + the rollback margin, and the grace
    period after a SIGTERM is at least the time a rollback takes."""
    cfg = parse_config(_release_yaml(docs), base_dir=Path("/etc/orchestrate"))
    cron = _one(docs, "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    assert cfg.release.deadline is not None
    assert job["activeDeadlineSeconds"] == cfg.release.deadline + cfg.release.deadline_margin
    assert _pod_spec(cron)["terminationGracePeriodSeconds"] >= cfg.release.deadline_margin


def test_webhook_deployment_and_service() -> None:
    for docs in (k8s_docs(), chart_docs()):
        deployment = _one(docs, "Deployment")
        assert deployment["metadata"]["name"] == "orchestrate-webhook"
        (container,) = _pod_spec(deployment)["containers"]
        assert container["args"][:3] == ["serve", "--config", "/etc/orchestrate/release.yaml"]
        assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
        token = next(e for e in container["env"] if e["name"] == "ORCHESTRATE_WEBHOOK_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "orchestrate-webhook", "key": "token"}
        service = _one(docs, "Service")
        assert service["spec"]["ports"][0]["port"] == 8080
        labels = _pod_spec(deployment) and deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


# --------------------------------------------------------------------------- consistency


def test_chart_and_manifests_declare_the_same_objects() -> None:
    def names(docs: list[Doc]) -> list[tuple[str, str]]:
        return sorted((d["kind"], d["metadata"]["name"]) for d in docs)

    assert names(chart_docs(MONITORING_VALUES)) == names(k8s_docs())
    # Off by default: without the Prometheus Operator's CRDs the chart still installs.
    monitoring = {("PrometheusRule", "orchestrate"), ("ConfigMap", "orchestrate-dashboard")}
    assert set(names(chart_docs(MONITORING_VALUES))) - set(names(chart_docs())) == monitoring


def test_backups_fall_back_to_an_emptydir_only_when_persistence_is_off(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("release:\n  backups:\n    persistence:\n      enabled: false\n")
    docs = chart_docs(values)
    assert _of_kind(docs, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in _pod_spec(_one(docs, "CronJob"))["volumes"]}
    assert volumes["backups"]["emptyDir"] == {"sizeLimit": "20Gi"}
    sized = tmp_path / "sized.yaml"  # another path: renders are cached by path
    sized.write_text("release:\n  backups:\n    persistence:\n      storageClass: fast\n"
                     "      size: 50Gi\n")
    (pvc,) = _of_kind(chart_docs(sized), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_release_config_is_accepted_by_orchestrate(docs: list[Doc]) -> None:
    raw = _release_yaml(docs)
    cfg = parse_config(raw, base_dir=Path("/etc/orchestrate"))
    assert isinstance(cfg, ReleaseConfig)
    assert cfg.backup.dir == Path("/var/lib/orchestrate/backups")
    assert cfg.migrations.dir == Path("/etc/orchestrate/migrations")
    # No kubeconfig: inside the cluster the service account is used.
    assert getattr(cfg.router, "kubeconfig", "n/a") is None
    # The passwords are environment references that the CronJob fills from Secrets.
    env_refs = {db.password.env for db in (cfg.blue, cfg.green) if db.password}
    (container,) = _pod_spec(_one(docs, "CronJob"))["containers"]
    from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert env_refs and env_refs <= from_secrets


def test_example_config_uses_the_gateway_router() -> None:
    for docs in (k8s_docs(), chart_docs()):
        cfg = parse_config(_release_yaml(docs), base_dir=Path("/etc/orchestrate"))
        assert cfg.router.kind == "gateway"
        role = _one(docs, "Role")
        route_rule = next(r for r in role["rules"] if "httproutes" in r["resources"])
        assert route_rule["resourceNames"] == [cfg.router.route]
        assert cfg.router.namespace == role["metadata"]["namespace"]


def test_kind_e2e_skips_cleanly_without_docker() -> None:
    script = ROOT / "scripts" / "kind-e2e.sh"
    done = subprocess.run(
        ["/bin/bash", str(script)],
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: needs Docker and kind")
