"""`gradhub run`: a whole cluster on this machine — Redis, the server, N workers.

Each component is a real process (the same `gradhub server` / `gradhub worker`
that containers run), talking real gRPC over loopback and real Redis over a Unix
socket. The launcher writes the run's configuration to Redis, starts everything,
draws progress from the status the server publishes, and stops every process it
started: at the end, on Ctrl-C or SIGTERM, or when a process dies for good (a
worker that crashes is restarted up to `max_restarts` times; the server is not).
Children get SIGTERM if the launcher itself dies, so nothing outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gradhub import auth, cpu_affinity
from gradhub.config import RunConfig
from gradhub.coordination import RunCoordinator
from gradhub.data import load_dataset
from gradhub.errors import CoordinationError, GradhubError
from gradhub.processes import die_with_parent
from gradhub.redis_server import EmbeddedRedis
from gradhub_cli.progress import ProgressLine, format_status

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
#: After the server exits, how long workers get to exit on their own.
WORKER_EXIT_TIMEOUT_S = 15.0
#: How long a process gets between SIGTERM and SIGKILL.
TERMINATE_TIMEOUT_S = 10.0


class LaunchError(GradhubError):
    """A component of the local cluster failed for good."""


@dataclass
class Component:
    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log_file: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, timeout: float, between: Callable[[], None] | None = None) -> int | None:
        """The exit code, or None if still running after `timeout`; `between` runs every
        poll interval (it may raise to stop waiting)."""
        if self.process is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.process.wait(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return None
            if between is not None:
                between()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            # Bounded: SIGKILL cannot be ignored, and a wait that never ends is a hang.
            if self.wait(TERMINATE_TIMEOUT_S) is None:
                log.warning("%s (pid %d) did not exit after SIGKILL", self.name, self.process.pid)

    def close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LaunchSettings:
    config: RunConfig
    out: Path
    redis_url: str | None = None
    cache_dir: Path | None = None
    progress: bool = True
    max_restarts: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Extra flags for every worker (e.g. --device cpu).
    worker_args: list[str] = field(default_factory=list)
    #: Each worker on CPUs of its own (gradhub.cpu_affinity): on, off, or auto (on when
    #: every worker's share of cores fits in the CPUs this process may use).
    pin_workers: str = "auto"


class LocalCluster:
    def __init__(self, settings: LaunchSettings, stream: IO[str] | None = None) -> None:
        self.settings = settings
        self.config = settings.config
        self.stream = stream or sys.stderr
        self.components: list[Component] = []
        self.redis_url: str | None = None
        self._progress = ProgressLine(self.stream) if settings.progress else None
        self._interrupted = threading.Event()
        self._supervising = False

    def interrupt(self) -> bool:
        """Ask a supervising cluster to stop; False when it is not supervising (starting up,
        or already stopping), where the caller interrupts the old way.

        Why not raise KeyboardInterrupt from the signal handler? It can land between
        `Popen`'s non-blocking acquire of its waitpid lock and the `try` that releases it,
        and every later `wait()` on that child then blocks forever: a Ctrl-C that hangs the
        launcher. The supervise loop checks this flag between polls, where no lock is held."""
        if not self._supervising:
            return False
        self._interrupted.set()
        return True

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.message(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _torch_threads(self) -> int:
        # Workers and server share this machine's cores: each gets its share, not all of them.
        return max(1, (os.cpu_count() or 1) // (self.config.workers + 1))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Every local run has a token, fresh unless the caller set one: nothing else on this
        # machine can push into it, at no cost to the user.
        env.setdefault(auth.ENV_VAR, auth.new_token())
        env.setdefault("OMP_NUM_THREADS", str(self._torch_threads()))
        return env

    def _worker_cpus(self) -> list[frozenset[int]] | None:
        """Each worker's CPUs, or None to leave placement to the kernel."""
        if self.settings.pin_workers == "off":
            return None
        allowed = cpu_affinity.allowed_cpus()
        sets = cpu_affinity.worker_cpu_sets(self.config.workers, self._torch_threads(), allowed)
        if sets is None and self.settings.pin_workers == "on":
            if allowed is None:
                raise LaunchError("--pin-workers on: this OS does not let a process choose its CPUs")
            # More workers than cores: they share, round robin, each still on one place.
            ordered = sorted(allowed)
            sets = [frozenset({ordered[rank % len(ordered)]}) for rank in range(self.config.workers)]
        return sets

    def _common_args(self) -> list[str]:
        args = ["--redis-url", str(self.redis_url), "--run-id", self.config.run_id,
                "--torch-threads", str(self._torch_threads())]
        if self.settings.cache_dir is not None:
            args += ["--cache-dir", str(self.settings.cache_dir)]
        return args

    def run(self) -> dict[str, Any]:
        """Run the cluster to the end; return summary.json's content."""
        out = self.settings.out
        out.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            if self.settings.redis_url:
                self.redis_url = self.settings.redis_url
            else:
                redis = stack.enter_context(EmbeddedRedis())
                self.redis_url = redis.url
            stack.callback(self._stop_all)
            coordinator = RunCoordinator.from_url(self.redis_url, self.config.run_id)
            coordinator.publish_config(self.config)
            # Generate the dataset once here, not in N+1 processes at once.
            load_dataset(self.config.dataset, self.settings.cache_dir)
            self._say(
                f"run {self.config.run_id}: {self.config.mode}, {self.config.workers} workers, "
                f"model {self.config.model}, compression {self.config.compression}, "
                f"{self.config.steps} steps -> {out}"
            )
            self._say(f"watch it: gradhub status --redis-url {self.redis_url}")
            env = self._env()
            server = Component(
                "server",
                [sys.executable, "-m", "gradhub_server", *self._common_args(),
                 "--bind", "127.0.0.1:0", "--out", str(out)],
                out / "logs" / "server.log",
            )
            self.components.append(server)
            server.start(env)
            cpus = self._worker_cpus()
            for rank in range(self.config.workers):
                pin = ["--cpus", cpu_affinity.format_cpu_list(cpus[rank])] if cpus else []
                worker = Component(
                    f"worker-{rank}",
                    [sys.executable, "-m", "gradhub_worker", *self._common_args(), *pin,
                     *self.settings.worker_args],
                    out / "logs" / f"worker-{rank}.log",
                )
                self.components.append(worker)
                worker.start(env)
            self._supervising = True
            try:
                self._supervise(server, coordinator, env)
            finally:
                self._supervising = False
        return self._read_summary()

    def _check_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise KeyboardInterrupt

    def _supervise(self, server: Component, coordinator: RunCoordinator, env: dict[str, str]) -> None:
        status: dict[str, Any] | None = None
        told_metrics = False
        while True:
            code = server.poll()
            if code is not None:
                if code != 0:
                    raise LaunchError(
                        f"the server exited with code {code}; its log ({server.log_path}) ends:\n"
                        f"{server.log_tail()}"
                    )
                break
            for worker in self.components[1:]:
                self._check_worker(worker, env)
            try:
                status = coordinator.read_status() or status
            except CoordinationError as exc:
                log.debug("status unavailable: %s", exc)
            if status is not None and status.get("metrics_url") and not told_metrics:
                told_metrics = True
                self._say(f"metrics (Prometheus): {status['metrics_url']}")
            if status is not None and self._progress is not None:
                self._progress.update(format_status(status, self.config.workers), key=status.get("version"))
            if self._interrupted.wait(POLL_INTERVAL_S):
                raise KeyboardInterrupt
        if self._progress is not None:
            try:
                status = coordinator.read_status() or status
            except CoordinationError:
                pass
            if status is None:
                self._progress.finish()
            else:
                self._progress.finish(format_status(status, self.config.workers), key=status.get("version"))
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        for worker in self.components[1:]:
            code = worker.wait(max(0.0, deadline - time.monotonic()), self._check_interrupted)
            if code is None:
                self._say(f"{worker.name} did not exit after the run finished; stopping it")

    def _check_worker(self, worker: Component, env: dict[str, str]) -> None:
        code = worker.poll()
        if code is None or code == 0:
            return
        if worker.restarts >= self.settings.max_restarts:
            raise LaunchError(
                f"{worker.name} exited with code {code} after {worker.restarts} restarts; "
                f"its log ({worker.log_path}) ends:\n{worker.log_tail()}"
            )
        worker.restarts += 1
        self._say(
            f"{worker.name} exited with code {code}; restarting "
            f"({worker.restarts}/{self.settings.max_restarts})"
        )
        worker.close_log()
        worker.start(env)

    def _stop_all(self) -> None:
        """SIGTERM everything still running (server first: it writes results), then SIGKILL."""
        for component in self.components:
            component.terminate()
        deadline = time.monotonic() + TERMINATE_TIMEOUT_S
        for component in self.components:
            if component.wait(max(0.0, deadline - time.monotonic())) is None:
                component.kill()
            component.close_log()

    def _read_summary(self) -> dict[str, Any]:
        path = self.settings.out / "summary.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise LaunchError(f"the run ended without a readable {path}: {exc}") from exc


def format_summary(summary: dict[str, Any], out: Path) -> str:
    mb = 1e6
    ratio = summary.get("compression_ratio")
    lines = [
        f"run {summary['run_id']} {summary['status']} in {summary['wall_seconds']:.1f}s: "
        f"{summary['steps']} steps, test accuracy {100 * (summary['final_test_accuracy'] or 0):.2f}% "
        f"(test loss {summary['final_test_loss'] or float('nan'):.4f})",
        f"pushes applied {summary['pushes_applied']}, refused {summary['pushes_refused']}; "
        f"pushed {summary['bytes_pushed'] / mb:.2f} MB "
        f"(dense fp32: {summary['dense_bytes_equivalent'] / mb:.2f} MB"
        + (f", {ratio:.1f}x less" if ratio else "")
        + f"), pulled {summary['bytes_pulled'] / mb:.2f} MB",
        f"staleness mean {summary['staleness']['mean']:.2f}, max {summary['staleness']['max']}",
        f"results in {out}/: summary.json metrics.jsonl training.png staleness.png model.pt logs/",
    ]
    return "\n".join(lines)
