"""Run folders that commands driving many runs (bench, sweep) can reuse: a folder holding a
finished run of exactly the same command is not run again, so an interrupted sweep of
hour-long runs resumes where it stopped instead of starting over."""

from __future__ import annotations

import json
from pathlib import Path

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
