"""Run the pods of a rendered Kubernetes overlay as Docker containers, as a kubelet would.

No API server can run on the development machine, so this is the closest test of the
manifests themselves: each pod's containers start from the rendered spec, with the
environment the kubelet builds (ConfigMap and Secret through envFrom, then env, with
fieldRefs and $(VAR) expansion), the pod's user, a read-only root filesystem, emptyDirs,
a volume for the StatefulSet's claim, and DNS names for Services and the StatefulSet's pod.
What it cannot show: scheduling, probes run by a kubelet, NetworkPolicy enforcement.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass
class Pod:
    name: str
    kind: str
    spec: dict[str, Any]
    #: DNS names this pod answers to: its Services, and for a StatefulSet pod, pod.service.
    aliases: list[str]
    completion_index: int | None = None
    containers: list[Any] = field(default_factory=list)


def load(rendered: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector") or {}
    return bool(selector) and selector.items() <= labels.items()


def pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """The pods the controllers would make: Deployment and StatefulSet replicas, Job indices."""
    services = [d for d in docs if d["kind"] == "Service"]
    made: list[Pod] = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        template, name = doc["spec"]["template"], doc["metadata"]["name"]
        labels = template["metadata"]["labels"]
        selecting = [s["metadata"]["name"] for s in services if _selects(s, labels)]
        if doc["kind"] == "Job":
            for index in range(doc["spec"]["completions"]):
                made.append(Pod(f"{name}-{index}", "Job", template["spec"], [], completion_index=index))
        else:
            for replica in range(doc["spec"].get("replicas", 1)):
                pod_name = f"{name}-{replica}" if doc["kind"] == "StatefulSet" else f"{name}-{replica}-pod"
                aliases = list(selecting)
                if doc["kind"] == "StatefulSet":
                    aliases.append(f"{pod_name}.{doc['spec']['serviceName']}")
                made.append(Pod(pod_name, doc["kind"], template["spec"], aliases))
    return made


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, others left as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(docs: list[dict[str, Any]], pod: Pod, container: dict[str, Any],
                  overrides: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = dict(_named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
            data.update({k: v for k, v in overrides.items() if k in data or k.startswith("GRADHUB_")})
            env.update(data)
        if "secretRef" in source:
            secret = _named(docs, "Secret", source["secretRef"]["name"])["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[item["name"]] = str(pod.completion_index) if path == COMPLETION_INDEX else {
                "metadata.name": pod.name}[path]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = base64.b64decode(_named(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
    return env


def run_pod(client: Any, docs: list[dict[str, Any]], pod: Pod, network: str, prefix: str,
            images: dict[str, str], overrides: dict[str, str], labels: dict[str, str]) -> None:
    """Start the pod's containers (one per container spec) on `network`."""
    spec = pod.spec
    security = spec.get("securityContext", {})
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    user = security.get("runAsUser")
    group = security.get("runAsGroup", user)
    # An emptyDir of a pod with fsGroup is writable by the pod's user: the same for the tmpfs.
    owner = f"uid={user},gid={security.get('fsGroup', group)}," if user is not None else ""
    for container in spec["containers"]:
        env = container_env(docs, pod, container, overrides)
        image = images.get(container["image"], container["image"])
        mounts: dict[str, Any] = {}
        tmpfs: dict[str, str] = {}
        for mount in container.get("volumeMounts", []):
            volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
            if volume is not None and "emptyDir" in volume:
                tmpfs[mount["mountPath"]] = f"{owner}mode=1777"
            else:  # a volumeClaimTemplate's claim (or a PVC): a named volume of this pod
                assert volume is None or mount["name"] in claims, f"unsupported volume {mount['name']}"
                mounts[f"{prefix}-{mount['name']}-{pod.name}"] = {"bind": mount["mountPath"], "mode": "rw"}
        csec = container.get("securityContext", {})
        config = client.api.create_endpoint_config(aliases=[pod.name, *pod.aliases])
        client.containers.run(
            image,
            entrypoint=[_expand(c, env) for c in container["command"]] if "command" in container else None,
            command=[_expand(a, env) for a in container["args"]] if "args" in container else None,
            name=f"{prefix}-{pod.name}-{container['name']}", hostname=pod.name, detach=True, init=True,
            environment=env, user=f"{user}:{group}" if user is not None else None,
            read_only=bool(csec.get("readOnlyRootFilesystem")),
            cap_drop=csec.get("capabilities", {}).get("drop"), tmpfs=tmpfs, volumes=mounts,
            labels={**labels, "io.gradhub.pod": pod.name}, network=network,
            networking_config={network: config},
        )
