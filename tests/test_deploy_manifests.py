"""deploy/'s files checked where they can be without Docker or a cluster: the Dockerfile passes
hadolint, the compose files hang together, the Kubernetes manifests validate against their
schemas, and every metric the dashboard, the HPA and prometheus-adapter name is one that a live
kvserve really exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
KUBERNETES = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
# a metric name with a namespace (vllm:, kvserve:); PromQL functions and labels have no colon
METRIC = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+")
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}


def dockerfiles() -> list[Path]:
    return sorted(DEPLOY.rglob("Dockerfile*"))


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_the_model_baked_in() -> None:
    (dockerfile,) = dockerfiles()
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "resolve_model(None)" in text.split(f"USER {users[-1]}")[1]  # converted as the run-time user


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    (dockerfile,) = dockerfiles()
    for sources in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
        for source in sources.split():
            assert source in kept, f"{source} is copied but excluded by .dockerignore"
            assert (ROOT / source).exists()


def test_compose_files_hang_together() -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"kvserve", "prometheus", "grafana"}
    build = services["kvserve"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == dockerfiles()[0]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in services
    kvserve_port = services["kvserve"]["ports"][0].split(":")[-1]
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [f"kvserve:{kvserve_port}"]
    datasources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/kvserve.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == providers["providers"][0]["options"]["path"]
    gpu = yaml.safe_load((COMPOSE / "compose.gpu.yaml").read_text())["services"]
    assert set(gpu) <= set(services)
    assert gpu["kvserve"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_kubernetes_manifests_validate_against_their_schemas() -> None:
    manifests = sorted(KUBERNETES.glob("*.yaml"))
    assert {p.name for p in manifests} >= {"deployment.yaml", "service.yaml", "hpa.yaml"}
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *map(str, manifests)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_deployment_probes_health_and_matches_the_image_user() -> None:
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    image_user = re.findall(r"^USER (\d+)", dockerfiles()[0].read_text(), re.M)[-1]
    assert str(pod["securityContext"]["runAsUser"]) == image_user
    service = yaml.safe_load((KUBERNETES / "service.yaml").read_text())
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


@pytest.fixture(scope="module")
def exported_metrics(server: str) -> set[str]:
    """Every series name the live server's /metrics can carry, after one request has finished."""
    response = httpx.post(f"{server}/v1/completions", timeout=120,
                          json={"prompt": "Hello", "max_tokens": 2, "kv_policy": {"name": "h2o", "budget": 16}})
    assert response.status_code == 200, response.text
    names: set[str] = set()
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=30).text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_queries_only_exported_metrics(exported_metrics: set[str]) -> None:
    dashboard = json.loads((COMPOSE / "grafana/dashboards/kvserve.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    for query in queries:
        named = set(METRIC.findall(query))
        assert named, f"no kvserve metric in {query!r}"
        assert named <= exported_metrics, f"{query!r} names {named - exported_metrics}, not exported"
    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
              "vllm:inter_token_latency_seconds_bucket", "vllm:generation_tokens_total", "kvserve:kv_pages_in_use",
              "kvserve:kv_bytes_saved_total", "vllm:num_preemptions_total"}
    assert wanted <= {name for query in queries for name in METRIC.findall(query)}


def test_autoscaling_metric_comes_from_an_exported_series(exported_metrics: set[str]) -> None:
    hpa = yaml.safe_load((KUBERNETES / "hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter/values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    rule = rules[metric["pods"]["metric"]["name"]]
    for current in values["rules"]["custom"]:
        (series,) = METRIC.findall(current["seriesQuery"])
        assert series in exported_metrics, f"prometheus-adapter asks for {series}, which kvserve does not export"
        assert re.fullmatch(current["name"]["matches"], series)
        assert current["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert METRIC.findall(rule["seriesQuery"]) == ["vllm:num_requests_waiting"]
