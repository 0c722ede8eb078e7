"""`--overlap`: a worker computes its next gradient while its last push is in flight.

What users rely on: the option exists only where stale pushes are accepted, and with it
every push is computed on the parameters from before the previous push's answer, so one
worker's pushes are each exactly one version stale (the server's own staleness record
says so), and training still learns. Real clusters through `gradhub run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradhub.config import RunConfig, add_run_config_arguments, run_config_from_args
from gradhub.errors import ConfigurationError

STEPS = 600


def test_overlap_is_refused_where_a_step_waits_for_gradients_of_its_own_version():
    with pytest.raises(ConfigurationError, match="overlap applies to the async modes"):
        RunConfig(run_id="r", mode="sync", overlap=True)
    for mode in ("async", "async-sa", "ssp", "dc-asgd"):
        assert RunConfig(run_id="r", mode=mode, overlap=True).overlap


def test_the_overlap_flag_reads_on_and_off():
    import argparse

    parser = argparse.ArgumentParser()
    add_run_config_arguments(parser)
    assert run_config_from_args(parser.parse_args(["--mode", "async", "--overlap", "on"])).overlap
    assert not run_config_from_args(parser.parse_args(["--mode", "async", "--overlap", "off"])).overlap
    assert not run_config_from_args(parser.parse_args(["--mode", "async"])).overlap
    with pytest.raises(SystemExit):
        parser.parse_args(["--overlap", "maybe"])


def _run(out: Path, overlap: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "gradhub_cli", "run", "--workers", "1", "--mode", "async", "--overlap", overlap,
         "--steps", str(STEPS), "--eval-every", str(STEPS), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(220)
def test_with_overlap_each_push_of_one_worker_is_exactly_one_version_stale_and_it_learns(tmp_path):
    plain = _run(tmp_path / "off", "off")
    overlapped = _run(tmp_path / "on", "on")
    # In turn: every push computed on the version it pushes to.
    assert plain["staleness"]["histogram"] == {"0": STEPS}, plain["staleness"]
    # Overlapped: the first push is fresh; every later one was computed while the one
    # before it was in flight, on the version before that push's answer.
    assert overlapped["staleness"]["histogram"] == {"0": 1, "1": STEPS - 1}, overlapped["staleness"]
    assert overlapped["pushes_applied"] == STEPS and overlapped["pushes_refused"] == 0
    assert overlapped["status"] == "finished"
    # 600 steps of the CNN on MNIST-1D: chance is 10 %; both learn.
    assert plain["final_test_accuracy"] > 0.5, plain["final_test_accuracy"]
    assert overlapped["final_test_accuracy"] > 0.5, overlapped["final_test_accuracy"]


def test_the_overlap_suite_reads_the_time_of_the_first_evaluation_at_the_target(tmp_path):
    from gradhub_cli.bench_overlap import seconds_to_reach

    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"event": "metrics", "version": 50, "wall_seconds": 0.5},
        {"event": "eval", "version": 100, "wall_seconds": 1.0, "test_accuracy": 0.85},
        {"event": "eval", "version": 200, "wall_seconds": 2.0, "test_accuracy": 0.91},
        {"event": "eval", "version": 300, "wall_seconds": 3.0, "test_accuracy": 0.89},
        {"event": "eval", "version": 400, "wall_seconds": 4.0, "test_accuracy": 0.95},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert seconds_to_reach(metrics, 0.9) == 2.0
    assert seconds_to_reach(metrics, 0.85) == 1.0
    assert seconds_to_reach(metrics, 0.96) is None
