"""An Inference (or Link) stream held open between requests, for tests that talk to a peer directly."""

from __future__ import annotations

import queue

import grpc

from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc


class Stream:
    """A stream of the peer's `rpc` (Inference or Link) held open between requests, so a test can interleave
    other calls with it."""

    def __init__(self, stub: pb_grpc.PeerStub, timeout: float = 30.0, rpc: str = "Inference") -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = getattr(stub, rpc)(iter(self._requests.get, None), timeout=timeout)

    def send(self, request: pb.InferenceRequest | pb.LinkRequest) -> pb.InferenceResponse | pb.LinkResponse:
        self._requests.put(request)
        return next(self._call)

    def close(self) -> None:
        """Half-closes and waits for the end of the stream, so the peer has released the session."""
        self._requests.put(None)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # the test already checked how this stream ended

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
