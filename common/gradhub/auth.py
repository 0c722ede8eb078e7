"""The shared token every gRPC call carries, where the run has one.

The server checks it on every RPC of the parameter-server service (an interceptor, so
no handler can forget); the health service stays open, because probes carry no
secrets and learn nothing from it. The token travels as `authorization: Bearer <t>`
metadata; without TLS it crosses the network in clear, so use both outside one host.

Tokens come from the environment (GRADHUB_AUTH_TOKEN) or a file (--auth-token-file),
never from a command-line flag, which every local user could read in `ps`.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from gradhub.errors import ConfigurationError

METADATA_KEY = "authorization"
ENV_VAR = "GRADHUB_AUTH_TOKEN"
#: Shorter tokens are refused: a shared secret must not be guessable.
MIN_TOKEN_CHARS = 16


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_token(token_file: Path | None = None) -> str | None:
    """The token from `token_file`, else from GRADHUB_AUTH_TOKEN, else None (no token)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the auth token file {token_file}: {exc}") from exc
    else:
        token = os.environ.get(ENV_VAR, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(f"the auth token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else ((METADATA_KEY, f"Bearer {token}"),)


def matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of the presented `authorization` value with the token."""
    if presented is None or not presented.startswith("Bearer "):
        return False
    return hmac.compare_digest(presented[len("Bearer "):].encode(), expected.encode())
