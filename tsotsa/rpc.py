"""gRPC channels as every role opens them: message limits, the swarm token, readable errors.

Kept free of torch and transformers, so that command-line tools that only talk to a server start fast.
"""

from __future__ import annotations

import grpc

from tsotsa.auth import with_token
from tsotsa.errors import SwarmError

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


def open_channel(address: str, token: str | None) -> grpc.Channel:
    return with_token(grpc.insecure_channel(address, options=GRPC_OPTIONS), token)
