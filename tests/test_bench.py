"""`gradhub bench`: the suites run for real at small sizes and their outputs say what the
README's tables rely on (the figures themselves are the README's, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert topk["ratio"] > 10  # 5 % of the coordinates: fp16 values and varint indices
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
