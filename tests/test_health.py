"""The standard gRPC health protocol, as container healthchecks and Kubernetes probes ask it."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import pytest

from conftest import random_gradient, small_config, wait_until
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.models import build_model
from gradhub_cli.health import READINESS_SERVICE, check

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_liveness_and_readiness_follow_the_run_and_a_lingering_server_stays_alive(serve, run_id):
    server = serve(small_config(run_id, workers=1, steps=1))
    server.app.settings = replace(server.app.settings, linger=True)
    assert check(server.address) == "SERVING"
    assert check(server.address, READINESS_SERVICE) == "SERVING"
    assert check(server.address, "no.such.Service") == "SERVICE_UNKNOWN"
    # The command a Docker HEALTHCHECK runs: its exit status is the answer.
    probe = [sys.executable, "-m", "gradhub_cli.main", "health", "--quiet", "--address", server.address]
    assert subprocess.run(probe, timeout=30).returncode == 0

    ended = threading.Event()
    waiter = threading.Thread(target=lambda: (server.app.wait(), ended.set()), daemon=True)
    waiter.start()
    server.register("w0")
    codec = codec_from_name("none")
    gradient = [codec.encode(name, g) for name, g in random_gradient(build_model("cnn"), seed=1)]
    server.client("w0").push(PushMeta(run_id, "w0", 1, 0), gradient, timeout=30)
    server.leave("w0")

    # The run is over: not ready for pushes, still alive (a StatefulSet must not restart it).
    wait_until(lambda: check(server.address, READINESS_SERVICE) == "NOT_SERVING", 20, "readiness to drop")
    assert check(server.address) == "SERVING"
    # ...and only once the run folder is complete, so "not ready" is the cue to fetch results.
    assert (server.app.settings.out / "summary.json").is_file()
    assert not ended.is_set()
    assert subprocess.run([*probe, "--ready"], timeout=30).returncode == 1

    server.app.request_stop()
    waiter.join(timeout=20)
    assert ended.is_set()
    assert check(server.address, timeout=1.0) == "UNREACHABLE"
    assert subprocess.run(probe, timeout=30).returncode == 1
