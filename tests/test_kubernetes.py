"""deploy/kubernetes/ validated offline: the built-in kinds against the Kubernetes API's schemas
(kubernetes-validate, strict), ServiceMonitor and PrometheusRule against the Prometheus
Operator's CRD schemas (npm @kubernetes-models/prometheus-operator); the PrometheusRule is what
the tested rules file generates; the ConfigMap's configuration loads; the pieces fit together
(probes, ports, secret files, the scrape job's name the alerts select)."""
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

from harness import ROOT, binary

K8S = ROOT / "deploy" / "kubernetes"
CRDS = Path(os.environ.get("ICEBERG_OFFLOAD_CACHE", Path.home() / ".cache" / "iceberg-offload")) / "node" / "prometheus-operator-6.0.0"


def manifests():
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml"))}


def test_builtin_kinds_validate_strictly_against_the_kubernetes_api():
    builtin = [K8S / n for n, d in manifests().items() if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for n, d in manifests().items() if K8S / n in builtin} == {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "Service"}
    p = subprocess.run(["kubernetes-validate", "--strict", *map(str, builtin)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed") == len(builtin), p.stdout


def test_a_broken_manifest_is_refused(tmp_path):
    """The validator can fail: an unknown field and a wrong type."""
    doc = manifests()["deployment.yaml"]
    doc["spec"]["replicas"] = "three"
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    p = subprocess.run(["kubernetes-validate", "--strict", str(bad)], capture_output=True, text=True)
    assert p.returncode != 0, p.stdout


def crd_validate(tmp_path, docs):
    files = []
    for i, doc in enumerate(docs):
        f = tmp_path / f"crd{i}.json"
        f.write_text(json.dumps(doc))
        files.append(str(f))
    return subprocess.run(["node", str(ROOT / "dev" / "validate_crds.mjs"), str(CRDS), *files], capture_output=True, text=True)


def test_servicemonitor_and_prometheusrule_validate_against_the_operators_crds(tmp_path):
    m = manifests()
    p = crd_validate(tmp_path, [m["servicemonitor.yaml"], m["prometheusrule.yaml"]])
    assert p.returncode == 0 and p.stdout.count("ok ") == 2, p.stdout + p.stderr
    broken = json.loads(json.dumps(m["servicemonitor.yaml"]))
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    p = crd_validate(tmp_path, [broken])
    assert p.returncode == 1 and "interval" in p.stdout, p.stdout


def test_the_prometheusrule_is_generated_from_the_tested_rules_file():
    p = subprocess.run(["python", str(ROOT / "dev" / "prometheus_rule.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "iceberg-offload-alerts.yml").read_text())
    assert manifests()["prometheusrule.yaml"]["spec"]["groups"] == rules["groups"]


def test_the_configmaps_configuration_loads(tmp_path):
    text = manifests()["configmap.yaml"]["data"]["config.toml"]
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    p = subprocess.run([binary(), "--config", str(cfg), "validate"], capture_output=True, text=True, timeout=120)
    conf = tomllib.loads(text)
    assert p.stdout.startswith(f"config: ok ({len(conf['tables'])} tables)"), p.stdout + p.stderr


def test_the_pieces_fit_together():
    m = manifests()
    conf = tomllib.loads(m["configmap.yaml"]["data"]["config.toml"])
    pod = m["deployment.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = int(conf["service"]["metrics_listen"].rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    server = (ROOT / "src" / "server.rs").read_text()
    assert '"/healthz"' in server and '"/readyz"' in server
    assert container["args"][-1] == "run"
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    assert mounts[container["args"][1]] == "config"
    # Every secret file the configuration reads is a key of the Secret, mounted where it is read.
    secret_dir = next(path for path, name in mounts.items() if name == "secrets")
    wanted = re.findall(r'"(/etc/iceberg-offload/secrets/[\w-]+)"', m["configmap.yaml"]["data"]["config.toml"])
    keys = set(m["secret.yaml"]["stringData"])
    assert wanted and {Path(w).name for w in wanted} <= keys and all(w.startswith(secret_dir + "/") for w in wanted)
    # SIGTERM lets a commit already sent resolve: its allowance (src/config.rs
    # commit_allowance: commit_timeout + timeout + 2 x storage_timeout, defaults 60/30/60 s).
    catalog = conf["catalog"]
    secs = lambda key, default: int(str(catalog.get(key, default)).rstrip("s"))  # noqa: E731
    allowance = secs("commit_timeout", "60s") + secs("timeout", "30s") + 2 * secs("storage_timeout", "60s")
    assert pod["terminationGracePeriodSeconds"] >= allowance + 20, allowance
    # Replicas share the tables through PostgreSQL; the warehouse is shared storage.
    assert conf["state"]["url"].startswith("postgres://") and conf["catalog"]["warehouse"].startswith("s3://")
    assert m["deployment.yaml"]["spec"]["replicas"] >= 2 and m["poddisruptionbudget.yaml"]["spec"]["maxUnavailable"] == 1
    # The scrape job is named after the Service; the alerts select job="iceberg-scheduler".
    assert m["service.yaml"]["metadata"]["name"] == "iceberg-scheduler"
    assert m["servicemonitor.yaml"]["spec"]["selector"]["matchLabels"].items() <= m["service.yaml"]["metadata"]["labels"].items()
    assert m["servicemonitor.yaml"]["spec"]["endpoints"][0]["port"] == m["service.yaml"]["spec"]["ports"][0]["name"]
    assert m["service.yaml"]["spec"]["selector"].items() <= pod.get("labels", m["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]).items()


def test_the_readme_states_the_deployments_grace_period():
    """One truth for the grace period at SIGTERM: the README says what the Deployment sets."""
    grace = manifests()["deployment.yaml"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    stated = re.findall(r"(\d+) s grace", readme)
    assert stated == [str(grace)], f"README states {stated} s grace; the Deployment sets {grace} s"
