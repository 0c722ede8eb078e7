"""`gradhub bench SUITE`: measurements, written as JSON and a markdown table.

Suites:
  codecs   train the same model, seed and steps with each codec, in each mode (real
           clusters through `gradhub run`): bytes on the wire per push and pull, ratio
           to dense fp32, final test accuracy and its difference to the uncompressed run.
           A finished run of the same command already under --out is reused (resume).
  topk     exact against approximate top-k selection: time and recall, up to 25 M elements
  apply    the server applying a fixed-k sparse gradient to models of growing size
           (flat in model size when the apply is O(k)), beside a dense apply
  indices  index encodings (raw, delta-varint, bitmap): bytes per index and time, by density
  wire     push, pull and push+pull against a real server by model size, workers and codec,
           beside raw loopback TCP moving the same bytes and a gloo all_reduce (ratios)
  shards   a sync push+pull against S servers of parameters/S each (what partitioning the
           parameters across server processes would give), with the CPU each side used
  overhead a real cluster's sync step against a local training step of the same batch
  overlap  async training without and with --overlap (the next gradient computed while
           the last push is in flight): pushes/s, staleness, accuracy, time to a target
  transfer a CUDA worker's encode and load, beside the bare DMA of the same bytes (needs a GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradhub import index_coding
from gradhub.codecs import ApproxTopK, Float16Values, exact_topk
from gradhub.config import MODES
from gradhub_cli.runs import run_or_reuse


def _median_seconds(repeats: int, fn: Callable[..., object], *args: Any) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _write(out: Path, suite: str, rows: list[dict[str, Any]], table: str, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{suite}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / f"{suite}.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / (suite + '.json')}, {out / (suite + '.md')}", file=sys.stderr)


# --- codecs: whole training runs ---------------------------------------------------------


def bench_codecs(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        for codec in args.codecs:
            name = f"{mode}-{codec.replace(':', '_').replace('+', '_')}"
            run_dir = args.out / "runs" / name
            command = [
                sys.executable, "-m", "gradhub_cli", "run", "--mode", mode, "--compression", codec,
                "--model", args.model, "--workers", str(args.workers), "--seed", str(args.seed),
                "--out", str(run_dir), "--no-progress", *(["--steps", str(args.steps)] if args.steps else []),
                *args.extra,
            ]
            print(f"[{len(rows) + 1}/{len(args.modes) * len(args.codecs)}] {' '.join(command[3:])}",
                  file=sys.stderr, flush=True)
            summary = run_or_reuse(run_dir, command)
            pushes = summary["pushes_applied"] + summary["pushes_refused"] + summary.get("pushes_after_finish", 0)
            rows.append({
                "mode": mode, "codec": codec, "steps": summary["steps"],
                "bytes_per_push": summary["bytes_pushed"] / max(1, pushes),
                "bytes_per_pull": summary["bytes_pulled"] / max(1, pushes),
                "ratio": summary["dense_bytes_equivalent"] / max(1, summary["bytes_pushed"]),
                "final_test_accuracy": summary["final_test_accuracy"],
                "wall_seconds": summary["wall_seconds"],
                "staleness_mean": summary["staleness"]["mean"],
                "model_parameters": summary["model_parameters"],
            })
            last = rows[-1]
            print(f"    accuracy {100 * last['final_test_accuracy']:.2f}%, {last['ratio']:.1f}x fewer bytes, "
                  f"{last['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    baseline = {r["mode"]: r["final_test_accuracy"] for r in rows if r["codec"] in ("none", "fp32")}
    lines = [
        f"{args.model} ({rows[0]['model_parameters']:,} parameters), {args.workers} workers, seed {args.seed}, "
        f"same steps per mode; extra flags: {' '.join(args.extra) or 'none'}",
        "",
        "| mode | codec | steps | bytes per push | fewer bytes than dense fp32 | bytes per pull | "
        "test accuracy | vs uncompressed | training time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = ""
        if r["mode"] in baseline:
            delta = f"{100 * (r['final_test_accuracy'] - baseline[r['mode']]):+.2f} pts"
        lines.append(
            f"| {r['mode']} | `{r['codec']}` | {r['steps']} | {r['bytes_per_push']:,.0f} | {r['ratio']:,.1f}x | "
            f"{r['bytes_per_pull']:,.0f} | {100 * r['final_test_accuracy']:.2f} % | {delta} | {r['wall_seconds']:.0f} s |"
        )
    _write(args.out, "codecs", rows, "\n".join(lines), vars_json(args))


# --- micro-benchmarks -------------------------------------------------------------------------


def bench_topk(args: argparse.Namespace) -> None:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for numel in args.sizes:
        gradient = torch.randn(numel, generator=generator)
        for ratio in args.ratios:
            k = max(1, int(ratio * numel))
            approx = ApproxTopK(ratio, Float16Values(), seed=1)
            exact_time = _median_seconds(args.repeats, exact_topk, gradient, k)
            approx_time = _median_seconds(args.repeats, approx.select, gradient, k)
            exact = exact_topk(gradient, k)
            chosen = approx.select(gradient, k)
            recall = torch.isin(chosen, exact).sum().item() / k
            rows.append({"numel": numel, "ratio": ratio, "k": k, "exact_ms": 1000 * exact_time,
                         "approx_ms": 1000 * approx_time, "speedup": exact_time / approx_time,
                         "approx_k": chosen.numel(), "recall": recall})
    lines = ["| elements | ratio | k | exact top-k | approximate | speed-up | recall of the exact top-k |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['numel']:,} | {r['ratio']:g} | {r['k']:,} | {r['exact_ms']:.1f} ms | "
                     f"{r['approx_ms']:.1f} ms | {r['speedup']:.1f}x | {100 * r['recall']:.1f} % |")
    _write(args.out, "topk", rows, "\n".join(lines), vars_json(args))


def bench_apply(args: argparse.Namespace) -> None:
    from torch import nn

    from gradhub_server.update_rules import SparseGradient, build_update_rule

    rows = []
    generator = torch.Generator().manual_seed(0)
    for numel in args.sizes:
        param = nn.Parameter(torch.zeros(numel))
        rule = build_update_rule("sgd", [param], 0.1, 0.0, 0.0)
        indices = torch.sort(torch.randint(numel, (args.k,), generator=generator)).values
        sparse = [SparseGradient(indices, torch.randn(args.k, generator=generator))]
        dense = [torch.randn(numel, generator=generator)]
        sparse_time = _median_seconds(args.repeats, rule.apply, sparse)
        dense_time = _median_seconds(max(3, args.repeats // 10), rule.apply, dense)
        rows.append({"numel": numel, "k": args.k, "sparse_ms": 1000 * sparse_time, "dense_ms": 1000 * dense_time})
    lines = [f"k = {args.k:,} coordinates, SGD (the server's rule under momentum correction)", "",
             "| model parameters | sparse apply (k fixed) | dense apply |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['numel']:,} | {r['sparse_ms']:.3f} ms | {r['dense_ms']:.2f} ms |")
    _write(args.out, "apply", rows, "\n".join(lines), vars_json(args))


def bench_indices(args: argparse.Namespace) -> None:
    rows = []
    numel = args.numel
    generator = torch.Generator().manual_seed(0)
    for density in args.densities:
        k = max(1, int(density * numel))
        indices = torch.sort(torch.randperm(numel, generator=generator)[:k]).values
        for encoding in index_coding.IndexEncoding:
            blob = index_coding.encode(indices, numel, encoding)
            encode_time = _median_seconds(args.repeats, index_coding.encode, indices, numel, encoding)
            decode_time = _median_seconds(args.repeats, index_coding.decode, blob, k, numel, encoding, "bench")
            rows.append({"density": density, "k": k, "encoding": encoding.value, "bytes": blob.numel(),
                         "bytes_per_index": blob.numel() / k, "encode_ms": 1000 * encode_time,
                         "decode_ms": 1000 * decode_time,
                         "chosen": index_coding.best_encoding(indices, numel, compact=True) is encoding})
    lines = [f"{numel:,} elements, random positions", "",
             "| density | encoding | bytes per index | encode | decode | chosen (compact) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['density']:g} | {r['encoding']} | {r['bytes_per_index']:.2f} | "
                     f"{r['encode_ms']:.2f} ms | {r['decode_ms']:.2f} ms | {'yes' if r['chosen'] else ''} |")
    _write(args.out, "indices", rows, "\n".join(lines), vars_json(args))


def bench_wire(args: argparse.Namespace) -> None:
    from gradhub_cli import bench_wire as wire_suite

    rows, table = wire_suite.bench_wire(args)
    _write(args.out, "wire", rows, table, vars_json(args))


def bench_overhead(args: argparse.Namespace) -> None:
    """Each run: a local step, then a real cluster; the machine's speed drifts between runs
    (by a third within an hour here), so each overhead is against its own local step."""
    from gradhub_cli.bench_wire import StealMeter, cluster_step_ms, local_step_ms

    rows = []
    for run in range(1, args.runs + 1):
        local = local_step_ms(args.model, args.batch_size, args.repeats)
        run_dir = args.out / "runs" / f"overhead-{args.model}-{args.workers}w-{run}"
        command = [sys.executable, "-m", "gradhub_cli", "run", "--mode", "sync", "--workers", str(args.workers),
                   "--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--eval-every", str(args.steps), "--out", str(run_dir), "--no-progress", *args.extra]
        steal = StealMeter()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run failed:\n{result.stderr[-2000:]}")
        step = cluster_step_ms(run_dir / "metrics.jsonl")
        rows.append({"run": run, "model": args.model, "batch_size": args.batch_size, "workers": args.workers,
                     "local_step_ms": local, "cluster_step_ms": step, "overhead_ms": step - local,
                     "cpu_steal": steal.share(), "command": " ".join(command[3:])})
    lines = [f"{args.model}, batch {args.batch_size}: a {args.workers}-worker sync step of a real cluster "
             "against one local training step (forward, backward, SGD) on one thread, measured just before it", "",
             "| run | local step | cluster step (sync) | overhead per step | CPU stolen by the host during the run |",
             "|---|---|---|---|---|"]
    for r in rows:
        stolen = "—" if r["cpu_steal"] is None else f"{100 * r['cpu_steal']:.1f} %"
        lines.append(f"| {r['run']} | {r['local_step_ms']:.2f} ms | {r['cluster_step_ms']:.2f} ms | "
                     f"{r['overhead_ms']:.2f} ms | {stolen} |")
    if len(rows) > 1:
        median = {k: statistics.median(r[k] for r in rows) for k in ("local_step_ms", "cluster_step_ms", "overhead_ms")}
        lines.append(f"| median | {median['local_step_ms']:.2f} ms | {median['cluster_step_ms']:.2f} ms | "
                     f"{median['overhead_ms']:.2f} ms | |")
    _write(args.out, "overhead", rows, "\n".join(lines), vars_json(args))


def bench_overlap(args: argparse.Namespace) -> None:
    from gradhub_cli import bench_overlap as overlap_suite

    rows, table = overlap_suite.bench_overlap(args)
    _write(args.out, "overlap", rows, table, vars_json(args))


def bench_shards(args: argparse.Namespace) -> None:
    from gradhub_cli import bench_shards as shards_suite

    rows, table = shards_suite.bench_shards(args)
    _write(args.out, "shards", rows, table, vars_json(args))


def bench_transfer(args: argparse.Namespace) -> None:
    from gradhub_cli import bench_transfer as transfer_suite

    rows, table = transfer_suite.bench_transfer(args)
    _write(args.out, "transfer", rows, table, vars_json(args))


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    meta["torch"] = torch.__version__
    meta["threads"] = torch.get_num_threads()
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradhub bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = parser.add_subparsers(dest="suite", required=True)

    codecs = suites.add_parser("codecs", help="train with each codec in each mode")
    codecs.add_argument("--model", default="wide")
    codecs.add_argument("--workers", type=int, default=2)
    codecs.add_argument("--modes", nargs="+", default=["sync", "async"], choices=MODES)
    codecs.add_argument("--codecs", nargs="+", default=["none", "fp16", "topk:0.001"])
    codecs.add_argument("--steps", type=int, help="steps per run (default: the mode's default)")
    codecs.add_argument("--seed", type=int, default=0)
    codecs.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to every `gradhub run` (last on the line)")
    codecs.set_defaults(func=bench_codecs)

    topk = suites.add_parser("topk", help="exact against approximate top-k selection")
    topk.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000])
    topk.add_argument("--ratios", type=float, nargs="+", default=[0.001, 0.01])
    topk.add_argument("--repeats", type=int, default=7)
    topk.set_defaults(func=bench_topk)

    apply = suites.add_parser("apply", help="server apply time of a fixed-k sparse gradient by model size")
    apply.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    apply.add_argument("--k", type=int, default=50_000)
    apply.add_argument("--repeats", type=int, default=50)
    apply.set_defaults(func=bench_apply)

    indices = suites.add_parser("indices", help="index encodings by density")
    indices.add_argument("--numel", type=int, default=1_000_000)
    indices.add_argument("--densities", type=float, nargs="+", default=[0.0001, 0.001, 0.01, 0.05, 0.1, 0.3])
    indices.add_argument("--repeats", type=int, default=9)
    indices.set_defaults(func=bench_indices)

    wire = suites.add_parser("wire", help="push/pull/push+pull against a server, raw TCP and gloo in the same run")
    wire.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000],
                      help="model parameters (an MLP of that size)")
    wire.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    wire.add_argument("--codecs", nargs="+", default=["none", "fp16", "topk:0.01+fp16"])
    wire.add_argument("--repeats", type=int, default=5, help="timed repeats per cell in each pass")
    wire.add_argument("--rounds", type=int, default=2,
                      help="passes over the codecs of each size and worker count, alternating the order")
    wire.set_defaults(func=bench_wire)

    shards = suites.add_parser("shards", help="a sync push+pull against S servers of parameters/S each")
    shards.add_argument("--parameters", type=int, default=25_000_000, help="the whole model's parameters")
    shards.add_argument("--workers", type=int, default=2)
    shards.add_argument("--codec", default="fp16")
    shards.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    shards.add_argument("--repeats", type=int, default=7, help="timed steps per cell")
    shards.add_argument("--rounds", type=int, default=2, help="passes over the shard counts, alternating the order")
    shards.set_defaults(func=bench_shards)

    overhead = suites.add_parser("overhead", help="a cluster's sync step against a local training step")
    overhead.add_argument("--model", default="cnn")
    overhead.add_argument("--batch-size", type=int, default=50)
    overhead.add_argument("--workers", type=int, default=2)
    overhead.add_argument("--steps", type=int, default=3000)
    overhead.add_argument("--repeats", type=int, default=500, help="local steps timed per run")
    overhead.add_argument("--runs", type=int, default=3, help="clusters run, one after another")
    overhead.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                          help="flags passed to `gradhub run` (last on the line)")
    overhead.set_defaults(func=bench_overhead)

    overlap = suites.add_parser("overlap", help="async training without and with --overlap")
    overlap.add_argument("--model", default="cnn")
    overlap.add_argument("--workers", type=int, default=2)
    overlap.add_argument("--modes", nargs="+", default=["async", "async-sa"],
                         choices=[m for m in MODES if m != "sync"])
    overlap.add_argument("--steps", type=int, help="steps per run (default: the mode's default)")
    overlap.add_argument("--target", type=float, default=0.9, help="accuracy whose time to reach is reported")
    overlap.add_argument("--runs", type=int, default=2, help="pairs of runs per mode, alternating the order")
    overlap.add_argument("--seed", type=int, default=0)
    overlap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                         help="flags passed to every `gradhub run` (last on the line)")
    overlap.set_defaults(func=bench_overlap)

    transfer = suites.add_parser("transfer", help="a CUDA worker's encode and load against the bare DMA (GPU)")
    transfer.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 25_000_000],
                          help="model parameters (the wide model of about that size)")
    transfer.add_argument("--codecs", nargs="+", default=["none", "fp16", "topk:0.01+fp16"])
    transfer.add_argument("--pull-dtypes", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    transfer.add_argument("--repeats", type=int, default=9)
    transfer.set_defaults(func=bench_transfer)

    for sub in (codecs, topk, apply, indices, wire, shards, overhead, overlap, transfer):
        sub.add_argument("--out", type=Path, default=Path("bench"), help="folder for the JSON and table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.suite not in ("codecs", "wire", "shards", "overhead", "overlap"):
        torch.set_num_threads(1)  # one core, as a server thread has
    args.func(args)
    return 0
