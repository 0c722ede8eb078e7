"""gradhub's exceptions, and the one table that maps them to gRPC status codes.

The server raises these from its domain code; its servicer turns them into a
status with `status_for`. The worker turns a status back into one of them with
`error_for_status`, so both sides speak of the same failures by the same names.
"""

from __future__ import annotations

import grpc


class GradhubError(Exception):
    """Base of every error gradhub raises on purpose."""

    #: Where two errors share a status code: the prefixes of the details that mean this one.
    detail_prefixes: tuple[str, ...] = ()

    #: True when the server repeats an earlier refusal to a retried push (counted once).
    replayed: bool = False


class ConfigurationError(GradhubError):
    """A setting, model spec, codec name or flag that cannot work."""


# --- what a push or pull can be refused for -------------------------------------------------


class InvalidRequest(GradhubError):
    """A message that does not describe what it claims (shape, dtype, chunks, sizes)."""


class NonFiniteGradient(InvalidRequest):
    """A gradient holding NaN or Inf: applying it would destroy the model."""


class FuturePush(InvalidRequest):
    """A push computed on a version the server has not reached: the client is confused."""


class PayloadTooLarge(GradhubError):
    """A declared payload larger than the server accepts."""


class ServerBusy(GradhubError):
    """Too many pushes in flight: nothing was read or applied; send it again after a backoff.

    gRPC's own limit on concurrent calls answers with the same code and its own words.
    """

    detail_prefixes = ("server busy", "Concurrent RPC limit exceeded")


class WrongRun(GradhubError):
    """A request for another run than the one this server serves."""


class UnknownWorker(GradhubError):
    """A worker that holds no membership lease in this run."""


class StalePush(GradhubError):
    """A push computed on a version too old for the policy: pull and compute again."""


class LatePush(StalePush):
    """A push for a sync step that went ahead without it (backup workers): dropped, and
    counted apart from other refusals."""


class DuplicatePush(GradhubError):
    """A push whose sequence number is older than the worker's last: a late copy, never applied."""


class RunFinished(GradhubError):
    """The run reached its last step: nothing more is accepted."""


class ServerUnavailable(GradhubError):
    """The server is stopping, or could not complete the request in time."""


class VersionNotReached(GradhubError):
    """A pull waited for a version that did not come before its deadline."""


class PullDeferred(VersionNotReached):
    """SSP: the worker is too far ahead of the slowest one to read yet; pull again."""


# --- coordination ---------------------------------------------------------------------------


class CoordinationError(GradhubError):
    """Redis could not do what coordination needs."""


class RedisUnavailable(CoordinationError):
    """Redis did not answer."""


class ConfigConflict(CoordinationError):
    """A run's configuration was already written, with other values."""


class Unauthenticated(GradhubError):
    """A call without the run's token, or with another."""


class NoFreeRank(CoordinationError):
    """Every rank of the run is held by a live worker."""


class LeaseLost(CoordinationError):
    """A worker's membership lease expired or was taken over."""


# The one table: domain error -> gRPC status. Order matters for the reverse lookup: the
# first class listed for a code is what a client reconstructs from that code.
_STATUS_TABLE: tuple[tuple[type[GradhubError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NonFiniteGradient, grpc.StatusCode.INVALID_ARGUMENT),
    (FuturePush, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (ServerBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WrongRun, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownWorker, grpc.StatusCode.NOT_FOUND),
    (StalePush, grpc.StatusCode.ABORTED),
    (DuplicatePush, grpc.StatusCode.ALREADY_EXISTS),
    (RunFinished, grpc.StatusCode.OUT_OF_RANGE),
    (ServerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (VersionNotReached, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CoordinationError, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_for(error: GradhubError) -> grpc.StatusCode:
    """The status code a server answers with for `error` (most specific class wins)."""
    for cls in type(error).__mro__:
        for known, code in _STATUS_TABLE:
            if cls is known:
                return code
    return grpc.StatusCode.INTERNAL


def error_for_status(code: grpc.StatusCode, details: str) -> GradhubError:
    """The domain error a client reads from a failed call."""
    for cls, known in _STATUS_TABLE:
        if known == code and (not cls.detail_prefixes or details.startswith(cls.detail_prefixes)):
            return cls(details)
    return ServerUnavailable(f"{code.name}: {details}")
