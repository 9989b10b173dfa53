"""A refused request: the gRPC status code and the message the caller gets. The peer keeps serving."""

from __future__ import annotations

import grpc


class PeerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
