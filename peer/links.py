"""Links: one stream per client on which the decode steps of all its sessions here travel together.

A client process (the HTTP API with its many requests) opens each session on its own Inference stream, as
before: the open, the prefill, a replay after a failover and the close stay per session. Its decode steps,
though, go on the client's one Link stream to this peer (tsotsa/client/link.py), as one message for every
session stepping at that moment. The peer queues all of a message's steps on the runtime at once, so they
share passes over the blocks without waiting for a batching window, and it answers them in one message:
per step, the hidden states or the refusal (one session's expired cache does not fail the others').

Who may step a session on a link: the client that opened it, proven by the `link_key` it opened the session
with and the Link stream presents (a secret per client and peer; a session id alone, which a log or a peer
in the route may see, is not enough).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.peer.batching import BatchKey, DecodeStep
from tsotsa.peer.errors import PeerError

LINK_KEY_BYTES = (16, 64)


@dataclass
class StepInputs:
    """A validated session step: its batch key, its tensors with the session's cache (`DecodeStep`: for a
    prefill too, which runs in chunks), and whether it is a decode step that may share a pass."""

    key: BatchKey
    work: DecodeStep
    decode: bool


class Links:
    """Counts the Link streams open, each holding one of the server's threads, within `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.open >= self.limit:
                raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"peer is at its limit of {self.limit} links; "
                                "step the sessions on their own streams")
            self.open += 1

    def leave(self) -> None:
        with self._lock:
            self.open -= 1


def check_link_key(key: bytes) -> bytes:
    low, high = LINK_KEY_BYTES
    if not low <= len(key) <= high:
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"link_key must have {low}..{high} bytes, not {len(key)}")
    return key


def check_linked_ids(session_ids: list[str], max_sessions: int) -> None:
    """A Link message's sessions: at least one, distinct, no more than this peer may have open."""
    if not session_ids:
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "a Link message holds no steps")
    if len(session_ids) > max_sessions:
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{len(session_ids)} steps exceed this peer's limit of {max_sessions} sessions")
    if len(set(session_ids)) != len(session_ids):
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "a Link message steps a session twice")


def refuse(result: pb.LinkedResult, error: PeerError) -> None:
    result.code, result.details = error.code.value[0], error.message
