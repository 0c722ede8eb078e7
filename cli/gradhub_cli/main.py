"""gradhub: a parameter-server cluster for data-parallel PyTorch training.

  gradhub run      a whole cluster on this machine (Redis, server, workers); trains and reports
  gradhub status   what a run is doing (from Redis)
  gradhub bench    measurements: codecs (training runs), topk, apply, indices
  gradhub sweep    a grid of runs (policies x workers x delays x staleness x codecs x seeds):
                   CSV, plots and a markdown report
  gradhub cluster  a containerised cluster on a Docker engine: up | status | logs | down
  gradhub health   ask a server the standard gRPC health question (exit 0: serving)
  gradhub server   one parameter server (for containers and clusters)
  gradhub worker   one worker (for containers and clusters)

`gradhub COMMAND --help` tells more.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from gradhub.errors import GradhubError
from gradhub.logs import setup_logging

if TYPE_CHECKING:
    from gradhub_cli.launcher import LocalCluster

log = logging.getLogger(__name__)

#: `gradhub run`'s exit status when training diverged: the run folder holds its summary.
EXIT_DIVERGED = 3


def _run_parser() -> argparse.ArgumentParser:
    # Imported here: the run configuration needs torch, and `gradhub health` must stay light.
    from gradhub.config import add_run_config_arguments, apply_env_defaults

    parser = argparse.ArgumentParser(
        prog="gradhub run",
        description="Start Redis, a parameter server and N workers on this machine; train; "
        "write summary.json, metrics.jsonl, plots and the final model to the run folder.",
    )
    parser.add_argument("--out", type=Path, help="run folder (default runs/<run-id>)")
    parser.add_argument("--run-id", help="run id (default: time, mode and a random suffix)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--cache-dir", type=Path, help="dataset cache folder (default ~/.cache/gradhub)")
    parser.add_argument("--max-restarts", type=int, default=2,
                        help="restarts allowed per crashed worker before the run is stopped")
    parser.add_argument("--device", help="worker device: auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--loader-workers", type=int, help="DataLoader worker processes per worker")
    parser.add_argument("--pin-workers", choices=["auto", "on", "off"], default="auto",
                        help="each worker on CPUs of its own (Linux). auto: when every worker's share "
                        "of cores fits in this machine's (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    add_run_config_arguments(parser)
    apply_env_defaults(parser)
    return parser


def _status_parser() -> argparse.ArgumentParser:
    from gradhub.config import apply_env_defaults

    parser = argparse.ArgumentParser(prog="gradhub status", description="Show a run's status.")
    parser.add_argument("--redis-url", required=True, help="the run's Redis (printed by gradhub run)")
    parser.add_argument("--run-id", help="run id (default: the newest)")
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    apply_env_defaults(parser)
    return parser


def _interrupt_cluster(cluster: list[LocalCluster]) -> Callable[[int, FrameType | None], None]:
    """Ctrl-C and SIGTERM for `gradhub run`: a supervising cluster stops at its next poll
    (see LocalCluster.interrupt); while it starts up, or once it is stopping (a second
    Ctrl-C: hurry), KeyboardInterrupt at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if not (cluster and cluster[0].interrupt()):
            raise KeyboardInterrupt

    return handler


def cmd_run(argv: list[str]) -> int:
    from gradhub.config import run_config_from_args
    from gradhub_cli.launcher import LaunchError, LaunchSettings, LocalCluster, format_summary

    args = _run_parser().parse_args(argv)
    setup_logging("run", "WARNING")
    # SIGTERM takes Ctrl-C's path: every process stopped, results written, Redis removed.
    running: list[LocalCluster] = []
    signal.signal(signal.SIGTERM, _interrupt_cluster(running))
    signal.signal(signal.SIGINT, _interrupt_cluster(running))
    try:
        config = run_config_from_args(args, args.run_id)
        # Fail here, not in N processes, on a bad model or codec name.
        from gradhub.codecs import codec_from_name
        from gradhub.models import resolve_factory

        codec_from_name(config.compression)
        resolve_factory(config.model)
        worker_args: list[str] = []
        if args.device:
            worker_args += ["--device", args.device]
        if args.loader_workers is not None:
            worker_args += ["--loader-workers", str(args.loader_workers)]
        out = args.out or Path("runs") / config.run_id
        cluster = LocalCluster(
            LaunchSettings(config=config, out=out, redis_url=args.redis_url, cache_dir=args.cache_dir,
                           progress=not args.no_progress, max_restarts=args.max_restarts,
                           worker_args=worker_args, pin_workers=args.pin_workers)
        )
        running.append(cluster)
        summary = cluster.run()
    except KeyboardInterrupt:
        print("\ninterrupted: every process stopped; partial results (if any) in the run folder",
              file=sys.stderr)
        return 130
    except LaunchError as exc:
        print(f"\ngradhub run failed: {exc}", file=sys.stderr)
        return 1
    except GradhubError as exc:
        print(f"gradhub run: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, out))
    return {"finished": 0, "diverged": EXIT_DIVERGED}.get(summary["status"], 1)


def cmd_status(argv: list[str]) -> int:
    from gradhub_cli.status import format_status_report, read_status, to_json

    args = _status_parser().parse_args(argv)
    while True:
        try:
            status = read_status(args.redis_url, args.run_id)
        except GradhubError as exc:
            print(f"gradhub status: {exc}", file=sys.stderr)
            return 1
        print(to_json(status) if args.json else format_status_report(status), flush=True)
        if not args.watch or status.get("state") in ("finished", "interrupted"):
            return 0
        time.sleep(args.watch)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "status":
        return cmd_status(rest)
    if command == "bench":
        from gradhub_cli.bench import main as bench_main

        return bench_main(rest)
    if command == "sweep":
        from gradhub_cli.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "health":
        from gradhub_cli.health import main as health_main

        return health_main(rest)
    if command == "cluster":
        from gradhub_cli.cluster import main as cluster_main

        return cluster_main(rest)
    if command == "server":
        from gradhub_server.cli import main as server_main

        return server_main(rest)
    if command == "worker":
        from gradhub.processes import exit_now
        from gradhub_worker.cli import main as worker_main

        exit_now(worker_main(rest))
    print(f"gradhub: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
