"""`gradhub bench shards`: would partitioning the parameters across S server processes
speed up a sync round trip on this machine? Measured before it is built.

A sharded server is S independent servers, each holding 1/S of the parameters, that every
worker pushes to and pulls from at once. So that is what each cell runs: S real `gradhub
server` processes (sync mode, the `wide` MLP of parameters/S each), and W worker processes
that each push+pull (one PushPull) to all S at once, one thread per shard, in lockstep.
The time of a step is the slowest worker's; beside it, the CPU the servers and the workers
used per step, and, in the same run, a gloo all_reduce of the whole fp32 tensor.

The CPU columns say why a count of shards pays or does not: one server process is bound
by its GIL to about one core, so shards help while the servers are the bottleneck and
there are cores to spare; on a machine whose cores the workers and one server already
fill, they only add processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from gradhub.cpu_affinity import usable_cpu_count
from gradhub_cli.bench_processes import collect_results
from gradhub_cli.bench_wire import (
    Cell,
    format_ms,
    format_ratio,
    gloo_allreduce_seconds,
    sync_server,
)

#: How long a cell may take, start-up included, before the suite gives up on it.
CELL_TIMEOUT_S = 1800.0


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker(
    rank: int, cell: Cell, shards: list[tuple[str, str]], redis_url: str, barrier: Any, timing: Any,
    results: Any,
) -> None:
    from gradhub import memory
    from gradhub.codecs import codec_from_name
    from gradhub.coordination import RunCoordinator
    from gradhub.domain import PushMeta
    from gradhub.models import build_model
    from gradhub_worker.client import ParameterClient

    torch.set_num_threads(1)
    memory.keep_freed_memory()  # as gradhub's worker does
    worker_id = f"bench-{rank}"
    parts: list[dict[str, Any]] = []
    leases: list[tuple[Any, Any]] = []
    try:
        for run_id, address in shards:
            coordinator = RunCoordinator.from_url(redis_url, run_id)
            config = coordinator.wait_config(60)
            leases.append((coordinator, coordinator.register(worker_id, cell.workers, 3600.0, 60, rank)))
            torch.manual_seed(rank)
            model = build_model(config.model, config.model_kwargs)
            codec = codec_from_name(cell.codec, seed=rank, dense_below=config.dense_below)
            encoded = [codec.encode(n, torch.randn_like(p) * 1e-3) for n, p in model.named_parameters()]
            numel = sum(p.numel() for p in model.parameters())
            client = ParameterClient(address, run_id, worker_id, max_payload_bytes=12 * numel + (1 << 16))
            client.wait_ready(60)
            version = client.pull(0, 600, cell.pull_dtype).version
            parts.append({"run_id": run_id, "client": client, "encoded": encoded, "version": version, "seq": 0})

        def step(part: dict[str, Any]) -> None:
            part["seq"] += 1
            meta = PushMeta(part["run_id"], worker_id, part["seq"], part["version"],
                            pull_dtype=cell.pull_dtype, pull_delta=cell.pull_delta)
            pushed, _ = part["client"].push_pull(meta, part["encoded"], 600)
            part["version"] = pushed.version

        times: list[float] = []
        with ThreadPoolExecutor(len(parts), thread_name_prefix="shard") as pool:
            for attempt in range(cell.repeats + 1):
                barrier.wait()
                if attempt == 1:
                    cpu_started = time.process_time()
                    if rank == 0:
                        timing.set()  # the timed steps begin: the parent reads the servers' CPU
                started = time.perf_counter()
                if len(parts) == 1:
                    step(parts[0])
                else:
                    list(pool.map(step, parts))
                if attempt:
                    times.append(time.perf_counter() - started)
        results.put((rank, times, time.process_time() - cpu_started))
    finally:
        for part in parts:
            part["client"].close()
        for coordinator, lease in leases:
            coordinator.release(lease)


def _wait_for_timed_steps(timing: Any, processes: list[Any], shards: int) -> None:
    """Until rank 0 starts timing; a worker that died first is an error, not a hang."""
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while not timing.wait(0.5):
        dead = [p.exitcode for p in processes if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            raise SystemExit(f"shards={shards}: the workers did not reach their timed steps "
                             f"(exit codes {dead or 'none: timed out'})")


def measure(parameters: int, workers: int, codec: str, shards: int, repeats: int, redis_url: str,
            scratch: Path) -> dict[str, Any]:
    """One cell: S servers of parameters/S each, W workers stepping against all of them."""
    cell = Cell(max(1, parameters // shards), workers, codec, repeats)
    base = f"bench-shards-{uuid.uuid4().hex[:8]}"
    context = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        runs = [f"{base}-{i}" for i in range(shards)]
        servers = [stack.enter_context(sync_server(cell, redis_url, run_id, scratch / run_id)) for run_id in runs]
        addresses = [address for address, _ in servers]
        barrier, timing, results = context.Barrier(workers), context.Event(), context.Queue()
        processes = [
            context.Process(target=_worker, daemon=True,
                            args=(r, cell, list(zip(runs, addresses)), redis_url, barrier, timing, results))
            for r in range(workers)
        ]
        for process in processes:
            process.start()
        try:
            _wait_for_timed_steps(timing, processes, shards)
            servers_before = [process_cpu_seconds(pid) for _, pid in servers]
            window = time.perf_counter()
            collected = collect_results(results, processes, CELL_TIMEOUT_S)
            servers_after = [process_cpu_seconds(pid) for _, pid in servers]
            window = time.perf_counter() - window
        finally:
            for process in processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
    slowest = [max(times[i] for _, times, _ in collected) for i in range(repeats)]
    server_cpu = math.nan
    if all(a is not None and b is not None for a, b in zip(servers_before, servers_after)):
        server_cpu = sum(b - a for a, b in zip(servers_before, servers_after)
                         if a is not None and b is not None)
    return {
        "parameters": parameters, "workers": workers, "codec": codec, "shards": shards,
        "parameters_per_shard": cell.parameters,
        "push_pull_ms": 1000 * statistics.median(slowest),
        "server_cpu_ms_per_step": 1000 * server_cpu / repeats,
        # The servers' CPU over the wall time of the same window: 1.0 is one core kept busy.
        "server_cores_busy": server_cpu / window,
        "worker_cpu_ms_per_step": 1000 * statistics.mean(cpu for _, _, cpu in collected) / repeats,
    }


def bench_shards(args: Any) -> tuple[list[dict[str, Any]], str]:
    from gradhub.redis_server import EmbeddedRedis

    if args.repeats < 1 or args.rounds < 1 or min(args.shards) < 1 or args.workers < 1:
        raise SystemExit("gradhub bench shards: --repeats, --rounds, --shards and --workers must be at least 1")
    rows: list[dict[str, Any]] = []
    gloo_ms = (1000 * gloo_allreduce_seconds(args.parameters, args.workers, args.repeats)
               if args.workers > 1 else math.nan)
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory(prefix="gradhub-bench-") as scratch:
        for round_ in range(1, args.rounds + 1):
            # Alternate the order, so the machine's drift falls on every count alike.
            order = args.shards if round_ % 2 else list(reversed(args.shards))
            for shards in order:
                row = measure(args.parameters, args.workers, args.codec, shards, args.repeats,
                              redis.url, Path(scratch))
                row.update(round=round_, gloo_allreduce_ms=gloo_ms, push_pull_vs_gloo=row["push_pull_ms"] / gloo_ms,
                           cores=usable_cpu_count())
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows, table(rows)


def table(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        f"{first['parameters'] / 1e6:g} M parameters, {first['workers']} workers, codec {first['codec']}, "
        f"{first['cores']} usable cores: a sync push+pull against S servers of parameters/S each, "
        "median of the slowest worker's time; CPU per step (mean) summed over the servers, and per worker",
        "",
        "| shards | round | push+pull | gloo all_reduce | push+pull / gloo | servers' CPU per step "
        "| servers' cores busy | a worker's CPU per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["shards"], r["round"])):
        lines.append(
            f"| {r['shards']} | {r['round']} | {r['push_pull_ms']:.1f} ms | {format_ms(r['gloo_allreduce_ms'])} | "
            f"{format_ratio(r['push_pull_vs_gloo'], 2)} | {r['server_cpu_ms_per_step']:.0f} ms | {r['server_cores_busy']:.2f} | "
            f"{r['worker_cpu_ms_per_step']:.0f} ms |"
        )
    return "\n".join(lines)
