"""`gradhub bench overlap`: async training with and without computing the next gradient
while the last push is in flight (`--overlap`), as real clusters through `gradhub run`.

Overlap buys throughput with staleness: every push is computed on parameters from before
the previous push's answer. So the suite reports both sides in one run: pushes per
second, mean staleness, the final accuracy, and the wall time to reach a target
accuracy, the figure that says whether the trade paid. Runs alternate off and on, so
the machine's drift falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gradhub_cli.runs import run_or_reuse


def seconds_to_reach(metrics_path: Path, target: float) -> float | None:
    """Wall seconds of the first evaluation at or above `target` accuracy; None if none was."""
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval" and record.get("test_accuracy", 0.0) >= target:
            return float(record["wall_seconds"])
    return None


def _run(args: argparse.Namespace, mode: str, overlap: bool, repeat: int) -> dict[str, Any]:
    name = f"overlap-{args.model}-{mode}-{'on' if overlap else 'off'}-{repeat}"
    run_dir = args.out / "runs" / name
    command = [
        sys.executable, "-m", "gradhub_cli", "run", "--mode", mode, "--workers", str(args.workers),
        "--model", args.model, "--overlap", "on" if overlap else "off", "--seed", str(args.seed),
        "--out", str(run_dir), "--no-progress", *(["--steps", str(args.steps)] if args.steps else []),
        *args.extra,
    ]
    print(f"{name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    summary = run_or_reuse(run_dir, command)
    wall = float(summary["wall_seconds"])
    return {
        "mode": mode, "overlap": overlap, "repeat": repeat, "model": args.model, "workers": args.workers,
        "steps": summary["steps"], "wall_seconds": wall, "pushes_per_second": summary["pushes_applied"] / wall,
        "staleness_mean": summary["staleness"]["mean"], "final_accuracy": summary["final_test_accuracy"],
        "target": args.target, "seconds_to_target": seconds_to_reach(run_dir / "metrics.jsonl", args.target),
        "command": " ".join(command[3:]),
    }


def bench_overlap(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    for repeat in range(1, args.runs + 1):
        for mode in args.modes:
            # Off first in odd repeats, on first in even ones.
            order = (False, True) if repeat % 2 else (True, False)
            rows.extend(_run(args, mode, overlap, repeat) for overlap in order)
    rows.sort(key=lambda r: (r["mode"], r["repeat"], r["overlap"]))
    lines = [
        f"{args.model}, {args.workers} workers, seed {args.seed}: the same run without and with `--overlap` "
        f"(runs alternate); time to {args.target:.0%} is the wall time of the first evaluation at or above it",
        "",
        "| mode | run | overlap | pushes/s | staleness (mean) | final accuracy | time to "
        f"{args.target:.0%} | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reached = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f} s"
        lines.append(
            f"| {r['mode']} | {r['repeat']} | {'on' if r['overlap'] else 'off'} | {r['pushes_per_second']:.0f} | "
            f"{r['staleness_mean']:.2f} | {r['final_accuracy']:.2%} | {reached} | {r['wall_seconds']:.1f} s |"
        )
    return rows, "\n".join(lines)
