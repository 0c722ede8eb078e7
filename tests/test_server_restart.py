"""A server killed with SIGKILL restarts from its newest good checkpoint and replays its update
journal after it; workers follow it. Without the journal, the versions after the checkpoint are lost."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import Processes, small_config, wait_until
from gradhub.coordination import RunCoordinator
from gradhub_server import checkpoints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_a_killed_server_resumes_from_its_newest_good_checkpoint_and_the_workers_follow_it(
    processes: Processes, redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path,
    journal: bool,
):
    config = coordinator.publish_config(small_config(run_id, steps=1500, eval_every=100, lr=0.05))
    out = tmp_path / "run"
    folder = out / checkpoints.FOLDER
    common = ["--redis-url", redis_url, "--run-id", config.run_id, "--torch-threads", "1"]
    server_args = [*common, "--out", str(out), "--drain-timeout", "5", "--checkpoint-every", "100",
                   *([] if journal else ["--no-journal"])]
    first = processes.module("server", "gradhub_server", *server_args)
    workers = [processes.module(f"worker-{rank}", "gradhub_worker", *common, "--worker-id", f"worker-{rank}")
               for rank in range(2)]
    address = coordinator.wait_server(60)
    wait_until(lambda: len(list(folder.glob("ckpt-*.json"))) >= 3, 60, "three checkpoints")

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    published = coordinator.read_status()["version"]  # what the dead server had reported last
    manifests = sorted(folder.glob("ckpt-*.json"))
    newest, previous = manifests[-1], manifests[-2]
    # A torn write of the newest: its bytes no longer match its manifest.
    payload = newest.with_suffix(".pt")
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    kept = json.loads(previous.read_text())["version"]

    second = processes.module("server-2", "gradhub_server", *server_args)
    assert second.wait(timeout=120) == 0, processes.log("server-2")
    for rank, worker in enumerate(workers):
        assert worker.wait(timeout=30) == 0, processes.log(f"worker-{rank}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1500
    assert summary["restored_from_version"] == kept
    replayed = summary["versions_replayed"]
    if journal:
        # Everything the dead server applied came back: at least what it had published.
        assert summary["versions_lost"] == 0
        assert replayed >= published - kept > 0
        # Exactly once across the restart: every step carried both workers' pushes, each
        # counted once (counters restored and replayed; no retry applied a second time).
        assert summary["pushes_applied"] == 2 * 1500
        assert all(w["pushes_applied"] == 1500 for w in summary["per_worker"].values())
    else:
        assert replayed == 0
        assert summary["versions_lost"] == published - kept > 0
    print(f"killed at version {published}; restored from {kept}; {replayed} versions replayed; "
          f"{summary['versions_lost']} versions lost")
    log = processes.log("server-2")
    assert f"skipping checkpoint {payload.name}: its bytes do not match its manifest" in log
    # The workers found the new server (on another port) by themselves and trained on.
    for rank in range(2):
        assert "reconnecting" in processes.log(f"worker-{rank}")
    assert address not in processes.log("server-2")
    # Training went on from the checkpoint, not from scratch: the restarted server's first
    # evaluation (at the restored version) is no worse than the first server's last one
    # before that version (the initial model scores about 0.1).
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    restored_at = next(i for i, e in enumerate(events) if e["event"] == "restored")
    before = [e for e in events[:restored_at] if e["event"] == "eval" and e["version"] <= kept]
    after = next(e for e in events[restored_at:] if e["event"] == "eval")
    assert before and after["version"] == kept + replayed
    assert after["test_accuracy"] >= before[-1]["test_accuracy"]
    # A finished run is not resumed by mistake: the same run id on the same folder is refused.
    third = processes.module("server-3", "gradhub_server", *server_args)
    assert third.wait(timeout=60) == 2
    assert f"run {run_id} already finished" in processes.log("server-3")
    # Checkpoints load without unpickling anything but tensors and plain values.
    state, _ = checkpoints.load_newest(folder)
    assert isinstance(state["model"], dict) and all(isinstance(v, torch.Tensor) for v in state["model"].values())
