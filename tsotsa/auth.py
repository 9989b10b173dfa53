"""The swarm token: a shared secret every call carries in its metadata, so only admitted machines use
a private swarm. Servers refuse calls without it (UNAUTHENTICATED); no token configured means open."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

METADATA_KEY = "authorization"


def _bearer(token: str) -> str:
    return f"Bearer {token}"


class TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = _bearer(token)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        presented = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        if handler is None or hmac.compare_digest(presented, self._expected):
            return handler

        def refuse(_request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong swarm token")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def server_interceptors(token: str | None) -> list[grpc.ServerInterceptor]:
    return [TokenCheck(token)] if token else []


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = (METADATA_KEY, _bearer(token))

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return CallDetails(details, [*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class CallDetails(grpc.ClientCallDetails):
    """A call's details with other metadata: what a client interceptor passes on."""

    def __init__(self, details: grpc.ClientCallDetails, metadata) -> None:
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """`channel`, sending the swarm token with every call when one is set."""
    return grpc.intercept_channel(channel, _AddToken(token)) if token else channel


ADMIN_METADATA = "x-tsotsa-admin"


def admin_refusal(expected: str | None, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
    """Why a call that launches or stops runs is refused, or None when it carries the admin token. The admin
    token is separate from the swarm token: admitted machines may serve and query, not train."""
    if not expected:
        return grpc.StatusCode.FAILED_PRECONDITION, ("this coordinator has no admin token: start it with "
                                                     "--admin-token (or TSOTSA_ADMIN_TOKEN) to launch runs")
    presented = dict(context.invocation_metadata() or ()).get(ADMIN_METADATA, "")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return grpc.StatusCode.PERMISSION_DENIED, "missing or wrong admin token"
    return None
