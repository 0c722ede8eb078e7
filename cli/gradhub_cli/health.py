"""`gradhub health`: the standard gRPC health check, answered by the exit status.

Docker's HEALTHCHECK runs it inside the server's container; Kubernetes asks the
same service natively (`grpc:` probes). The empty service name is liveness (the
process serves); `gradhub.v1.ParameterServer` is readiness (the run takes pushes).
It imports neither torch nor the server, so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradhub.tls import ClientTls, client_tls

READINESS_SERVICE = "gradhub.v1.ParameterServer"


def check(address: str, service: str = "", timeout: float = 3.0, tls: ClientTls | None = None) -> str:
    """The serving status's name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    channel = grpc.insecure_channel(address) if tls is None else grpc.secure_channel(address, tls.credentials())
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return "SERVICE_UNKNOWN" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradhub health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("GRADHUB_HEALTH_ADDRESS", "127.0.0.1:50051"),
                        help="server host:port (env GRADHUB_HEALTH_ADDRESS; default 127.0.0.1:50051)")
    parser.add_argument("--ready", action="store_true",
                        help=f"ask readiness ({READINESS_SERVICE}) instead of liveness")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate (a TLS server)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (a mutual-TLS server)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    parser.add_argument("--quiet", action="store_true", help="print nothing; the exit status says it")
    args = parser.parse_args(argv)
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    status = check(args.address, READINESS_SERVICE if args.ready else "", args.timeout, tls)
    if not args.quiet:
        print(status)
    return 0 if status == "SERVING" else 1
