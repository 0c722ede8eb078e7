"""Local workers on CPUs of their own: CPU lists, the plan, and a real run that pins."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradhub.cpu_affinity import format_cpu_list, parse_cpu_list, worker_cpu_sets
from gradhub.errors import ConfigurationError
from gradhub_server.app import MAX_STEP_THREADS, step_threads

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("text, cpus", [("0", {0}), ("0-3,6", {0, 1, 2, 3, 6}), (" 2, 0-1 ", {0, 1, 2}),
                                        ("5-5", {5})])
def test_cpu_lists_read_as_taskset_writes_them_and_back(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(parse_cpu_list(text))) == cpus
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


@pytest.mark.parametrize("text", ["", "a", "3-1", "-2", "1-x", ","])
def test_a_bad_cpu_list_is_refused_with_what_was_wrong(text):
    with pytest.raises(ConfigurationError, match="bad CPU list"):
        parse_cpu_list(text)


def test_workers_get_disjoint_shares_in_order_or_none_when_they_do_not_fit():
    cpus = frozenset({0, 1, 2, 3, 8, 9})
    assert worker_cpu_sets(2, 3, cpus) == [{0, 1, 2}, {3, 8, 9}]
    assert worker_cpu_sets(2, 1, frozenset({0, 1})) == [{0}, {1}]
    assert worker_cpu_sets(3, 1, frozenset({0, 1})) is None  # more workers than cores
    assert worker_cpu_sets(2, 1, None) is None  # the OS does not say


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_a_worker_asked_for_cpus_it_may_not_use_says_so_and_exits():
    beyond = max(os.sched_getaffinity(0)) + 1
    result = subprocess.run(
        [sys.executable, "-m", "gradhub_worker", "--redis-url", "redis://127.0.0.1:1/0", "--cpus", str(beyond)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"CPUs {beyond} asked for, but this process may only use" in result.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_gradhub_run_pins_each_worker_to_its_own_cpus(tmp_path: Path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradhub_cli", "run", "--steps", "30", "--workers", "2", "--eval-every", "30",
         "--out", str(out), "--no-progress", "--pin-workers", "on"],
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, result.stderr
    pinned = []
    for rank in range(2):
        log = (out / "logs" / f"worker-{rank}.log").read_text()
        found = re.search(r"pinned to CPUs (\S+)", log)
        assert found, log[-2000:]
        pinned.append(parse_cpu_list(found.group(1)))
    allowed = os.sched_getaffinity(0)
    assert all(cpus <= allowed for cpus in pinned)
    if len(allowed) >= 2:
        assert not pinned[0] & pinned[1]


def test_a_sync_step_runs_on_one_thread_per_usable_cpu_up_to_four_and_other_modes_on_one():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert step_threads(0, "sync") == max(1, min(MAX_STEP_THREADS, usable))
    assert step_threads(0, "async") == step_threads(0, "ssp") == 1  # their workers compute meanwhile
    assert step_threads(3, "async") == 3  # asked for: taken as it is
    with pytest.raises(ConfigurationError, match="--step-threads must be 0"):
        step_threads(-1, "sync")
