"""gRPC channels and servers as every role opens them: message limits, the swarm token, readable errors.

Kept free of torch and transformers, so that command-line tools that only talk to a server start fast.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc

from tsotsa.auth import server_interceptors, with_token
from tsotsa.errors import SwarmError, TsotsaError

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_http_proxy", 0),
]


def describe_rpc_error(address: str, what: str, error: grpc.RpcError) -> SwarmError:
    code = error.code() if hasattr(error, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return SwarmError(f"cannot reach {what} at {address} (is it running?)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SwarmError(f"{what} at {address} did not answer in time")
    details = error.details() if hasattr(error, "details") else str(error)
    return SwarmError(f"{what} at {address}: {code.name if code else 'error'}: {details}")


# Refusals whose details the server writes for people about the request (bad data, an unknown run, a
# missing admin token, ...). A missing swarm token (UNAUTHENTICATED) is about the channel: it is reported
# with the server's address and the code.
SERVER_WORDED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
})


def describe_refusal(address: str, what: str, error: grpc.RpcError) -> SwarmError:
    """`describe_rpc_error`, except that a refusal the server worded for people is shown in its own words."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    if code in SERVER_WORDED and details:
        return SwarmError(details)
    return describe_rpc_error(address, what, error)


def open_channel(address: str, token: str | None) -> grpc.Channel:
    return with_token(grpc.insecure_channel(address, options=GRPC_OPTIONS), token)


def start_server(add_servicer: Callable[[grpc.Server], None], host: str, port: int, token: str | None,
                 workers: int, max_concurrent_rpcs: int | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server of one servicer (`add_servicer(server)` registers it), with the message limits
    and, when a swarm token is set, the token check; returns it and the port it listens on."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS,
                         maximum_concurrent_rpcs=max_concurrent_rpcs, interceptors=server_interceptors(token))
    add_servicer(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise TsotsaError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
