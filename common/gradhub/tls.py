"""TLS and mutual TLS for gRPC, from PEM files.

The server presents a certificate (`--tls-cert`, `--tls-key`) and, for mutual TLS, admits
only clients whose certificate a given CA signed (`--tls-client-ca`). Workers verify the
server against `--tls-ca` and present their own certificate when the server asks. Files are
read once at start; a missing or unreadable one is a ConfigurationError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from gradhub.errors import ConfigurationError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc}") from exc


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    #: When set, clients must present a certificate signed by this CA (mutual TLS).
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    #: The CA that signed the server's certificate.
    ca: Path
    #: This client's certificate and key, for servers that require mutual TLS.
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigurationError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(cert, key, client_ca)


def client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ClientTls | None:
    if ca is None:
        if cert is not None or key is not None:
            raise ConfigurationError("a client certificate needs --tls-ca (the server's CA)")
        return None
    return ClientTls(ca, cert, key)
