"""A refused request: the gRPC status code and the message the caller gets. The peer keeps serving."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import grpc

logger = logging.getLogger(__name__)


class PeerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def refusals(what: str):
    """A PeerError becomes its status; anything else INTERNAL, logged. The peer keeps serving either way."""

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, request, context: grpc.ServicerContext):
            try:
                return method(self, request, context)
            except PeerError as error:
                context.abort(error.code, error.message)
            except Exception as error:
                logger.exception("%s failed", what)
                context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {error}")
        return guarded

    return wrap


@contextlib.contextmanager
def stream_refusals(context: grpc.ServicerContext, what: str) -> Iterator[None]:
    """What `refusals` does, for the body of a streaming RPC: a PeerError ends the stream with its status,
    anything else with INTERNAL (logged); a client that cancelled or went away just ends it."""
    try:
        yield
    except PeerError as error:
        context.abort(error.code, error.message)
    except grpc.RpcError:
        return
    except Exception as error:
        logger.exception("%s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {error}")
