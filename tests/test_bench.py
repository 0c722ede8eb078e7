"""`gradhub bench`: the suites run for real at small sizes and their outputs say what the
README's tables rely on (the figures themselves are the README's, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "gradhub_cli", "bench", *args],
                            capture_output=True, text=True, timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(out: Path, suite: str) -> list[dict]:
    assert (out / f"{suite}.md").read_text().count("|") > 0
    return json.loads((out / f"{suite}.json").read_text())["rows"]


def test_codecs_suite_trains_each_codec_reports_its_ratio_and_resumes(tmp_path: Path):
    args = ("codecs", "--model", "cnn", "--modes", "sync", "--codecs", "none", "topk:0.05",
            "--steps", "20", "--out", str(tmp_path), "--extra", "--dense-below", "0")
    first = bench(*args)
    assert "reusing" not in first.stderr
    measured = rows(tmp_path, "codecs")
    assert [r["codec"] for r in measured] == ["none", "topk:0.05"]
    none, topk = measured
    assert none["steps"] == topk["steps"] == 20
    assert 0.95 < none["ratio"] <= 1.0  # dense fp32 is the reference; framing costs a little
    assert topk["ratio"] > 10  # 5 % of the coordinates: fp16 values and raw int32 indices (4 / 0.3)
    assert "+0.00 pts" in (tmp_path / "codecs.md").read_text()

    # A second invocation finds both runs finished with the same command and reuses them.
    second = bench(*args)
    assert second.stderr.count("reusing the finished run") == 2
    assert rows(tmp_path, "codecs") == measured


def test_micro_suites_measure_what_their_tables_state(tmp_path: Path):
    bench("topk", "--sizes", "300000", "--ratios", "0.01", "--repeats", "1", "--out", str(tmp_path))
    (topk,) = rows(tmp_path, "topk")
    assert topk["k"] == 3000 and topk["recall"] == 1.0 and topk["approx_ms"] > 0

    bench("apply", "--sizes", "10000", "200000", "--k", "100", "--repeats", "3", "--out", str(tmp_path))
    assert [r["numel"] for r in rows(tmp_path, "apply")] == [10000, 200000]

    bench("indices", "--numel", "100000", "--densities", "0.001", "0.5", "--repeats", "1", "--out", str(tmp_path))
    chosen = {r["density"]: r["encoding"] for r in rows(tmp_path, "indices") if r["chosen"]}
    assert chosen == {0.001: "delta-varint", 0.5: "bitmap"}


def test_wire_suite_measures_a_real_cluster_beside_raw_tcp_and_gloo(tmp_path: Path):
    bench("wire", "--sizes", "200000", "--workers", "2", "--codecs", "none", "topk:0.01+fp16",
          "--repeats", "2", "--rounds", "2", "--out", str(tmp_path))
    dense, topk = rows(tmp_path, "wire")
    assert [dense["codec"], topk["codec"]] == ["none", "topk:0.01+fp16"]
    for row in (dense, topk):  # two passes over the codecs, each timed on its own
        assert row["rounds"] == 2 and len(row["push_pull_ms_per_round"]) == 2
        assert all(ms > 0 for ms in row["push_pull_ms_per_round"])
    # The bytes that crossed: dense fp32 is 4 bytes a parameter plus framing; top-k 1 % far less.
    assert 4 * 200_000 <= dense["push_bytes"] < 1.02 * 4 * 200_000
    assert topk["push_bytes"] < dense["push_bytes"] / 20
    # A delta pull after one sparse step sends what the step changed, not the whole model.
    assert topk["pull_delta"] and topk["pull_bytes"] < dense["pull_bytes"] / 10
    for row in (dense, topk):
        assert row["push_ms"] > 0 and row["pull_ms"] > 0 and row["push_pull_ms"] > 0
        assert row["raw_tcp_push_ms"] > 0 and row["gloo_allreduce_ms"] > 0
        assert row["push_of_raw"] == pytest.approx(row["raw_tcp_push_ms"] / row["push_ms"])
        # The same step's bytes through a bare gRPC server, in the same run.
        assert row["bare_grpc_push_pull_ms"] > 0
        assert row["push_pull_vs_bare_grpc"] == pytest.approx(row["push_pull_ms"] / row["bare_grpc_push_pull_ms"])
    assert dense["push_pull_speedup_vs_dense"] == 1.0
    # Pass by pass, each codec against the dense pass of the same minutes.
    assert topk["push_pull_speedup_vs_dense_per_round"] == pytest.approx(
        [d / t for d, t in zip(dense["push_pull_ms_per_round"], topk["push_pull_ms_per_round"])])
    assert "bare gRPC" in (tmp_path / "wire.md").read_text()


def test_the_wire_table_shows_the_passes_range_of_a_speed_up():
    from gradhub_cli.bench_wire import add_speedups, format_speedup

    def row(codec: str, ms: float, per_round: list[float]) -> dict:
        return {"parameters": 50_000_000, "workers": 1, "codec": codec, "push_pull_ms": ms,
                "push_pull_ms_per_round": per_round}

    rows = [row("none", 400.0, [420.0, 390.0, 390.0]), row("topk:0.01+fp16", 25.0, [20.0, 25.0, 26.0])]
    add_speedups(rows)
    dense, topk = rows
    assert topk["push_pull_speedup_vs_dense"] == pytest.approx(16.0)
    assert topk["push_pull_speedup_vs_dense_per_round"] == pytest.approx([21.0, 15.6, 15.0])
    assert format_speedup(topk) == "16.0x (passes 15.0–21.0x)"
    assert format_speedup(dense) == "1.0x"  # the reference itself: no range


def test_the_bare_grpc_reference_sends_the_bytes_in_chunks_and_waits_for_every_client():
    from gradhub_cli.bench_bare_grpc import _Barrier, _messages

    assert [len(m) for m in _messages(10, 4)] == [4, 4, 2]
    assert [len(m) for m in _messages(8, 4)] == [4, 4]
    assert _messages(0, 4) == [b""]  # a stream still carries one message
    barrier = _Barrier(2)
    with pytest.raises(TimeoutError, match="2 clients did not all arrive"):
        barrier.wait(0.01)  # alone: the second client never comes


def test_shards_suite_steps_against_every_shard_and_stops_them(tmp_path: Path):
    # Big enough that the servers' CPU spans several of /proc's 10 ms ticks.
    bench("shards", "--parameters", "400000", "--shards", "1", "2", "--repeats", "12", "--rounds", "2",
          "--out", str(tmp_path))
    measured = rows(tmp_path, "shards")
    # Two rounds, the second in reverse order: 1, 2, then 2, 1.
    assert [(r["round"], r["shards"]) for r in measured] == [(1, 1), (1, 2), (2, 2), (2, 1)]
    for row in measured:
        assert row["parameters_per_shard"] == 400_000 // row["shards"]
        assert row["push_pull_ms"] > 0 and row["gloo_allreduce_ms"] > 0
        assert row["push_pull_vs_gloo"] == pytest.approx(row["push_pull_ms"] / row["gloo_allreduce_ms"])
        # CPU read from the servers' and workers' own counters while they stepped.
        assert row["server_cpu_ms_per_step"] > 0 and row["worker_cpu_ms_per_step"] > 0
    assert "| 2 | 2 |" in (tmp_path / "shards.md").read_text()
    # Every server of every cell is gone.
    left = subprocess.run(["pgrep", "-f", "run-id bench-shards-"], capture_output=True, text=True)
    assert left.stdout == ""


def test_overhead_suite_times_a_local_step_and_a_real_clusters_step_per_run(tmp_path: Path):
    # 1,000 steps: a few seconds, so several once-a-second metrics records to time steps by.
    bench("overhead", "--steps", "1000", "--repeats", "50", "--runs", "2", "--out", str(tmp_path))
    runs = rows(tmp_path, "overhead")
    assert [row["run"] for row in runs] == [1, 2]
    for row in runs:
        assert row["model"] == "cnn" and row["workers"] == 2
        assert 0 < row["local_step_ms"] < row["cluster_step_ms"]
        assert row["overhead_ms"] == pytest.approx(row["cluster_step_ms"] - row["local_step_ms"])
        assert (tmp_path / "runs" / f"overhead-cnn-2w-{row['run']}" / "summary.json").exists()
        # Linux has /proc/stat: the share of CPU the host took from this machine is stated.
        assert row["cpu_steal"] is not None and 0.0 <= row["cpu_steal"] <= 1.0
    assert "| median |" in (tmp_path / "overhead.md").read_text()


def test_cluster_step_time_uses_every_record_of_a_run_too_short_for_its_middle(tmp_path: Path):
    from gradhub_cli.bench_wire import cluster_step_ms

    metrics = tmp_path / "metrics.jsonl"
    records = [{"event": "metrics", "version": v, "wall_seconds": t} for v, t in ((180, 1.0), (400, 2.1))]
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    assert cluster_step_ms(metrics) == pytest.approx(1000 * 1.1 / 220)
    metrics.write_text(json.dumps(records[0]))
    with pytest.raises(SystemExit, match="too few"):
        cluster_step_ms(metrics)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the suite runs (test below)")
def test_transfer_suite_says_it_needs_a_gpu_where_there_is_none(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "gradhub_cli", "bench", "transfer", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no CUDA device here" in result.stderr
    assert not (tmp_path / "transfer.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_transfer_suite_times_a_cuda_workers_encode_and_load_beside_the_bare_dma(tmp_path: Path):
    bench("transfer", "--sizes", "1000000", "--codecs", "fp16", "topk:0.01+fp16", "--repeats", "3",
          "--out", str(tmp_path))
    measured = rows(tmp_path, "transfer")
    assert [(r["kind"], r["what"]) for r in measured] == [
        ("push", "fp16"), ("push", "topk:0.01+fp16"), ("pull", "fp32"), ("pull", "fp16")]
    fp16_push, topk_push, fp32_pull, fp16_pull = measured
    assert fp16_push["wire_bytes"] == 2 * fp16_push["parameters"]
    assert topk_push["wire_bytes"] < fp16_push["wire_bytes"] / 10
    assert fp32_pull["wire_bytes"] == 2 * fp16_pull["wire_bytes"] == 4 * fp32_pull["parameters"]
    assert all(r["ms"] > 0 and r["dma_ms"] > 0 for r in measured)
