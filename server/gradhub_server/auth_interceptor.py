"""Refuse every parameter-server RPC that does not carry the run's token (UNAUTHENTICATED)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from gradhub import auth

log = logging.getLogger(__name__)

#: Checked services: the parameter server's. Health stays open for probes.
PROTECTED_PREFIX = "/gradhub.v1."


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str, on_refused: Callable[[], None] | None = None) -> None:
        self._token = token
        self._on_refused = on_refused

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        if not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(auth.METADATA_KEY)
        if auth.matches(self._token, presented):
            return continuation(handler_call_details)
        reason = "no auth token" if presented is None else "wrong auth token"
        if self._on_refused is not None:
            self._on_refused()
        log.warning("refused %s: %s", handler_call_details.method, reason)
        return _refusal(continuation(handler_call_details), reason)


def _refusal(handler: Any, reason: str) -> Any:
    """A handler of the same shape that aborts before reading anything from the caller."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: this server requires the run's token")

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
