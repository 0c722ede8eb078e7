"""`gradhub cluster`: a containerised cluster on a Docker engine, driven by the Docker SDK.

  gradhub cluster build   build the server and worker images (online, or --offline from a wheelhouse)
  gradhub cluster up      Redis, the server and N workers on an internal network; results on a volume
  gradhub cluster status  containers and the run's status (asked inside the server container)
  gradhub cluster logs    a container's log (default: the server's)
  gradhub cluster results copy the run folder out of the results volume
  gradhub cluster down    stop and remove everything `up` made (labelled io.gradhub.cluster=NAME)

It is the same cluster as docker-compose.yml, for machines with an engine and no compose.
Run settings are `gradhub run`'s flags (--mode, --steps, ...) or GRADHUB_* variables.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import time
from pathlib import Path
from typing import Any

from gradhub import auth
from gradhub.config import add_run_config_arguments, env_name, given_run_fields
from gradhub.errors import ConfigurationError, GradhubError
from gradhub_cli import images

log = logging.getLogger(__name__)

LABEL = "io.gradhub.cluster"
ROLE_LABEL = "io.gradhub.role"
REDIS_URL = "redis://redis:6379/0"
SERVER_PORT = 50051
METRICS_PORT = 9090
#: How long `up` waits for Redis to answer before it gives up and removes what it made.
REDIS_READY_TIMEOUT_S = 30.0
#: As in docker-compose.yml and on Kubernetes: read-only root, writable /tmp and /data only.
HARDENED: dict[str, Any] = {
    "read_only": True, "tmpfs": {"/tmp": ""}, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"],
}


def _client() -> Any:
    import docker  # the SDK is only needed here; the rest of gradhub runs without an engine

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # the SDK raises several unrelated types for "no engine"
        raise ConfigurationError(f"no Docker engine reachable (DOCKER_HOST or /var/run/docker.sock): {exc}") from exc
    return client


def _names(name: str) -> dict[str, str]:
    return {
        "network": f"gradhub-{name}",
        "volume": f"gradhub-{name}-results",
        "redis": f"gradhub-{name}-redis",
        "server": f"gradhub-{name}-server",
        "worker": f"gradhub-{name}-worker",
    }


def run_environment(args: argparse.Namespace) -> dict[str, str]:
    """The run's settings as GRADHUB_* variables for the server container."""
    values = given_run_fields(args)
    env = {env_name(key): _env_value(value) for key, value in values.items()}
    env.setdefault("GRADHUB_WORKERS", str(args.workers or 2))
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def cluster_up(args: argparse.Namespace) -> int:
    client = _client()
    names = _names(args.name)
    labels = {LABEL: args.name}
    if client.containers.list(all=True, filters={"label": f"{LABEL}={args.name}"}):
        raise ConfigurationError(f"cluster {args.name!r} exists; `gradhub cluster down --name {args.name}` first")
    run_env = run_environment(args)
    workers = int(run_env["GRADHUB_WORKERS"])
    # A fresh token per cluster, unless the caller has one: only its workers can push.
    token = auth.load_token() or auth.new_token()
    common_env = {"GRADHUB_REDIS_URL": REDIS_URL, "GRADHUB_RUN_ID": args.run_id, "GRADHUB_LOG_LEVEL": "INFO",
                  auth.ENV_VAR: token}
    server_image, worker_image = images.image_names(args.tag)
    try:
        network = client.networks.create(names["network"], driver="bridge", internal=True, labels=labels)
        client.volumes.create(names["volume"], labels=labels)
        redis = client.containers.run(
            args.redis_image, ["--save", "", "--appendonly", "no", "--protected-mode", "no"],
            entrypoint=["redis-server"], name=names["redis"], detach=True, init=True,
            labels={**labels, ROLE_LABEL: "redis"}, **_on_network(client, network.name, "redis"),
            # Its own check: a gradhub image used as Redis would otherwise inherit the server's.
            healthcheck={"test": ["CMD", "redis-cli", "ping"], "interval": 2_000_000_000,
                         "timeout": 3_000_000_000, "retries": 15},
        )
        _wait_for_redis(redis)
        server = client.containers.create(
            server_image, name=names["server"], detach=True, init=True, **HARDENED,
            labels={**labels, ROLE_LABEL: "server"},
            environment={**common_env, **run_env, "GRADHUB_ADVERTISE": f"server:{SERVER_PORT}",
                         "GRADHUB_BIND": f"0.0.0.0:{SERVER_PORT}", "GRADHUB_METRICS_BIND": f"0.0.0.0:{METRICS_PORT}"},
            volumes={names["volume"]: {"bind": "/data", "mode": "rw"}},
            **_on_network(client, network.name, "server"),
        )
        server.start()
        for index in range(workers):
            client.containers.run(
                worker_image, name=f"{names['worker']}-{index}", detach=True, init=True, **HARDENED,
                labels={**labels, ROLE_LABEL: "worker"},
                environment={**common_env, "GRADHUB_DEVICE": args.device, "GRADHUB_TORCH_THREADS": "1"},
                volumes={names["volume"]: {"bind": "/data", "mode": "rw"}}, network=network.name,
            )
    except Exception:
        log.error("cluster %s did not come up; removing what was made", args.name)
        remove_cluster(client, args.name, keep_results=False)
        raise
    print(f"cluster {args.name}: redis, server and {workers} workers on network {names['network']} "
          f"(internal); results in volume {names['volume']}")
    print(f"  progress: gradhub cluster status --name {args.name}   (or: gradhub cluster logs --name {args.name})")
    print(f"  results:  gradhub cluster results --name {args.name} --out DIR")
    print(f"  stop:     gradhub cluster down --name {args.name}")
    return 0


def _on_network(client: Any, network: str, alias: str | None = None) -> dict[str, Any]:
    """Keyword arguments that attach a new container to `network`, reachable as `alias`."""
    config = client.api.create_endpoint_config(aliases=[alias] if alias else None)
    return {"network": network, "networking_config": {network: config}}


def _wait_for_redis(container: Any) -> None:
    deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            raise ConfigurationError(f"Redis container exited: {container.logs(tail=20).decode(errors='replace')}")
        code, _ = container.exec_run(["redis-cli", "ping"])
        if code == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"Redis did not answer within {REDIS_READY_TIMEOUT_S:.0f}s")


def cluster_containers(client: Any, name: str) -> list[Any]:
    return sorted(client.containers.list(all=True, filters={"label": f"{LABEL}={name}"}), key=lambda c: c.name)


def describe(client: Any, name: str, run_id: str) -> dict[str, Any]:
    """Containers with their state and health, and the run's status or summary."""
    containers = cluster_containers(client, name)
    if not containers:
        raise ConfigurationError(f"no cluster {name!r} on this engine")
    report: dict[str, Any] = {"cluster": name, "containers": []}
    server = None
    for container in containers:
        state = container.attrs.get("State", {})
        report["containers"].append({
            "name": container.name, "role": container.labels.get(ROLE_LABEL), "status": container.status,
            "health": (state.get("Health") or {}).get("Status"), "exit_code": state.get("ExitCode"),
        })
        if container.labels.get(ROLE_LABEL) == "server":
            server = container
    if server is not None and server.status == "running":
        code, output = server.exec_run(["gradhub", "status", "--json", "--redis-url", REDIS_URL, "--run-id", run_id])
        if code == 0:
            report["run"] = json.loads(output)
    elif server is not None:
        report["summary"] = read_summary(server, run_id)
    return report


def read_summary(server: Any, run_id: str) -> dict[str, Any] | None:
    """summary.json from the server's results volume, read through the (stopped) container."""
    try:
        stream, _ = server.get_archive(f"/data/runs/{run_id}/summary.json")
    except Exception:  # not written (yet): the SDK's NotFound
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        member = archive.extractfile("summary.json")
        return None if member is None else json.loads(member.read())


def copy_results(client: Any, name: str, run_id: str, out: Path) -> Path:
    server = client.containers.get(_names(name)["server"])
    stream, _ = server.get_archive(f"/data/runs/{run_id}")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        archive.extractall(out, filter="data")  # refuses absolute paths and links out of `out`
    return out / run_id


def remove_cluster(client: Any, name: str, keep_results: bool, stop_timeout: int = 10) -> list[str]:
    """Remove every container, the network and (unless kept) the volume labelled with `name`."""
    removed: list[str] = []
    for container in cluster_containers(client, name):
        if container.status == "running":
            container.stop(timeout=stop_timeout)
        container.remove(force=True)
        removed.append(container.name)
    for network in client.networks.list(filters={"label": f"{LABEL}={name}"}):
        network.remove()
        removed.append(network.name)
    if not keep_results:
        for volume in client.volumes.list(filters={"label": f"{LABEL}={name}"}):
            volume.remove(force=True)
            removed.append(volume.name)
    return removed


def format_report(report: dict[str, Any]) -> str:
    lines = [f"cluster {report['cluster']}:"]
    for item in report["containers"]:
        health = f", {item['health']}" if item["health"] else ""
        code = f", exit {item['exit_code']}" if item["status"] == "exited" else ""
        lines.append(f"  {item['name']:<32} {item['role']:<7} {item['status']}{health}{code}")
    run = report.get("run")
    if run:
        accuracy = run.get("test_accuracy")
        lines.append(f"  run {run.get('run_id')}: {run.get('state')}, version {run.get('version')}/{run.get('steps')}"
                     + (f", test accuracy {accuracy:.4f}" if isinstance(accuracy, float) else ""))
    summary = report.get("summary")
    if summary:
        lines.append(f"  run {summary.get('run_id')}: {summary.get('status')} at version {summary.get('steps')}, "
                     f"final test accuracy {summary.get('final_test_accuracy')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradhub cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=["docker"], default="docker", help="where the cluster runs")
        p.add_argument("--name", default="gradhub", help="cluster name (labels, container names)")
        p.add_argument("--run-id", default="cluster", help="the run's id inside the cluster")

    build = sub.add_parser("build", help="build the server and worker images")
    build.add_argument("--tag", default="latest")
    build.add_argument("--base-image", default=images.DEFAULT_BASE_IMAGE, help="BASE_IMAGE build argument")
    build.add_argument("--offline", action="store_true",
                       help="download wheels on this machine first and build with no network")
    up = sub.add_parser("up", help="start Redis, the server and the workers")
    common(up)
    up.add_argument("--tag", default="latest", help="image tag of gradhub/server and gradhub/worker")
    up.add_argument("--redis-image", default="redis:7.4-alpine",
                    help="Redis image (any with redis-server and redis-cli; gradhub/server:TAG has both)")
    up.add_argument("--device", default="cpu", help="worker device")
    add_run_config_arguments(up)
    for action_name in ("status", "logs", "results", "down"):
        p = sub.add_parser(action_name)
        common(p)
    sub.choices["status"].add_argument("--json", action="store_true")
    sub.choices["logs"].add_argument("--container", default="server", help="redis, server or worker-N")
    sub.choices["logs"].add_argument("--tail", type=int, default=50)
    sub.choices["results"].add_argument("--out", type=Path, default=Path("runs"), help="where to copy the run folder")
    sub.choices["down"].add_argument("--keep-results", action="store_true", help="keep the results volume")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.action == "build":
            tags = images.build_images(_client(), images.repo_root(), args.tag, args.base_image, args.offline)
            print("built " + ", ".join(tags))
            return 0
        if args.action == "up":
            return cluster_up(args)
        client = _client()
        if args.action == "status":
            report = describe(client, args.name, args.run_id)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        elif args.action == "logs":
            container = client.containers.get(f"gradhub-{args.name}-{args.container}")
            print(container.logs(tail=args.tail).decode(errors="replace"), end="")
        elif args.action == "results":
            print(f"results in {copy_results(client, args.name, args.run_id, args.out)}")
        elif args.action == "down":
            removed = remove_cluster(client, args.name, args.keep_results)
            print(f"removed {len(removed)}: " + ", ".join(removed) if removed else f"no cluster {args.name!r}")
        return 0
    except (GradhubError, TimeoutError) as exc:
        print(f"gradhub cluster: {exc}")
        return 2
