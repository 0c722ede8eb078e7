"""The server process: builds the parent model, serves gRPC, publishes status, writes results.

Lifecycle: `start()` binds (port 0 allowed) and publishes the address in Redis;
`wait()` blocks until the run reaches its last step or `request_stop()` is called
(SIGTERM, Ctrl-C), then evaluates the final model, writes the run folder, marks
the run finished in Redis, lets workers leave, and stops serving.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradhub import cpu_affinity, wire
from gradhub.config import RunConfig, compact_indices_of
from gradhub.coordination import RunCoordinator
from gradhub.data import load_dataset
from gradhub.errors import ConfigurationError, CoordinationError
from gradhub.models import build_model, count_parameters
from gradhub.tls import ServerTls
from gradhub_server import checkpoints
from gradhub_server.applied import AppliedPush
from gradhub_server.auth_interceptor import TokenInterceptor
from gradhub_server.core import ParameterServerCore
from gradhub_server.evaluation import BackgroundEvaluator, Evaluation, Evaluator
from gradhub_server.journal import UpdateJournal
from gradhub_server.membership import Membership
from gradhub_server.metrics_http import MetricsServer, render
from gradhub_server.policies import build_policy
from gradhub_server.report import MetricsLog, metrics_record, summary, write_run_folder
from gradhub_server.schedules import schedule_from_name
from gradhub_server.servicer import ParameterServerServicer, add_to_server
from gradhub_server.stats import ServerStats
from gradhub_server.store import ParameterStore, build_rule

log = logging.getLogger(__name__)

#: The service name probes ask for readiness: SERVING while the run takes pushes.
#: The empty name ("", liveness) stays SERVING for as long as the process is up.
SERVICE_NAME = wire.SERVICE


@dataclass(frozen=True)
class ServerSettings:
    """Per-process settings of the server (the run's settings are in RunConfig)."""

    out: Path
    bind: str = "127.0.0.1:0"
    #: Address workers should dial; defaults to the bound host and port.
    advertise: str | None = None
    cache_dir: Path | None = None
    #: How often status goes to Redis (and the address's TTL is renewed).
    status_interval: float = 0.5
    #: After the last step, how long to wait for workers to read "finished" and leave.
    drain_timeout: float = 10.0
    #: Grace given to in-flight RPCs when the gRPC server stops.
    stop_grace: float = 2.0
    rpc_threads: int = 0
    #: Threads a large step runs on at once (0: in sync mode one per usable CPU, at most
    #: `MAX_STEP_THREADS`, since every worker waits for that step; one in other modes).
    step_threads: int = 0
    #: Pushes read, decoded or waiting at once (0: twice the workers plus 4); more are refused
    #: with RESOURCE_EXHAUSTED ("server busy") before they are read.
    max_inflight_pushes: int = 0
    #: host:port of the Prometheus `/metrics` endpoint (port 0: a free one); None: off.
    metrics_bind: str | None = "127.0.0.1:0"
    #: How often a `metrics` record goes to metrics.jsonl.
    metrics_interval: float = 1.0
    #: After the results are written: exit (compose, local) or keep answering health
    #: and status until SIGTERM (a Kubernetes StatefulSet would otherwise restart it).
    linger: bool = False
    #: The run's shared token (gradhub.auth); None serves without one.
    auth_token: str | None = None
    #: TLS (and mutual TLS) for the gRPC port; None serves plaintext.
    tls: ServerTls | None = None
    #: A checkpoint every this many versions (0: none by count) ...
    checkpoint_every: int = 0
    #: ... and at most this many seconds after a change (0: none by time).
    checkpoint_seconds: float = 0.0
    #: With checkpoints on: journal every update before acknowledging it, so a restart
    #: loses nothing acknowledged (gradhub_server/journal.py).
    journal: bool = True
    #: fsync each journal record: survives a power cut too, at a disk flush per version.
    journal_fsync: bool = False
    #: A checkpoint (which starts a new journal segment) once the journal grew this much.
    journal_checkpoint_bytes: int = 64 << 20
    #: Keep every journal segment (an audit trail of every version and the pushes it
    #: carried) instead of deleting those the kept checkpoints cover.
    keep_journal: bool = False
    channel_options: tuple[tuple[str, Any], ...] = field(
        default=(
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 4000),
            ("grpc.http2.max_ping_strikes", 0),
        )
    )


#: Most threads a step runs on by default: it is bound by memory bandwidth, which a few
#: threads fill (a step of 2 fp16 pushes of 25 M: 54 ms on one thread, 35 on two, here).
MAX_STEP_THREADS = 4


def step_threads(asked: int, mode: str) -> int:
    """The threads a large step runs on: `asked`; for 0 in sync mode, one per CPU this
    process may use, at most `MAX_STEP_THREADS`, and one in the other modes, whose workers
    compute while the server applies."""
    if asked < 0:
        raise ConfigurationError(f"--step-threads must be 0 (automatic) or more, not {asked}")
    if asked:
        return asked
    if mode != "sync":
        return 1
    return max(1, min(MAX_STEP_THREADS, cpu_affinity.usable_cpu_count()))


def _advertised(bind: str, port: int) -> str:
    host = bind.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


class ServerApp:
    def __init__(self, config: RunConfig, coordinator: RunCoordinator, settings: ServerSettings) -> None:
        self.config = config
        self.coordinator = coordinator
        self.settings = settings
        self.address: str | None = None
        self.metrics_url: str | None = None
        self._metrics_http: MetricsServer | None = None
        self._stop_requested = threading.Event()
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_eval: Evaluation | None = None
        #: A worker's divergence report, once one came: the run then ends as `diverged`.
        self.diverged: dict[str, Any] | None = None
        self._state = "starting"

        torch.manual_seed(config.seed)
        model = build_model(config.model, config.model_kwargs)
        self.model_parameters = count_parameters(model)
        if self.model_parameters == 0:
            raise ConfigurationError(f"model {config.model!r} has no parameters")
        self.store = ParameterStore(
            model,
            build_rule(config, list(model.parameters()), step_threads(settings.step_threads, config.mode)),
            config.steps,
            schedule_from_name(config.lr_schedule),
            compact_indices=compact_indices_of(config),
        )
        self.stats = ServerStats()
        #: Per worker: [seq, version, staleness] of its last applied push, kept under the
        #: store's lock, so a checkpoint's receipts match its parameters exactly.
        self._last_applied: dict[str, list[int]] = {}
        self.store.on_applied = self._on_applied
        self.membership = Membership(
            coordinator, config.workers, refresh_interval=max(0.05, config.lease_seconds / 6)
        )
        self.policy = build_policy(config, self.store, self.membership, self.stats)
        self.core = ParameterServerCore(config, self.store, self.policy, self.membership, self.stats)
        splits = load_dataset(config.dataset, settings.cache_dir)
        eval_model = build_model(config.model, config.model_kwargs)
        self.evaluator = BackgroundEvaluator(
            Evaluator(eval_model, splits), self.store.versioned_parameters, self._record_eval
        )
        self.metrics = MetricsLog(settings.out / "metrics.jsonl")
        self.membership.subscribe(self._record_membership)
        # Dense fp32 with int64 indices is the largest honest encoding (12 bytes per element).
        limits = wire.WireLimits(max_payload_bytes=12 * self.model_parameters + (1 << 16))
        threads = settings.rpc_threads or max(16, 4 * config.workers + 4)
        interceptors = []
        if settings.auth_token is not None:
            interceptors.append(TokenInterceptor(settings.auth_token, self._count_unauthenticated))
        self.max_inflight_pushes = settings.max_inflight_pushes or 2 * config.workers + 4
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
            options=list(settings.channel_options),
            interceptors=interceptors,
            # Calls beyond this are refused by gRPC itself (RESOURCE_EXHAUSTED), not queued.
            maximum_concurrent_rpcs=2 * threads,
        )
        add_to_server(ParameterServerServicer(self.core, limits, self.max_inflight_pushes), self._grpc)
        self._health = health.HealthServicer()
        self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._started = time.monotonic()
        self.restored_from: int | None = None
        self.versions_lost = 0
        self.versions_replayed = 0
        self._last_checkpoint = 0
        checkpointing = bool(settings.checkpoint_every or settings.checkpoint_seconds)
        self.journal = (
            UpdateJournal(settings.out / "journal", fsync=settings.journal_fsync)
            if checkpointing and settings.journal else None
        )
        self._restore()
        if self.journal is not None:
            if self.restored_from is None:
                self._checkpoint()  # the base the journal's first records replay onto
            self.store.journal = self.journal

    def _restore(self) -> None:
        """Start from the newest good checkpoint in the run folder, if there is one."""
        found = checkpoints.load_newest(self.settings.out / checkpoints.FOLDER)
        if found is None:
            if self.journal is not None:
                self.journal.discard()
            return
        ended = _ended_status(self.settings.out)
        if ended in ("finished", "diverged"):
            raise ConfigurationError(
                f"run {self.config.run_id} already {ended} in {self.settings.out}: "
                "start a new run under another run id (or remove that folder)"
            )
        state, path = found
        if state.get("run_id") != self.config.run_id:
            raise ConfigurationError(f"{path} belongs to run {state.get('run_id')!r}, not {self.config.run_id!r}")
        self.store.restore(state)
        self._last_applied = {k: list(v) for k, v in state.get("receipts", {}).items()}
        if "stats" in state:
            self.stats.load(state["stats"])
        self.restored_from = self._last_checkpoint = self.store.version
        if self.journal is not None:
            for record in self.journal.records_after(self.store.version, self.store.shapes):
                self.store.replay(record)  # _on_applied counts it and keeps its receipts
                self.versions_replayed += 1
        self.core.receipts.restore(self._last_applied)
        try:
            previous = self.coordinator.read_status() or {}
        except CoordinationError:
            previous = {}
        # What the crashed server had published last, minus what the checkpoint kept.
        self.versions_lost = max(0, int(previous.get("version") or 0) - self.store.version)
        self.metrics.write({"event": "restored", "wall_seconds": 0.0, "version": self.store.version,
                            "checkpoint": path.name, "versions_replayed": self.versions_replayed,
                            "versions_lost": self.versions_lost})
        log.warning("restored run %s from %s and %d journaled versions: at version %d (%d versions lost)",
                    self.config.run_id, path.name, self.versions_replayed, self.store.version,
                    self.versions_lost)

    def _checkpoint(self) -> None:
        state = self.store.checkpoint_state(
            also=lambda: {"stats": self.stats.state(), "receipts": {k: list(v) for k, v in self._last_applied.items()}}
        )
        state["run_id"] = self.config.run_id
        folder = self.settings.out / checkpoints.FOLDER
        path = checkpoints.save(folder, state)
        self._last_checkpoint = state["version"]
        if self.journal is not None:
            self.journal.rotate()
            if not self.settings.keep_journal:
                self.journal.prune(covered_up_to=min(checkpoints.versions(folder)))
        log.debug("checkpoint %s", path.name)

    def _on_applied(self, pushes: Sequence[AppliedPush]) -> None:
        """Under the store's lock, right after the version that carried `pushes`."""
        self.stats.record_applied(pushes)
        for push in pushes:
            self._last_applied[push.worker_id] = [push.seq, self.store.version, push.staleness]

    def _checkpoint_loop(self) -> None:
        every, seconds = self.settings.checkpoint_every, self.settings.checkpoint_seconds
        last_time = time.monotonic()
        while not self._stop_requested.wait(0.2) and not self.store.finished:
            version = self.store.version
            due_by_count = every and version - self._last_checkpoint >= every
            due_by_time = seconds and version != self._last_checkpoint and time.monotonic() - last_time >= seconds
            due_by_journal = (self.journal is not None
                              and self.journal.bytes_since_rotation >= self.settings.journal_checkpoint_bytes)
            if due_by_count or due_by_time or due_by_journal:
                try:
                    self._checkpoint()
                except OSError as exc:
                    log.error("checkpoint at version %d failed: %s", version, exc)
                last_time = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        if self.settings.tls is not None:
            port = self._grpc.add_secure_port(self.settings.bind, self.settings.tls.credentials())
        else:
            port = self._grpc.add_insecure_port(self.settings.bind)
        if port == 0:
            raise ConfigurationError(f"cannot bind the gRPC server to {self.settings.bind}")
        self.address = self.settings.advertise or _advertised(self.settings.bind, port)
        self.metrics.write(
            {"event": "start", "wall_seconds": 0.0, "address": self.address,
             "model_parameters": self.model_parameters, "config": self.config.as_dict()}
        )
        if self.settings.metrics_bind:
            self._metrics_http = MetricsServer(
                self.settings.metrics_bind, lambda: render(self.status(), self.stats.totals())
            )
            self._metrics_http.start()
            host = self.settings.metrics_bind.rpartition(":")[0]
            if host in ("0.0.0.0", "[::]", ""):
                host = socket.gethostname()
            self.metrics_url = f"http://{host}:{self._metrics_http.port}/metrics"
        self.membership.start()
        self.evaluator.start()
        self._grpc.start()
        self._started = time.monotonic()
        self.core.started = self._started
        self._state = "running"
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._publish()
        self._spawn(self._status_loop, "status")
        self._spawn(self._progress_loop, "progress")
        self._spawn(self._metrics_loop, "metrics")
        if self.settings.checkpoint_every or self.settings.checkpoint_seconds:
            self._spawn(self._checkpoint_loop, "checkpoints")
        log.info(
            "serving run %s (%s, %d workers, %s, %d parameters) on %s; metrics at %s",
            self.config.run_id, self.config.mode, self.config.workers, self.config.model,
            self.model_parameters, self.address, self.metrics_url or "(off)",
        )
        return self.address

    def request_stop(self) -> None:
        self._stop_requested.set()

    def wait(self) -> dict[str, Any]:
        """Block until finished or stopped; write results; return the summary."""
        while not (self.store.finished or self._stop_requested.is_set()):
            self._stop_requested.wait(0.05)
        interrupted = not self.store.finished
        ended = "diverged" if self.diverged and interrupted else ("interrupted" if interrupted else "finished")
        self._state = ended if interrupted else "finishing"
        final = self.evaluator.evaluate_now()
        self._write_metrics()
        totals = self.stats.totals()
        wall = self.core.wall_seconds()
        record = summary(
            self.config, ended, self.store.version,
            self.model_parameters, _eval_dict(final), wall, totals, self.policy.report(),
        )
        if self.diverged:
            record["diverged"] = self.diverged
        if self.restored_from is not None:
            record["restored_from_version"] = self.restored_from
            record["versions_replayed"] = self.versions_replayed
            record["versions_lost"] = self.versions_lost
        self.metrics.write({"event": "end", "wall_seconds": round(wall, 3), "status": record["status"],
                            "version": self.store.version})
        write_run_folder(
            self.settings.out, self.config, record, self.store.state_dict(), list(self.metrics.evals),
            self.stats.staleness_histograms(),
        )
        # Readiness drops only now: "not ready" tells an orchestrator (and `kubectl wait`) that
        # the run is over *and* its folder is complete; pushes meanwhile get the run-over answer.
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._state = ended
        self._publish()
        if not interrupted:
            self._drain()
            if self.settings.linger:
                log.info("run %s ended; lingering (health and status) until stopped", self.config.run_id)
                self._stop_requested.wait()
        self.stop()
        return record

    def stop(self) -> None:
        self._stop_requested.set()
        self.core.close()
        self._grpc.stop(self.settings.stop_grace).wait(self.settings.stop_grace + 1)
        self.evaluator.stop()
        self.membership.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.journal is not None:
            self.journal.close()
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None
        self.metrics.close()

    def _count_unauthenticated(self) -> None:
        self.stats.record_refused("", "Unauthenticated", wire_bytes=0, dense_bytes=0, after_finish=False)

    # --- background work -------------------------------------------------------------------

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _drain(self) -> None:
        """Give workers time to read 'finished' and release their leases."""
        deadline = time.monotonic() + self.settings.drain_timeout
        while time.monotonic() < deadline:
            self.membership.refresh()
            if not self.membership.live():
                return
            time.sleep(0.1)
        log.info("workers still registered after %.0fs drain: %s", self.settings.drain_timeout,
                 sorted(self.membership.live()))

    def _status_loop(self) -> None:
        while not self._stop_requested.wait(self.settings.status_interval):
            self._publish()
            self._check_diverged()

    def _check_diverged(self) -> None:
        try:
            report = self.coordinator.read_diverged()
        except CoordinationError as exc:
            log.debug("divergence check failed: %s", exc)
            return
        if report is not None and self.diverged is None:
            log.error("training diverged (reported by %s at version %s: %s); ending the run",
                      report.get("worker_id"), report.get("version"), report.get("reason"))
            self.diverged = report
            self.request_stop()

    def _progress_loop(self) -> None:
        """Request an evaluation every eval_every versions."""
        next_eval = self.config.eval_every
        while not self._stop_requested.is_set() and not self.store.finished:
            if self.store.version >= next_eval:
                self.evaluator.request()
                next_eval = (self.store.version // self.config.eval_every + 1) * self.config.eval_every
            self.store.wait_for_version(next_eval, 0.5)

    def _metrics_loop(self) -> None:
        while not self._stop_requested.wait(self.settings.metrics_interval):
            if self.store.finished:
                return  # `wait` writes the last record
            self._write_metrics()

    def _write_metrics(self) -> None:
        """One `metrics` record: what /metrics shows, as a line of metrics.jsonl."""
        self.metrics.write(metrics_record(self.core.status(), self.stats.totals(), self.core.wall_seconds()))

    def _publish(self) -> None:
        status = self.status()
        try:
            if self.coordinator.restore_config(self.config):
                log.warning("Redis had lost run %s (restarted?): configuration written again", self.config.run_id)
            if self.address:
                self.coordinator.publish_server(self.address, ttl=max(5.0, 6 * self.settings.status_interval))
            self.coordinator.write_status(status)
        except CoordinationError as exc:
            log.warning("could not publish status: %s", exc)

    def status(self) -> dict[str, Any]:
        status = self.core.status()
        status["state"] = self._state
        status["address"] = self.address
        status["metrics_url"] = self.metrics_url
        status["updated_at"] = time.time()
        if self._last_eval is not None:
            status["test_accuracy"] = self._last_eval.test_accuracy
            status["test_loss"] = self._last_eval.test_loss
            status["eval_version"] = self._last_eval.version
        return status

    def _record_eval(self, result: Evaluation) -> None:
        self._last_eval = result
        status = self.core.status()
        self.metrics.write(
            {
                "event": "eval",
                **_eval_dict(result),
                "wall_seconds": round(time.monotonic() - self._started, 3),
                "train_loss": status["train_loss"],
                "pushes_per_second": status["pushes_per_second"],
                "pushes_applied": status["pushes_applied"],
                "pushes_refused": status["pushes_refused"],
                "staleness_mean": status["staleness_mean"],
                "staleness_max": status["staleness_max"],
            }
        )
        # The log is where container users watch progress (`docker compose logs -f server`).
        log.info(
            "version %d/%d: test accuracy %.4f, test loss %.4f, %.1f pushes/s, staleness mean %.2f",
            result.version, self.config.steps, result.test_accuracy, result.test_loss,
            status["pushes_per_second"] or 0.0, status["staleness_mean"] or 0.0,
        )

    def _record_membership(self, old: dict[str, int], new: dict[str, int]) -> None:
        self.metrics.write(
            {
                "event": "membership",
                "wall_seconds": round(time.monotonic() - self._started, 3),
                "version": self.store.version,
                "live": {worker: rank for worker, rank in sorted(new.items())},
                "joined": sorted(set(new) - set(old)),
                "left": sorted(set(old) - set(new)),
            }
        )


def _ended_status(out: Path) -> str | None:
    """The status in an earlier summary.json of this run folder, if any."""
    try:
        return str(json.loads((out / "summary.json").read_text()).get("status"))
    except (OSError, ValueError):
        return None


def _eval_dict(result: Evaluation) -> dict[str, Any]:
    return {"version": result.version, "test_loss": result.test_loss, "test_accuracy": result.test_accuracy}

