"""gRPC channels and servers as every role opens them: message limits, the swarm token, TLS, readable errors.

Kept free of torch and transformers, so that command-line tools that only talk to a server start fast.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc

from tsotsa.auth import server_interceptors, with_token
from tsotsa.errors import SwarmError, TsotsaError
from tsotsa.tls import TlsSettings

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_http_proxy", 0),
]


def describe_rpc_error(address: str, what: str, error: grpc.RpcError, tls: bool = False) -> SwarmError:
    """One readable line for a failed call to `what` at `address`; `tls`: whether this side uses TLS, which
    tells a refused certificate from a server that only closed the connection."""
    code = error.code() if hasattr(error, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        failure = tls_failure(address, what, error, tls)
        return SwarmError(failure or f"cannot reach {what} at {address} (is it running?)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SwarmError(f"{what} at {address} did not answer in time")
    details = error.details() if hasattr(error, "details") else str(error)
    return SwarmError(f"{what} at {address}: {code.name if code else 'error'}: {details}")


def tls_failure(address: str, what: str, error: grpc.RpcError, tls: bool) -> str | None:
    """What went wrong in the TLS handshake of a call that failed to connect, in one line, or None when the
    failure was not one of TLS. gRPC reports all of these as UNAVAILABLE; only its details (or the debug
    string) tell them apart."""
    details = _call(error, "details")
    text = f"{details} {_call(error, 'debug_error_string')}"
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if "Hostname Verification" in text:
        return (f"TLS certificate verification failed for {what} at {address}: its certificate is not for "
                f"{host}")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":", 1)[0].strip()
        if not reason or "issuer" in reason or "self" in reason:  # "unable to get local issuer certificate"
            return (f"TLS certificate verification failed for {what} at {address}: its certificate is not signed "
                    "by the CA of --tls-ca")
        return f"TLS certificate verification failed for {what} at {address}: {reason}"  # "certificate has expired"
    if "WRONG_VERSION_NUMBER" in text:
        return f"TLS handshake with {what} at {address} failed: it does not speak TLS (started without --tls-cert?)"
    if tls and "handshake" in text.lower():
        reason = " ".join(details.split("handshake failed", 1)[-1].split()).strip(" :")[:160]
        return f"TLS handshake with {what} at {address} failed: {reason}"
    if "Socket closed" in text and "failed to connect" in text:
        # hung up while the connection was being set up (not in a call: a peer dying mid-stream says the same
        # without "failed to connect"): what a TLS server does to a client it does not admit
        if tls:
            return (f"TLS handshake with {what} at {address} failed: it closed the connection, as a server does "
                    "to a certificate its CA did not sign (--tls-cert must be signed by the swarm's CA)")
        return (f"cannot reach {what} at {address}: it closed the connection, as a TLS server does to a client "
                "without TLS (give --tls-cert, --tls-key and --tls-ca, or TSOTSA_TLS_*)")
    return None


def _call(error: grpc.RpcError, method: str) -> str:
    try:
        return str(getattr(error, method)() or "")
    except Exception:  # an RpcError that is not a Call (raised by hand) has neither
        return ""


# Refusals whose details the server writes for people about the request (bad data, an unknown run, a
# missing admin token, ...). A missing swarm token (UNAUTHENTICATED) is about the channel: it is reported
# with the server's address and the code.
SERVER_WORDED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
})


def describe_refusal(address: str, what: str, error: grpc.RpcError, tls: bool = False) -> SwarmError:
    """`describe_rpc_error`, except that a refusal the server worded for people is shown in its own words."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    if code in SERVER_WORDED and details:
        return SwarmError(details)
    return describe_rpc_error(address, what, error, tls)


def open_channel(address: str, token: str | None, tls: TlsSettings | None = None) -> grpc.Channel:
    """A channel to `address` carrying the swarm token; with `tls`, mutual TLS: the server's certificate is
    checked against the lab CA and the host of `address`, and this machine's certificate is presented."""
    if tls is None:
        return with_token(grpc.insecure_channel(address, options=GRPC_OPTIONS), token)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                               certificate_chain=tls.cert)
    return with_token(grpc.secure_channel(address, credentials, options=GRPC_OPTIONS), token)


def start_server(add_servicer: Callable[[grpc.Server], None], host: str, port: int, token: str | None,
                 workers: int, max_concurrent_rpcs: int | None = None, tls: TlsSettings | None = None
                 ) -> tuple[grpc.Server, int]:
    """A started gRPC server of one servicer (`add_servicer(server)` registers it), with the message limits
    and, when a swarm token is set, the token check; returns it and the port it listens on. With `tls` it
    listens only for TLS, presents this machine's certificate and admits only clients whose certificate the
    lab CA signed (there is no plain port beside it)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS,
                         maximum_concurrent_rpcs=max_concurrent_rpcs, interceptors=server_interceptors(token))
    add_servicer(server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        credentials = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                                  require_client_auth=True)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise TsotsaError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
