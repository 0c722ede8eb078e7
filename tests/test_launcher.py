"""The launcher's process handling: waits that end, kills that cannot hang, and an
interrupt that is a flag while the cluster is supervised (see LocalCluster.interrupt).

Real child processes; the full Ctrl-C path is tests/test_cluster.py's."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from gradhub.config import RunConfig
from gradhub_cli import launcher
from gradhub_cli.launcher import Component, LaunchSettings, LocalCluster

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sleeper(tmp_path: Path):
    component = Component("sleeper", SLEEPER, tmp_path / "sleeper.log")
    component.start({})
    yield component
    component.kill()
    component.close_log()


@pytest.mark.timeout(30)
def test_wait_returns_the_exit_code_or_none_after_its_timeout(tmp_path: Path, sleeper: Component):
    assert sleeper.wait(0.3) is None
    done = Component("done", [sys.executable, "-c", "raise SystemExit(7)"], tmp_path / "done.log")
    done.start({})
    try:
        assert done.wait(20) == 7
    finally:
        done.close_log()


@pytest.mark.timeout(30)
def test_wait_stops_when_the_check_between_polls_raises(sleeper: Component):
    calls = []

    def between() -> None:
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sleeper.wait(20, between)
    assert calls == [1]
    assert sleeper.poll() is None  # still running: stopping it is the caller's call


@pytest.mark.timeout(30)
def test_kill_is_bounded_even_when_popens_waitpid_lock_was_left_held(
    sleeper: Component, monkeypatch: pytest.MonkeyPatch
):
    """What a KeyboardInterrupt between Popen.poll's acquire and its `try` leaves behind:
    the lock held for good. A plain `Popen.wait()` then blocks forever."""
    monkeypatch.setattr(launcher, "TERMINATE_TIMEOUT_S", 0.5)
    assert sleeper.process is not None
    lock = sleeper.process._waitpid_lock  # type: ignore[attr-defined]
    assert lock.acquire(blocking=False)
    try:
        started = time.monotonic()
        sleeper.process.kill()
        sleeper.kill()
        assert time.monotonic() - started < 5
    finally:
        lock.release()
    assert sleeper.wait(10) is not None  # the SIGKILL did land


def test_interrupt_is_refused_outside_supervision_and_a_flag_within(tmp_path: Path):
    cluster = LocalCluster(LaunchSettings(config=RunConfig(run_id="t"), out=tmp_path, progress=False))
    assert cluster.interrupt() is False  # not started: the caller raises KeyboardInterrupt itself
    cluster._supervising = True
    assert cluster.interrupt() is True
    with pytest.raises(KeyboardInterrupt):
        cluster._check_interrupted()
