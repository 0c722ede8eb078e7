"""Building gradhub's images with the Docker SDK, online or from a local wheelhouse.

The offline path exists for machines with a package index but no image registry or no
network inside builds: wheels are downloaded on the host for the image's Python and
platform, the build runs with `--network none` and `pip --no-index`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gradhub.errors import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DOCKERFILE = "deploy/docker/Dockerfile"
WHEELHOUSE = "deploy/docker/wheelhouse"
TARGETS = ("server", "worker")
#: The wheels' target: the Python inside the default and the Debian 12 base images.
IMAGE_PYTHON = "3.11"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")
#: Needed inside the image but not judged so by pip on the host: redis-py wants async-timeout
#: below Python 3.11.3, and building the project needs setuptools and wheel.
EXTRA_WHEELS = ("async-timeout>=4.0.3", "setuptools>=68", "wheel")
#: One image build; torch's wheel alone is several hundred MB to install.
BUILD_TIMEOUT_S = 1200


def image_names(tag: str) -> tuple[str, str]:
    return f"gradhub/server:{tag}", f"gradhub/worker:{tag}"


def repo_root(start: Path | None = None) -> Path:
    """The checkout holding deploy/docker/Dockerfile: the working directory's, else this package's."""
    candidates = [start or Path.cwd(), Path(__file__).resolve()]
    for candidate in candidates:
        for folder in (candidate, *candidate.parents):
            if (folder / DOCKERFILE).is_file():
                return folder
    raise ConfigurationError(f"no {DOCKERFILE} here or above: run from a gradhub checkout")


def runtime_requirements() -> list[str]:
    """gradhub's own pins (not its dev extras), as installed from pyproject.toml.

    torch is pinned to the build installed here (2.13.0+cpu on a CPU machine): the plain
    pin would let pip fetch PyPI's default wheel, which pulls several GB of CUDA libraries.
    """
    pins = [req for req in metadata.requires("gradhub") or [] if "extra ==" not in req]
    torch_pin = f"torch=={metadata.version('torch')}"
    return [torch_pin if req.startswith("torch==") else req for req in pins] + list(EXTRA_WHEELS)


def prepare_wheelhouse(root: Path) -> Path:
    """Download every runtime wheel for the image's Python into deploy/docker/wheelhouse."""
    wheelhouse = root / WHEELHOUSE
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse),
        "--only-binary=:all:", "--python-version", IMAGE_PYTHON,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        "-c", str(root / "requirements.lock"), *runtime_requirements(),
    ]
    log.info("downloading wheels into %s", wheelhouse)
    subprocess.run(command, check=True, timeout=BUILD_TIMEOUT_S)
    return wheelhouse


def build_images(client: Any, root: Path, tag: str, base_image: str, offline: bool) -> list[str]:
    """Build both images; then remove the untagged leftovers of earlier gradhub builds."""
    started = int(time.time())
    if offline:
        prepare_wheelhouse(root)
    built = []
    for target, name in zip(TARGETS, image_names(tag)):
        log.info("building %s (target %s, base %s%s)", name, target, base_image, ", offline" if offline else "")
        args = {"BASE_IMAGE": base_image}
        if offline:
            args["PIP_EXTRA_ARGS"] = "--no-index"
        client.images.build(
            path=str(root), dockerfile=DOCKERFILE, target=target, tag=name, buildargs=args,
            network_mode="none" if offline else None, rm=True, forcerm=True, timeout=BUILD_TIMEOUT_S,
        )
        built.append(name)
    prune_stale(client, before=started)
    return built


def prune_stale(client: Any, before: int) -> int:
    """Remove untagged gradhub images made before `before` (Unix time); return the bytes freed.

    Each rebuild leaves the previous build stage and the previous images untagged. This
    build's own stages stay: they are the cache of the next one. Other images are untouched.
    """
    freed = 0
    for stage in ("build", "runtime"):
        result = client.images.prune(
            filters={"dangling": True, "label": f"io.gradhub.stage={stage}", "until": str(before)}
        )
        freed += int(result.get("SpaceReclaimed") or 0)
    return freed
