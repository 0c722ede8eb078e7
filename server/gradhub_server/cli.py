"""`gradhub server`: run the parameter server of one run.

Every flag can also be set by an environment variable GRADHUB_<FLAG> (for example
GRADHUB_REDIS_URL, GRADHUB_BIND, GRADHUB_MODE), which is how containers configure it.
If the run's configuration is already in Redis (written by `gradhub run`, or by an
earlier start of this server) it is used; flags that contradict it are an error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from gradhub import memory
from gradhub.auth import load_token
from gradhub.config import (
    add_run_config_arguments,
    apply_env_defaults,
    check_agrees,
    given_run_fields,
    run_config_from_args,
)
from gradhub.coordination import RunCoordinator
from gradhub.errors import GradhubError
from gradhub.logs import set_torch_threads, setup_logging
from gradhub.tls import server_tls
from gradhub_server.app import ServerApp, ServerSettings

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradhub server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", required=True, help="Redis URL (redis://host:port/0 or unix:///path)")
    parser.add_argument("--run-id", help="run to serve (default: a new run id)")
    parser.add_argument("--bind", default="127.0.0.1:0", help="gRPC listen address; port 0 picks a free port")
    parser.add_argument("--advertise", help="address workers should dial (default: the bound host:port)")
    parser.add_argument("--out", type=Path, help="run folder for results (default runs/<run-id>)")
    parser.add_argument("--cache-dir", type=Path, help="dataset cache folder (default ~/.cache/gradhub)")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="seconds to wait for workers to leave after the last step")
    parser.add_argument("--metrics-bind", default="127.0.0.1:0",
                        help="host:port of the Prometheus /metrics endpoint; port 0 picks one; 'off' disables it")
    parser.add_argument("--metrics-interval", type=float, default=1.0,
                        help="seconds between `metrics` records in metrics.jsonl (default 1)")
    parser.add_argument("--auth-token-file", type=Path,
                        help="file holding the run's shared token; every RPC must carry it "
                        "(default: GRADHUB_AUTH_TOKEN from the environment; neither: no token)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: serve gRPC over TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="PEM CA: admit only clients with a certificate it signed (mutual TLS)")
    parser.add_argument("--max-inflight-pushes", type=int, default=0,
                        help="pushes read or waiting at once; more are refused RESOURCE_EXHAUSTED "
                        "(default: twice the workers plus 4)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="write a checkpoint to <out>/checkpoints every N versions (0: not by count)")
    parser.add_argument("--checkpoint-seconds", type=float, default=0.0,
                        help="and at most this many seconds after a change (0: not by time). A server "
                        "started on a run folder with checkpoints resumes from the newest good one")
    parser.add_argument("--no-journal", action="store_true",
                        help="with checkpoints on, do not journal each update before acknowledging it "
                        "(a restart then loses the versions after the newest checkpoint)")
    parser.add_argument("--journal-fsync", action="store_true",
                        help="fsync every journal record: acknowledged updates survive a power cut, "
                        "not only a killed server (costs a disk flush per version)")
    parser.add_argument("--keep-journal", action="store_true",
                        help="keep every journal segment: an audit trail of every version and the "
                        "pushes it carried (default: delete what the kept checkpoints cover)")
    parser.add_argument("--linger", action="store_true",
                        help="after the run ends, keep answering health and status until SIGTERM "
                        "(for Kubernetes, which restarts a server that exits)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--step-threads", type=int, default=0,
                        help="threads a large update runs on at once (0: in sync mode, whose workers "
                        "wait for it, one per usable CPU, at most 4; one in the other modes)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    add_run_config_arguments(parser)
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("server", args.log_level)
    set_torch_threads(args.torch_threads)
    memory.keep_freed_memory()  # every step moves the same sizes: reuse, do not re-fault
    try:
        coordinator = RunCoordinator.from_url(args.redis_url, args.run_id or "pending")
        config = None
        if args.run_id:
            config = coordinator.read_config()
            if config is not None:
                check_agrees(config, given_run_fields(args))
        if config is None:
            config = run_config_from_args(args, args.run_id)
            coordinator = RunCoordinator(coordinator.client, config.run_id)
            config = coordinator.publish_config(config)
        settings = ServerSettings(
            out=args.out or Path("runs") / config.run_id,
            bind=args.bind,
            advertise=args.advertise,
            cache_dir=args.cache_dir,
            drain_timeout=args.drain_timeout,
            metrics_bind=None if args.metrics_bind == "off" else args.metrics_bind,
            metrics_interval=args.metrics_interval,
            linger=args.linger,
            max_inflight_pushes=args.max_inflight_pushes,
            step_threads=args.step_threads,
            checkpoint_every=args.checkpoint_every,
            checkpoint_seconds=args.checkpoint_seconds,
            journal=not args.no_journal,
            journal_fsync=args.journal_fsync,
            keep_journal=args.keep_journal,
            auth_token=load_token(args.auth_token_file),
            tls=server_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
        )
        app = ServerApp(config, coordinator, settings)
        app.start()
    except GradhubError as exc:
        log.error("%s", exc)
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping after writing results", signal.Signals(signum).name)
        app.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    record = app.wait()
    log.info(
        "run %s %s at version %d: test accuracy %.4f; results in %s",
        record["run_id"], record["status"], record["steps"], record["final_test_accuracy"] or 0.0,
        settings.out,
    )
    # A diverged run is a result (the staleness lab records it), not a failure of the server.
    return 0 if record["status"] in ("finished", "diverged") else 130


if __name__ == "__main__":
    sys.exit(main())
