"""The progress line: what it shows, and that a log (not a terminal) gets whole lines, no repeats."""

from __future__ import annotations

import io

import pytest

from gradhub_cli.progress import ProgressLine, format_status

pytestmark = pytest.mark.timeout(10)

STATUS = {"mode": "async", "version": 450, "steps": 900, "train_loss": 0.25, "test_accuracy": 0.931,
          "pushes_per_second": 212.4, "staleness_mean": 1.5, "staleness_max": 7, "pushes_refused": 3,
          "live_workers": [{}, {}, {}], "wall_seconds": 12.2}


def test_the_line_shows_step_loss_accuracy_rate_staleness_and_workers():
    line = format_status(STATUS, workers_planned=3)
    for text in ("[async] step 450/900", " 50%", "loss 0.250", "test acc 93.1%", "212 pushes/s",
                 "staleness 1.50 (max 7)", "refused 3", "workers 3/3", "12s"):
        assert text in line


def test_a_log_gets_one_line_per_interval_and_no_repeated_last_line():
    stream = io.StringIO()
    progress = ProgressLine(stream, log_interval=3600)
    progress.update("first")
    progress.update("second (within the interval: not printed)")
    progress.finish("first")
    progress.finish("done")
    assert stream.getvalue().splitlines() == ["first", "done"]


def test_a_log_does_not_repeat_a_step_whose_rate_moved():
    stream = io.StringIO()
    progress = ProgressLine(stream, log_interval=0)
    progress.update("step 3000/3000 | 166 pushes/s", key=3000)
    progress.finish("step 3000/3000 | 171 pushes/s", key=3000)
    progress.update("step 10 | 5 pushes/s", key=10)
    assert stream.getvalue().splitlines() == ["step 3000/3000 | 166 pushes/s", "step 10 | 5 pushes/s"]
