"""`gradhub worker`: run one worker of a run.

Every flag can also be set by an environment variable GRADHUB_<FLAG> (for example
GRADHUB_REDIS_URL, GRADHUB_RUN_ID, GRADHUB_DEVICE), which is how containers
configure it. The run's configuration, the server's address and this worker's
rank all come from Redis.
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
from gradhub.config import apply_env_defaults
from gradhub.coordination import RunCoordinator, connect, list_runs
from gradhub.cpu_affinity import parse_cpu_list, pin_to
from gradhub.errors import GradhubError
from gradhub.logs import set_torch_threads, setup_logging
from gradhub.retry import wait_for
from gradhub.tls import client_tls
from gradhub_worker.worker import Worker, WorkerSettings, default_worker_id

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradhub worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", required=True, help="Redis URL (redis://host:port/0 or unix:///path)")
    parser.add_argument("--run-id", help="run to join (default: the newest run in Redis)")
    parser.add_argument("--server", help="server address host:port (default: read from Redis)")
    parser.add_argument("--worker-id", help="this worker's id (default host-pid-random)")
    parser.add_argument("--rank", type=int,
                        help="take exactly this rank (e.g. a Kubernetes Indexed Job's completion index); "
                        "default: the lowest free rank")
    parser.add_argument("--auth-token-file", type=Path,
                        help="file holding the run's shared token (default: GRADHUB_AUTH_TOKEN from the environment)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: connect over TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate of this worker (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--ack-log", type=Path,
                        help="append every push the server acknowledged to this file (JSON lines: "
                        "worker_id, seq, version), for audits against the server's journal")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--cache-dir", type=Path, help="dataset cache folder (default ~/.cache/gradhub)")
    parser.add_argument("--join-timeout", type=float, default=60.0,
                        help="seconds to wait for the run's config, server and a free rank")
    parser.add_argument("--rpc-timeout", type=float, default=60.0, help="deadline of one push or pull")
    parser.add_argument("--give-up-after", type=float, default=60.0,
                        help="exit after this many seconds without reaching the server")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--cpus", type=parse_cpu_list, default=None,
                        help="run on these CPUs only, e.g. 0-3,6 (Linux; default: wherever the kernel puts it)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("worker", args.log_level)
    if args.cpus is not None:
        try:
            pin_to(args.cpus)  # before torch and gRPC start threads: they inherit it
        except GradhubError as exc:
            log.error("%s", exc)
            return 2
    set_torch_threads(args.torch_threads)
    memory.keep_freed_memory()  # every step moves the same sizes: reuse, do not re-fault

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through finally: the lease is released

    signal.signal(signal.SIGTERM, on_signal)
    try:
        run_id = args.run_id or wait_for(
            lambda: next(iter(list_runs(connect(args.redis_url))), None),
            args.join_timeout, "a run in Redis",
        )
        settings = WorkerSettings(
            redis_url=args.redis_url,
            run_id=run_id,
            worker_id=args.worker_id or default_worker_id(),
            server=args.server,
            device=args.device,
            loader_workers=args.loader_workers,
            cache_dir=args.cache_dir,
            join_timeout=args.join_timeout,
            rpc_timeout=args.rpc_timeout,
            give_up_after=args.give_up_after,
            rank=args.rank,
            auth_token=load_token(args.auth_token_file),
            tls=client_tls(args.tls_ca, args.tls_cert, args.tls_key),
            ack_log=args.ack_log,
        )
        return Worker(settings, RunCoordinator.from_url(args.redis_url, run_id)).run()
    except (GradhubError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
