"""`gradhub bench wire`: push, pull and push+pull against a real server, beside the references
measured in the same run: the same bytes through a raw loopback TCP socket (the wire's limit),
a torch.distributed gloo all_reduce of the same fp32 tensor across as many processes, and the
step's bytes through a bare gRPC Python server (`bench_bare_grpc`: what gRPC itself costs).

Each cell starts a real cluster: an embedded Redis, a `gradhub server` process (sync mode,
an MLP of the requested size) and W worker processes that register, encode one gradient with
the codec and then, all at once and in lockstep: push (each push returns once the sync step
it completes is applied), pull, and push+pull (one PushPull: the step's round trip). Times
are medians over the repeats of the slowest worker's time (a step is over when every
worker's is). Throughput is the bytes that crossed the wire for one worker's call divided by
its time; the ratio to raw TCP compares it with the socket moving the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradhub_cli.bench_processes import collect_results


def hidden_for(parameters: int) -> int:
    """The `wide` model's hidden width that gives about `parameters` parameters: its count
    is linear in the width (most of it is the hidden layer, as in real models' big matrices)."""
    from gradhub.models import build_model, count_parameters

    one, two = (count_parameters(build_model("wide", {"hidden": h})) for h in (1, 2))
    return max(1, round((parameters - one) / (two - one)) + 1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the raw socket ------------------------------------------------------------------------


def _tcp_receiver(port_queue: Any, nbytes: int, repeats: int) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port_queue.put(listener.getsockname()[1])
        connection, _ = listener.accept()
        with connection:
            buffer = bytearray(nbytes)
            view = memoryview(buffer)
            for _ in range(repeats):
                received = 0
                while received < nbytes:
                    got = connection.recv_into(view[received:], nbytes - received)
                    if got == 0:
                        return
                    received += got
                connection.sendall(b"k")  # the message is all here


def raw_tcp_seconds(nbytes: int, repeats: int) -> float:
    """Median seconds to move `nbytes` through a loopback TCP socket between two processes
    and hear back (one byte): what any protocol over this socket can at best do."""
    context = mp.get_context("spawn")
    ports = context.Queue()
    receiver = context.Process(target=_tcp_receiver, args=(ports, nbytes, repeats + 1), daemon=True)
    receiver.start()
    try:
        port = ports.get(timeout=60)
        payload = memoryview(bytearray(nbytes))  # loopback TCP does not look at the bytes
        times = []
        with socket.create_connection(("127.0.0.1", port)) as sender:
            for attempt in range(repeats + 1):
                started = time.perf_counter()
                sender.sendall(payload)
                if sender.recv(1) != b"k":
                    raise RuntimeError("the raw TCP receiver went away")
                if attempt:  # the first is a warm-up
                    times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.kill()


# --- gloo all_reduce -----------------------------------------------------------------------


def _gloo_rank(rank: int, world: int, port: int, numel: int, repeats: int, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tensor = torch.randn(numel)
        times = []
        for attempt in range(repeats + 1):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            if attempt:
                times.append(time.perf_counter() - started)
        results.put((rank, times))
    finally:
        dist.destroy_process_group()


def gloo_allreduce_seconds(numel: int, world: int, repeats: int) -> float:
    """Median over repeats of the slowest rank's all_reduce of `numel` fp32 (DDP's wire)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_gloo_rank, args=(r, world, port, numel, repeats, results), daemon=True)
             for r in range(world)]
    for process in ranks:
        process.start()
    try:
        per_rank = dict(collect_results(results, ranks, 600))
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return statistics.median(max(per_rank[r][i] for r in per_rank) for i in range(repeats))


# --- the cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    parameters: int
    workers: int
    codec: str
    repeats: int

    @property
    def pull_dtype(self) -> torch.dtype:
        return torch.float16 if self.codec.endswith("fp16") else torch.float32

    @property
    def pull_delta(self) -> bool:
        return self.codec.startswith(("topk", "randomk", "approx-topk"))


def _worker(rank: int, cell: Cell, redis_url: str, run_id: str, address: str, barrier: Any, results: Any) -> None:
    from gradhub import memory
    from gradhub.codecs import codec_from_name
    from gradhub.coordination import RunCoordinator
    from gradhub.domain import PushMeta
    from gradhub.models import build_model
    from gradhub_worker.client import ParameterClient

    torch.set_num_threads(1)
    memory.keep_freed_memory()  # as gradhub's worker does
    worker_id = f"bench-{rank}"
    coordinator = RunCoordinator.from_url(redis_url, run_id)
    config = coordinator.wait_config(60)
    lease = coordinator.register(worker_id, cell.workers, 3600.0, 60, rank)
    torch.manual_seed(rank)
    model = build_model(config.model, config.model_kwargs)
    codec = codec_from_name(cell.codec, seed=rank, dense_below=config.dense_below)
    encoded = [codec.encode(name, torch.randn_like(p) * 1e-3) for name, p in model.named_parameters()]
    client = ParameterClient(address, run_id, worker_id,
                             max_payload_bytes=12 * sum(p.numel() for p in model.parameters()) + (1 << 16))
    client.wait_ready(60)
    version = client.pull(0, 600, cell.pull_dtype).version
    seq = 0
    timings: dict[str, list[float]] = {"push": [], "pull": [], "push_pull": []}
    wire_bytes: dict[str, int] = {}

    def meta() -> PushMeta:
        nonlocal seq
        seq += 1
        return PushMeta(run_id, worker_id, seq, version, pull_dtype=cell.pull_dtype, pull_delta=cell.pull_delta)

    try:
        for attempt in range(cell.repeats + 1):
            barrier.wait()
            started = time.perf_counter()
            result = client.push(meta(), encoded, 600)
            elapsed = time.perf_counter() - started
            version = result.version
            barrier.wait()
            started = time.perf_counter()
            snapshot = client.pull(version, 600, cell.pull_dtype, version - 1 if cell.pull_delta else None)
            pull_elapsed = time.perf_counter() - started
            barrier.wait()
            started = time.perf_counter()
            pushed, snapshot_after = client.push_pull(meta(), encoded, 600)
            round_trip = time.perf_counter() - started
            version = pushed.version
            if attempt:
                timings["push"].append(elapsed)
                timings["pull"].append(pull_elapsed)
                timings["push_pull"].append(round_trip)
            wire_bytes = {"pull": snapshot.wire_bytes,
                          "push_pull_down": snapshot_after.wire_bytes if snapshot_after else 0}
        from gradhub import wire

        push_bytes = sum(wire.framed_size(m) for m in wire.push_stream(meta(), encoded))
        results.put((rank, timings, {**wire_bytes, "push": push_bytes}))
    finally:
        client.close()
        coordinator.release(lease)


@contextlib.contextmanager
def sync_server(cell: Cell, redis_url: str, run_id: str, out: Path) -> Iterator[tuple[str, int]]:
    """A sync `gradhub server` for the cell's model: its address and pid while it runs."""
    from gradhub.config import RunConfig
    from gradhub.coordination import RunCoordinator

    coordinator = RunCoordinator.from_url(redis_url, run_id)
    coordinator.publish_config(RunConfig(
        run_id=run_id, mode="sync", workers=cell.workers, steps=10**9, model="wide",
        model_kwargs={"hidden": hidden_for(cell.parameters)}, compression=cell.codec,
        momentum=0.0, weight_decay=0.0, eval_every=10**9, lease_seconds=3600.0,
    ))
    server = subprocess.Popen(
        [sys.executable, "-m", "gradhub_server", "--redis-url", redis_url, "--run-id", run_id,
         "--out", str(out), "--metrics-bind", "off", "--drain-timeout", "0", "--torch-threads", "1",
         "--log-level", "WARNING"],
    )
    try:
        yield coordinator.wait_server(120), server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


CALLS = ("push", "pull", "push_pull")


def measure_cell(cell: Cell, redis_url: str, scratch: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """One pass of `cell` against its own server: per call, the slowest worker's seconds of
    each repeat; and the bytes of a push, a pull and a push+pull's pull."""
    run_id = f"bench-wire-{uuid.uuid4().hex[:8]}"
    context = mp.get_context("spawn")
    barrier = context.Barrier(cell.workers)
    results = context.Queue()
    with sync_server(cell, redis_url, run_id, scratch / run_id) as (address, _):
        workers = [context.Process(target=_worker, args=(r, cell, redis_url, run_id, address, barrier, results),
                                   daemon=True) for r in range(cell.workers)]
        for process in workers:
            process.start()
        try:
            collected = {rank: (timings, sizes) for rank, timings, sizes in collect_results(results, workers, 1800)}
        finally:
            for process in workers:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
    slowest = {call: [max(collected[r][0][call][i] for r in collected) for i in range(cell.repeats)]
               for call in CALLS}
    return slowest, collected[0][1]


def cell_row(cell: Cell, samples: dict[str, list[float]], sizes: dict[str, int],
             push_pull_per_pass: list[float]) -> dict[str, Any]:
    """A cell's row from its samples over every pass: medians in ms, and the bytes."""
    row: dict[str, Any] = {"parameters": cell.parameters, "workers": cell.workers, "codec": cell.codec,
                           "pull_dtype": str(cell.pull_dtype).removeprefix("torch."),
                           "pull_delta": cell.pull_delta}
    for call in CALLS:
        row[f"{call}_ms"] = 1000 * statistics.median(samples[call])
    row["rounds"] = len(push_pull_per_pass)
    row["push_pull_ms_per_round"] = [1000 * seconds for seconds in push_pull_per_pass]
    row["push_bytes"] = sizes["push"]
    row["pull_bytes"] = sizes["pull"]
    row["push_pull_bytes"] = sizes["push"] + sizes["push_pull_down"]
    return row


def measure_group(parameters: int, workers: int, codecs: Sequence[str], repeats: int, rounds: int,
                  redis_url: str, scratch: Path) -> list[dict[str, Any]]:
    """The rows of one model size and worker count, one per codec, measured in `rounds`
    passes over the codecs in alternating order: a ratio between codecs (top-k against
    dense) then compares times taken in the same minutes, not minutes apart, on a machine
    whose speed drifts by a third over an hour."""
    samples: dict[str, dict[str, list[float]]] = {codec: {call: [] for call in CALLS} for codec in codecs}
    per_pass: dict[str, list[float]] = {codec: [] for codec in codecs}
    sizes: dict[str, dict[str, int]] = {}
    for round_ in range(rounds):
        for codec in codecs if round_ % 2 == 0 else list(reversed(codecs)):
            timings, sizes[codec] = measure_cell(Cell(parameters, workers, codec, repeats), redis_url, scratch)
            for call in CALLS:
                samples[codec][call] += timings[call]
            per_pass[codec].append(statistics.median(timings["push_pull"]))
    return [cell_row(Cell(parameters, workers, codec, repeats), samples[codec], sizes[codec], per_pass[codec])
            for codec in codecs]


def bench_wire(args: Any) -> tuple[list[dict[str, Any]], str]:
    from gradhub.redis_server import EmbeddedRedis
    from gradhub.wire import CHUNK_BYTES
    from gradhub_cli.bench_bare_grpc import bare_grpc_round_trip_seconds

    if args.repeats < 1 or args.rounds < 1:
        raise SystemExit("gradhub bench wire: --repeats and --rounds must be at least 1")
    rows: list[dict[str, Any]] = []
    raw_cache: dict[int, float] = {}
    gloo_cache: dict[tuple[int, int], float] = {}
    bare_cache: dict[tuple[int, int, int], float] = {}

    def raw_ms(nbytes: int) -> float:
        if nbytes not in raw_cache:
            raw_cache[nbytes] = 1000 * raw_tcp_seconds(nbytes, args.repeats)
        return raw_cache[nbytes]

    def bare_grpc_ms(up: int, down: int, workers: int) -> float:
        key = (up, down, workers)
        if key not in bare_cache:
            bare_cache[key] = 1000 * bare_grpc_round_trip_seconds(up, down, workers, args.repeats, CHUNK_BYTES)
        return bare_cache[key]

    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory(prefix="gradhub-bench-") as scratch:
        for parameters in args.sizes:
            for workers in args.workers:
                key = (parameters, workers)
                # A world of one process all-reduces nothing: no reference to compare with.
                gloo_cache[key] = (1000 * gloo_allreduce_seconds(parameters, workers, args.repeats)
                                   if workers > 1 else math.nan)
                for row in measure_group(parameters, workers, args.codecs, args.repeats, args.rounds,
                                         redis.url, Path(scratch)):
                    row["gloo_allreduce_ms"] = gloo_cache[key]
                    for call in ("push", "pull"):
                        row[f"raw_tcp_{call}_ms"] = raw_ms(row[f"{call}_bytes"])
                        row[f"{call}_gbps"] = row[f"{call}_bytes"] / row[f"{call}_ms"] / 1e6
                        row[f"{call}_of_raw"] = row[f"raw_tcp_{call}_ms"] / row[f"{call}_ms"]
                    row["push_pull_vs_gloo"] = row["push_pull_ms"] / row["gloo_allreduce_ms"]
                    row["bare_grpc_push_pull_ms"] = bare_grpc_ms(
                        row["push_bytes"], row["push_pull_bytes"] - row["push_bytes"], workers)
                    row["push_pull_vs_bare_grpc"] = row["push_pull_ms"] / row["bare_grpc_push_pull_ms"]
                    row["bare_grpc_vs_gloo"] = row["bare_grpc_push_pull_ms"] / row["gloo_allreduce_ms"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    add_speedups(rows)
    return rows, table(rows)


#: The codecs a speed-up is measured against: dense fp32.
DENSE_CODECS = ("none", "fp32")


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's push+pull speed-up against the dense fp32 row of its size and worker count:
    of the medians, and pass by pass (`push_pull_speedup_vs_dense_per_round`), each pass's
    median against the dense one of the same pass, timed in the same minutes. On a machine
    whose speed drifts, the spread of the passes says how far to trust the median's ratio."""
    dense = {(r["parameters"], r["workers"]): r for r in rows if r["codec"] in DENSE_CODECS}
    for row in rows:
        reference = dense.get((row["parameters"], row["workers"]))
        if reference is None:
            row["push_pull_speedup_vs_dense"] = math.nan
            row["push_pull_speedup_vs_dense_per_round"] = []
            continue
        row["push_pull_speedup_vs_dense"] = reference["push_pull_ms"] / row["push_pull_ms"]
        row["push_pull_speedup_vs_dense_per_round"] = [
            dense_ms / ms for dense_ms, ms in zip(reference["push_pull_ms_per_round"], row["push_pull_ms_per_round"])
        ]


def format_speedup(row: dict[str, Any]) -> str:
    """The medians' speed-up, with the passes' range where there were several."""
    per_round = row["push_pull_speedup_vs_dense_per_round"]
    text = format_ratio(row["push_pull_speedup_vs_dense"], 1)
    if len(per_round) > 1 and row["codec"] not in DENSE_CODECS:
        text += f" (passes {min(per_round):.1f}–{max(per_round):.1f}x)"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Sync mode; times are medians of the slowest worker over {rows[0]['rounds'] if rows else 1} passes over the "
        "codecs of each size and worker count, in alternating order (the JSON has each pass's push+pull median); "
        "raw TCP moves the same bytes over a "
        "loopback socket in the same run; gloo is an all_reduce of the fp32 tensor across as many processes; "
        "bare gRPC moves the step's bytes (each worker's push up, a barrier, its pull down) through a gRPC "
        "Python server that does nothing else.",
        "",
        "| parameters | workers | codec | push | push GB/s (of raw TCP) | pull | pull GB/s (of raw TCP) "
        "| push+pull | bare gRPC | push+pull / bare gRPC | gloo all_reduce | push+pull / gloo "
        "| bare gRPC / gloo | speed-up vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['parameters'] / 1e6:g} M | {r['workers']} | {r['codec']} | {r['push_ms']:.1f} ms "
            f"| {r['push_gbps']:.2f} ({100 * r['push_of_raw']:.0f} %) | {r['pull_ms']:.1f} ms "
            f"| {r['pull_gbps']:.2f} ({100 * r['pull_of_raw']:.0f} %) | {r['push_pull_ms']:.1f} ms "
            f"| {r['bare_grpc_push_pull_ms']:.1f} ms | {format_ratio(r['push_pull_vs_bare_grpc'], 2)} "
            f"| {format_ms(r['gloo_allreduce_ms'])} | {format_ratio(r['push_pull_vs_gloo'], 2)} "
            f"| {format_ratio(r['bare_grpc_vs_gloo'], 2)} | {format_speedup(r)} |"
        )
    return "\n".join(lines)


def format_ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f} ms"


def format_ratio(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}x"


# --- the cluster's per-step overhead ---------------------------------------------------------


class StealMeter:
    """The share of CPU time the hypervisor gave to other machines (`steal` in /proc/stat)
    since it was made: on a shared virtual machine a run can be slower throughout for
    reasons outside it, and this says so next to its figure. None where there is no
    /proc/stat."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        steal = fields[7] if len(fields) > 7 else 0
        return steal, sum(fields[:8])

    def share(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return (end[0] - self._start[0]) / (end[1] - self._start[1])


def local_step_ms(model_name: str, batch_size: int, repeats: int) -> float:
    """Median ms of one training step in one process on one thread: forward, loss, backward,
    SGD step, on a batch of MNIST-1D's shape: what a worker does without a cluster."""
    from gradhub.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(model_name, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(batch_size, 40), torch.randint(0, 10, (batch_size,))
    times = []
    for attempt in range(repeats + 20):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if attempt >= 20:  # warm-up
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def cluster_step_ms(metrics_path: Path) -> float:
    """ms per version over the middle of a run (10 % to 90 % of its versions), from the
    server's once-a-second metrics records: start-up and the last evaluation left out."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    points = [(r["version"], r["wall_seconds"]) for r in records if r.get("event") == "metrics"]
    last = max(v for v, _ in points)
    middle = [(v, t) for v, t in points if 0.1 * last <= v <= 0.9 * last]
    if len(middle) < 2:  # a run of a few seconds: its records are all there is
        middle = points
    (v0, t0), (v1, t1) = middle[0], middle[-1]
    if v1 == v0:
        raise SystemExit(f"{metrics_path}: {len(points)} metrics records are too few to time a step; "
                         "run more steps (--steps)")
    return 1000 * (t1 - t0) / (v1 - v0)
