"""Measure what the README reports: the default runs over several seeds, and DDP beside them.

For each seed it runs `gradhub run` with the defaults (sync with 2 workers, async with
3) and times the whole command (start-up included), then runs the DDP/gloo reference
with the same recipe in the same session, and prints a markdown table.

    .venv/bin/python scripts/measure_defaults.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gradhub_run(mode: str, workers: int, seed: int, out: Path) -> dict:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "gradhub_cli", "run", "--mode", mode, "--workers", str(workers),
         "--seed", str(seed), "--out", str(out), "--no-progress"],
        check=True, capture_output=True, text=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    summary["command_seconds"] = time.monotonic() - started
    return summary


def ddp(workers: int, seed: int) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ddp_reference.py"), "--workers", str(workers),
         "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for mode, workers in (("sync", 2), ("async", 3)):
            runs = [gradhub_run(mode, workers, s, Path(folder) / f"{mode}-{s}") for s in args.seeds]
            for run in runs:
                print(f"{mode} seed {run['seed']}: {run['final_test_accuracy']:.4f} in "
                      f"{run['command_seconds']:.1f}s", file=sys.stderr)
            rows.append((
                f"`gradhub run --mode {mode} --workers {workers}`", runs[0]["steps"],
                [r["final_test_accuracy"] for r in runs], [r["command_seconds"] for r in runs],
                [r["wall_seconds"] for r in runs], runs[0]["staleness"]["max"],
                statistics.mean(r["staleness"]["mean"] for r in runs),
            ))
    refs = [ddp(2, s) for s in args.seeds]
    print(f"seeds {args.seeds}; accuracy on the 1,000 held-out MNIST-1D signals\n")
    print("| command | steps | test accuracy (min / mean / max) | command wall time, start-up included "
          "(max) | training wall time (mean) | ms per step | staleness mean / max |")
    print("|---|---|---|---|---|---|---|")
    for name, steps, accs, command, wall, smax, smean in rows:
        print(f"| {name} | {steps} | {100 * min(accs):.1f} / {100 * statistics.mean(accs):.1f} / "
              f"{100 * max(accs):.1f} % | {max(command):.1f} s | {statistics.mean(wall):.1f} s | "
              f"{1000 * statistics.mean(wall) / steps:.1f} | {smean:.2f} / {smax} |")
    accs = [r["final_test_accuracy"] for r in refs]
    wall = statistics.mean(r["wall_seconds"] for r in refs)
    print(f"| reference: DDP over gloo, 2 processes, same recipe (`scripts/ddp_reference.py`) | "
          f"{refs[0]['steps']} | {100 * min(accs):.1f} / {100 * statistics.mean(accs):.1f} / "
          f"{100 * max(accs):.1f} % | - | {wall:.1f} s | {1000 * wall / refs[0]['steps']:.1f} | 0 / 0 |")


if __name__ == "__main__":
    main()
