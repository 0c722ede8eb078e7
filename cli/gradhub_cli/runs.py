"""Run folders that commands driving many runs (bench, sweep) can reuse: a folder holding a
finished run of exactly the same command is not run again, so an interrupted sweep of
hour-long runs resumes where it stopped instead of starting over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMAND_FILE = "bench-command.json"


def finished_with(run_dir: Path, arguments: list[str]) -> bool:
    try:
        recorded = json.loads((run_dir / COMMAND_FILE).read_text())
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return False
    return bool(recorded == arguments and status in ("finished", "diverged"))


def record_command(run_dir: Path, arguments: list[str]) -> None:
    (run_dir / COMMAND_FILE).write_text(json.dumps(arguments) + "\n")


def run_or_reuse(run_dir: Path, command: list[str]) -> dict[str, Any]:
    """`command` (`python -m gradhub_cli run ... --out run_dir`), unless `run_dir` already
    holds a finished run of it; the run's summary.json either way."""
    arguments = command[3:]
    if finished_with(run_dir, arguments):
        print("    reusing the finished run already in that folder", file=sys.stderr, flush=True)
    else:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run failed:\n{result.stderr[-2000:]}")
        record_command(run_dir, arguments)
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary
