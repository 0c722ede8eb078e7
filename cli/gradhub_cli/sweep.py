"""`gradhub sweep`: a grid of real training runs, summarised as a CSV, plots and a report.

The grid is policies x workers x delays x slowdowns x injected staleness x compression,
each cell repeated for every seed. A policy is a mode name (`async`) or a label with
run settings (`backup=mode=sync,backup_workers=1`). The grid comes from flags or from
a YAML file (`--config`), flags winning:

    policies: {sync: {mode: sync}, backup: {mode: sync, backup_workers: 1}, ssp: {mode: ssp}}
    workers: [4]
    slowdown: ["0:3"]
    seeds: [0, 1, 2]
    set: {steps: 3000}        # settings for every run
    baseline: sync            # the policy the others are compared with

Every run is a `gradhub run` in its own folder under OUT/runs; a folder that already
holds a finished run of the same command is reused, so an interrupted sweep resumes.

Written to OUT: `results.csv` (one row per run), `report.md` (the command, the table
per cell with mean and spread over seeds, time to reach the baseline's final accuracy,
and, when injected staleness varies, how much of async's loss each policy recovers),
`accuracy_vs_steps.png`, `accuracy_vs_wall.png`, `accuracy_vs_staleness.png`,
`staleness.png`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradhub.config import RunConfig
from gradhub.errors import ConfigurationError
from gradhub.processes import die_with_parent
from gradhub_cli.main import EXIT_DIVERGED
from gradhub_cli.runs import finished_with, record_command

#: Grid axes besides policies and seeds, with the `gradhub run` setting each one sets.
AXES = ("workers", "delay", "slowdown", "inject_staleness", "compression")
_FIELDS = {f for f in RunConfig.__dataclass_fields__ if f != "run_id"}


@dataclass(frozen=True)
class Cell:
    policy: str
    settings: tuple[tuple[str, Any], ...]  # the policy's settings, then the axes'

    @property
    def label(self) -> str:
        parts = [self.policy] + [f"{k}={v}" for k, v in self.settings if k in AXES]
        return " ".join(parts)

    @property
    def slug(self) -> str:
        text = "-".join([self.policy] + [f"{k}{v}" for k, v in self.settings if k in AXES])
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)

    def value(self, key: str) -> Any:
        return dict(self.settings).get(key)


@dataclass
class Grid:
    policies: dict[str, dict[str, Any]]
    axes: dict[str, list[Any]]
    seeds: list[int]
    fixed: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None

    def cells(self) -> list[Cell]:
        names = [a for a in AXES if a in self.axes]
        cells = []
        for policy, settings in self.policies.items():
            for combo in itertools.product(*(self.axes[a] for a in names)):
                cells.append(Cell(policy, tuple(settings.items()) + tuple(zip(names, combo))))
        return cells


def _setting(key: str, value: Any) -> tuple[str, Any]:
    key = key.replace("-", "_")
    if key not in _FIELDS:
        raise ConfigurationError(f"{key!r} is not a run setting (one of {sorted(_FIELDS)})")
    return key, value


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """`async` -> ("async", {mode: async}); `backup=mode=sync,backup_workers=1` -> label and settings."""
    label, sep, rest = spec.partition("=")
    if not sep:
        return spec, {"mode": spec}
    settings = dict(_setting(*_split_pair(pair)) for pair in rest.split(",") if pair)
    if "mode" not in settings:
        raise ConfigurationError(f"policy {spec!r} must set mode, e.g. {label}=mode=sync,...")
    return label, settings


def _split_pair(pair: str) -> tuple[str, Any]:
    key, sep, value = pair.partition("=")
    if not sep:
        raise ConfigurationError(f"expected KEY=VALUE, got {pair!r}")
    return key, yaml.safe_load(value)


def load_grid(args: argparse.Namespace) -> Grid:
    data: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text())
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{args.config}: expected a mapping of grid keys")
        unknown = set(loaded) - {"policies", "seeds", "set", "baseline", *AXES}
        if unknown:
            raise ConfigurationError(f"{args.config}: unknown keys {sorted(unknown)}")
        data = loaded
    policies: dict[str, dict[str, Any]] = {}
    if args.policies:
        policies = dict(parse_policy(p) for p in args.policies)
    elif isinstance(data.get("policies"), dict):
        for label, settings in data["policies"].items():
            settings = dict(_setting(k, v) for k, v in (settings or {"mode": label}).items())
            settings.setdefault("mode", label)
            policies[str(label)] = settings
    elif isinstance(data.get("policies"), list):
        policies = dict(parse_policy(str(p)) for p in data["policies"])
    if not policies:
        policies = {"sync": {"mode": "sync"}, "async": {"mode": "async"}}
    axes = {}
    for axis in AXES:
        given = getattr(args, axis)
        values = given if given is not None else data.get(axis)
        if values is not None:
            axes[axis] = list(values) if isinstance(values, list) else [values]
    fixed = dict(_setting(k, v) for k, v in (data.get("set") or {}).items())
    fixed.update(dict(_setting(*_split_pair(p)) for p in args.set))
    seeds = args.seeds if args.seeds is not None else list(data.get("seeds", [0]))
    baseline = args.baseline or data.get("baseline")
    if baseline is not None and baseline not in policies:
        raise ConfigurationError(f"baseline {baseline!r} is not one of the policies {sorted(policies)}")
    grid = Grid(policies, axes, [int(s) for s in seeds], fixed, baseline)
    for cell in grid.cells():  # every cell must be a valid run before any starts
        values = {**fixed, **dict(cell.settings)}
        RunConfig(run_id="check", **values)
    return grid


def _flags(settings: Iterable[tuple[str, Any]]) -> list[str]:
    flags = []
    for key, value in settings:
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "on" if value else "off"
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            records.append(record)
    return records


def _time_to(evals: Sequence[dict[str, Any]], target: float) -> float | None:
    for record in evals:
        if record["test_accuracy"] >= target:
            return float(record["wall_seconds"])
    return None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present and len(present) == len(values) else None


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_sweep(args: argparse.Namespace) -> int:
    grid = load_grid(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cells = grid.cells()
    total = len(cells) * len(grid.seeds)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    ran = 0
    print(f"sweep: {len(cells)} cells x {len(grid.seeds)} seeds = {total} runs -> {out}", file=sys.stderr)
    for index, (cell, seed) in enumerate(itertools.product(cells, grid.seeds), 1):
        run_dir = out / "runs" / f"{cell.slug}-seed{seed}"
        arguments = [
            "run", *_flags(grid.fixed.items()), *_flags(cell.settings), "--seed", str(seed),
            "--out", str(run_dir), "--no-progress",
        ]
        eta = ""
        if ran:
            per_run = (time.monotonic() - started) / ran
            eta = f", about {per_run * (total - index + 1) / 60:.0f} min left"
        print(f"[{index}/{total}{eta}] {cell.label} seed {seed}", file=sys.stderr, flush=True)
        if finished_with(run_dir, arguments):
            print("    reusing the finished run in that folder", file=sys.stderr, flush=True)
        else:
            result = subprocess.run([sys.executable, "-m", "gradhub_cli", *arguments], capture_output=True,
                                    text=True, preexec_fn=die_with_parent)
            if result.returncode not in (0, EXIT_DIVERGED):  # a diverged run is a result
                print(f"run failed ({run_dir}):\n{result.stderr[-3000:]}", file=sys.stderr)
                return 1
            record_command(run_dir, arguments)
            ran += 1
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(_row(cell, seed, run_dir, summary))
        print(f"    {summary['status']}: accuracy {100 * summary['final_test_accuracy']:.2f} %, {summary['wall_seconds']:.1f} s, "
              f"staleness mean {summary['staleness']['mean']:.2f}", file=sys.stderr, flush=True)
    command = "gradhub sweep " + " ".join(shlex.quote(a) for a in args.argv)
    write_outputs(out, grid, cells, rows, command)
    print(f"written: {out / 'results.csv'}, {out / 'report.md'} and plots", file=sys.stderr)
    return 0


def _row(cell: Cell, seed: int, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    policy = summary.get("policy", {})
    return {
        "policy": cell.policy,
        **{axis: cell.value(axis) for axis in AXES},
        "seed": seed,
        "mode": summary["mode"],
        "status": summary["status"],
        "steps": summary["steps"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "wall_seconds": summary["wall_seconds"],
        "staleness_mean": summary["staleness"]["mean"],
        "staleness_max": summary["staleness"]["max"],
        "pushes_applied": summary["pushes_applied"],
        "pushes_refused": summary["pushes_refused"],
        "pushes_dropped": summary.get("refused_by_reason", {}).get("LatePush", 0),
        "wait_seconds": summary.get("wait_seconds", 0.0),
        "ssp_max_lead": policy.get("max_lead"),
        "run_dir": str(run_dir),
    }


def write_outputs(out: Path, grid: Grid, cells: list[Cell], rows: list[dict[str, Any]], command: str) -> None:
    evals = {r["run_dir"]: _evals(Path(r["run_dir"])) for r in rows}
    targets: dict[tuple[Any, ...], float] = {}
    if grid.baseline is not None:
        # Each run is timed to the final accuracy of the baseline run with its seed and axes.
        targets = {_pair_key(r): r["final_test_accuracy"] for r in rows if r["policy"] == grid.baseline}
    for r in rows:
        target = targets.get(_pair_key(r))
        r["baseline_final_accuracy"] = target
        r["seconds_to_baseline_accuracy"] = None if target is None else _time_to(evals[r["run_dir"]], target)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_cell = {c: [r for r in rows if _matches(r, c)] for c in cells}
    lines = [f"# Sweep: {len(cells)} cells x {len(grid.seeds)} seeds", "", "Reproduce with:", "",
             f"    {command}", ""]
    if grid.fixed:
        lines += [f"Settings of every run: {', '.join(f'{k}={v}' for k, v in grid.fixed.items())}.", ""]
    lines += _cell_table(cells, by_cell, grid)
    lines += _staleness_table(cells, by_cell)
    lines += ["", "![accuracy against steps](accuracy_vs_steps.png)",
              "![accuracy against wall time](accuracy_vs_wall.png)",
              "![final accuracy against mean staleness](accuracy_vs_staleness.png)",
              "![staleness histograms](staleness.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plots(out, cells, by_cell, evals)


def _pair_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["seed"], *(row[a] for a in AXES))


def _matches(row: dict[str, Any], cell: Cell) -> bool:
    return row["policy"] == cell.policy and all(row[a] == cell.value(a) for a in AXES)


def _pct(values: Sequence[float]) -> str:
    return f"{100 * statistics.fmean(values):.2f} ± {100 * _spread(values):.2f} %"


def _cell_table(cells: list[Cell], by_cell: dict[Cell, list[dict[str, Any]]], grid: Grid) -> list[str]:
    timed = grid.baseline is not None
    header = ("| cell | final test accuracy (mean ± sd) | diverged | wall time | mean staleness | dropped | "
              "waits (s) |")
    rule = "|---|---|---|---|---|---|---|"
    if timed:
        header += f" time to {grid.baseline}'s final accuracy | vs {grid.baseline} |"
        rule += "---|---|"
    lines = [header, rule]
    base_times = {
        tuple((a, c.value(a)) for a in AXES): _mean([r["seconds_to_baseline_accuracy"] for r in by_cell[c]])
        for c in cells if c.policy == grid.baseline
    }
    for cell in cells:
        runs = by_cell[cell]
        line = (
            f"| {cell.label} | {_pct([r['final_test_accuracy'] for r in runs])} | "
            f"{sum(r['status'] == 'diverged' for r in runs)}/{len(runs)} | "
            f"{statistics.fmean(r['wall_seconds'] for r in runs):.1f} s | "
            f"{statistics.fmean(r['staleness_mean'] for r in runs):.2f} | "
            f"{sum(r['pushes_dropped'] for r in runs)} | {statistics.fmean(r['wait_seconds'] for r in runs):.1f} |"
        )
        if timed:
            times = [r["seconds_to_baseline_accuracy"] for r in runs]
            mean = _mean(times)
            reached = sum(t is not None for t in times)
            base = base_times.get(tuple((a, cell.value(a)) for a in AXES))
            shown = f"{mean:.1f} s" if mean is not None else f"reached in {reached}/{len(times)} runs"
            ratio = f"{mean / base:.2f}x" if mean is not None and base else "–"
            line += f" {shown} | {ratio} |"
        lines.append(line)
    if any(r["status"] == "diverged" for runs in by_cell.values() for r in runs):
        lines += ["", "A run diverged when its gradients stayed NaN/Inf; it counts with the accuracy of its "
                      "last model."]
    if timed:
        lines += ["", f"Time to {grid.baseline}'s final accuracy: wall seconds from the server's start to the first "
                      f"evaluation (every `eval_every` versions, and at the end) at or above the final test "
                      f"accuracy of the `{grid.baseline}` run with the same seed, averaged over seeds; the ratio "
                      f"is to `{grid.baseline}`'s own time to it (below 1: faster). A policy that never reaches it "
                      f"in some seed shows in how many it did."]
    return lines


def _staleness_table(cells: list[Cell], by_cell: dict[Cell, list[dict[str, Any]]]) -> list[str]:
    """When injected staleness varies: accuracy by tau per policy, and how much of the plain
    async policy's loss (against its tau = 0) each other policy recovers."""
    taus = sorted({c.value("inject_staleness") for c in cells if c.value("inject_staleness") is not None})
    if len(taus) < 2:
        return []
    policies = list(dict.fromkeys(c.policy for c in cells))
    mean_at: dict[tuple[str, int], float] = {}
    spread_at: dict[tuple[str, int], float] = {}
    for cell in cells:
        finals = [r["final_test_accuracy"] for r in by_cell[cell]]
        mean_at[(cell.policy, cell.value("inject_staleness"))] = statistics.fmean(finals)
        spread_at[(cell.policy, cell.value("inject_staleness"))] = _spread(finals)
    lines = ["", "## Accuracy by injected staleness tau", "",
             "| policy | " + " | ".join(f"tau = {t}" for t in taus) + " |",
             "|---|" + "---|" * len(taus)]
    for policy in policies:
        cells_text = [
            f"{100 * mean_at[(policy, t)]:.2f} ± {100 * spread_at[(policy, t)]:.2f} %" if (policy, t) in mean_at else "–"
            for t in taus
        ]
        lines.append(f"| {policy} | " + " | ".join(cells_text) + " |")
    if "async" in policies and ("async", taus[0]) in mean_at:
        reference = mean_at[("async", taus[0])]
        lines += ["", f"Loss against plain async at tau = {taus[0]} ({100 * reference:.2f} %), in points, and the "
                      "share of plain async's loss that each policy recovers:", "",
                  "| policy | " + " | ".join(f"tau = {t}" for t in taus[1:]) + " |", "|---|" + "---|" * (len(taus) - 1)]
        for policy in policies:
            parts = []
            for t in taus[1:]:
                if (policy, t) not in mean_at or ("async", t) not in mean_at:
                    parts.append("–")
                    continue
                loss = 100 * (reference - mean_at[(policy, t)])
                share = recovered_share(reference, spread_at[("async", taus[0])], mean_at[("async", t)],
                                        mean_at[(policy, t)])
                if policy == "async":
                    recovered = ""
                elif share is None:
                    recovered = ", async lost too little to tell"
                else:
                    recovered = f", recovers {100 * share:.0f} %"
                parts.append(f"{loss:+.2f} pts{recovered}")
            lines.append(f"| {policy} | " + " | ".join(parts) + " |")
        lines += ["", "A share is (async's loss - the policy's loss) / async's loss, shown only where async lost "
                      f"more than {100 * MIN_MEASURABLE_LOSS:.0f} point and twice its own spread over seeds at "
                      f"tau = {taus[0]}: below that the ratio of two small, noisy differences says nothing."]
    return lines


#: The least loss of plain async (a fraction of accuracy) a recovery share is computed against.
MIN_MEASURABLE_LOSS = 0.01


def recovered_share(reference: float, reference_spread: float, async_mean: float, policy_mean: float) -> float | None:
    """The share of plain async's accuracy loss (against `reference`, async at the smallest
    tau) that a policy recovers: 1 is all of it, 0 none, negative a policy worse than async.
    None where async lost too little (under a point, or under twice the reference's spread
    over seeds) for the ratio to mean anything."""
    async_loss = reference - async_mean
    if async_loss <= max(MIN_MEASURABLE_LOSS, 2 * reference_spread):
        return None
    return (async_loss - (reference - policy_mean)) / async_loss


def _plots(out: Path, cells: list[Cell], by_cell: dict[Cell, list[dict[str, Any]]],
           evals: dict[str, list[dict[str, Any]]]) -> None:
    from gradhub.plots import _pyplot

    plt = _pyplot()
    # Ten colours repeat past ten cells; tab20 keeps up to twenty apart.
    colors = list(plt.get_cmap("tab20").colors) if len(cells) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for x_key, x_label, name in (("version", "step (model version)", "accuracy_vs_steps.png"),
                                 ("wall_seconds", "wall time (s)", "accuracy_vs_wall.png")):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, cell in enumerate(cells):
            for j, run in enumerate(by_cell[cell]):
                records = evals[run["run_dir"]]
                ax.plot([r[x_key] for r in records], [100 * r["test_accuracy"] for r in records],
                        color=colors[i % len(colors)], alpha=0.8, linewidth=1.2,
                        label=cell.label if j == 0 else None)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("test accuracy, every seed of every cell")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    # One colour per policy: every run a dot, the policy's mean per cell joined by a line
    # (in staleness order), so a policy's fall with staleness reads as one curve.
    fig, ax = plt.subplots(figsize=(9, 5))
    policies = list(dict.fromkeys(cell.policy for cell in cells))
    policy_colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, policy in enumerate(policies):
        color = policy_colors[i % len(policy_colors)]
        means = []
        for cell in (c for c in cells if c.policy == policy):
            runs = by_cell[cell]
            ax.scatter([r["staleness_mean"] for r in runs], [100 * r["final_test_accuracy"] for r in runs],
                       color=color, alpha=0.45, s=18)
            means.append((statistics.fmean(r["staleness_mean"] for r in runs),
                          statistics.fmean(100 * r["final_test_accuracy"] for r in runs)))
        means.sort()
        ax.plot([m[0] for m in means], [m[1] for m in means], color=color, marker="o", label=f"{policy} (mean)")
    ax.set_xlabel("mean staleness of applied pushes (versions)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_staleness.png", dpi=110)
    plt.close(fig)
    columns = min(4, len(cells))
    rows_n = math.ceil(len(cells) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.6 * columns, 2.8 * rows_n), squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        histogram: dict[int, int] = {}
        for run in by_cell[cell]:
            summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
            for s, n in summary["staleness"]["histogram"].items():
                histogram[int(s)] = histogram.get(int(s), 0) + n
        ax.bar(list(histogram), list(histogram.values()), color="tab:blue")
        ax.set_title(cell.label, fontsize=8)
        ax.set_xlabel("staleness", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.set_visible(False)
    fig.suptitle("pushes by staleness, all seeds")
    fig.tight_layout()
    fig.savefig(out / "staleness.png", dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradhub sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with the grid (flags win over it)")
    parser.add_argument("--policies", nargs="+",
                        help="mode names, or LABEL=mode=M,key=value,... (default: sync async)")
    parser.add_argument("--workers", nargs="+", type=int, help="worker counts")
    parser.add_argument("--delay", nargs="+", help="delay distributions (see gradhub run --delay)")
    parser.add_argument("--slowdown", nargs="+", help="slowdown settings, e.g. 0:3 (quote '' for none)")
    parser.add_argument("--inject-staleness", nargs="+", type=int, dest="inject_staleness", help="tau values")
    parser.add_argument("--compression", nargs="+", help="codecs")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to repeat every cell with (default 0)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="a setting of every run")
    parser.add_argument("--baseline", help="the policy others are timed against (time to its final accuracy)")
    parser.add_argument("--out", type=Path, default=Path("sweeps") / time.strftime("%Y%m%d-%H%M%S"),
                        help="folder for runs, results.csv, report.md and plots")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run_sweep(args)
    except ConfigurationError as exc:
        print(f"gradhub sweep: {exc}", file=sys.stderr)
        return 2
