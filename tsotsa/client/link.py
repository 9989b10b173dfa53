"""A client's link to one peer: the decode steps of all its sessions there, merged into one message.

Many requests of one client process (the HTTP API's) step sessions on the same peers. Each session keeps
its own Inference stream and KV cache on the peer for what is its own (open, prefill, replay after a
failover, close: per-request recovery and spot checks stay as they are); its decode steps instead go
through the `PeerLink` of that peer, which sends every step queued at that moment as one `LinkSteps`
message on one Link stream and hands each session its row of the answer. So a hop costs one message per
step for all the client's sessions there, not one per session, and the peer gets them together, as one
batch (peer/links.py).

The link is a `tsotsa.runtime.Runtime` whose batch function is one round trip: while a message is on
the wire the next sessions' steps queue, and the next message takes them all; with `link_window`, a
message that has fewer steps than sessions used the link in the last second waits that long for the rest.
A failed link fails the steps it carried (each session then recovers alone) and is reopened by the next
step; a peer without links (UNIMPLEMENTED) or out of them (RESOURCE_EXHAUSTED at the open) is stepped on
the sessions' own streams instead (`LinkUnavailable`), for a while or for good.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence

import grpc

from tsotsa.client.streams import RequestStream, StreamFailure
from tsotsa.runtime import RecentCallers, Runtime
from tsotsa.v1 import tsotsa_pb2 as pb

KEY_BYTES = 16
RETRY_SECONDS = 30.0  # how long a peer out of links is stepped without one
MAX_LINKED = 1024  # steps of one message (a peer refuses more than its session cap; an honest client has fewer)


class LinkUnavailable(Exception):
    """This peer takes no link now: step on the session's own stream."""


class PeerLink:
    """The link of one client to the peer at `address`; `key` goes into the sessions' `OpenSession`."""

    def __init__(self, swarm, address: str) -> None:
        self.address, self._swarm = address, swarm
        self.key = secrets.token_bytes(KEY_BYTES)
        self._stream: RequestStream | None = None
        self._unavailable_until = 0.0
        self._callers = RecentCallers()
        self._runtime = Runtime(self._send, max_batch=MAX_LINKED, name=f"link-{address}",
                                window=swarm.config.link_window, expected=self._callers.count)
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._unavailable_until

    def step(self, session_id: str, step: pb.InferenceStep) -> pb.LinkedResult:
        """The session's step through the link (with the other sessions' at that moment); StreamFailure if
        the link failed, LinkUnavailable if the peer takes no link."""
        self._callers.stepped(None, session_id)
        self._runtime.window = self._swarm.config.link_window  # the client's setting now, as for timeouts
        return self._runtime.step(None, (session_id, step))

    def forget(self, session_id: str) -> None:
        """The session closed: no message waits for it."""
        self._callers.forget(None, session_id)

    def close(self) -> None:
        self._runtime.close()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def _send(self, key: None, items: Sequence[tuple[str, pb.InferenceStep]]) -> list:
        """On the link's thread: one message of `items`, one result (or exception) per item."""
        request = pb.LinkRequest(steps=pb.LinkSteps(steps=[pb.LinkedStep(session_id=session_id, step=step)
                                                           for session_id, step in items]))
        try:
            reply = self._open().exchange(request)
        except LinkUnavailable:
            return [LinkUnavailable() for _ in items]
        except StreamFailure as failure:
            self._drop()
            return [StreamFailure(failure.code, failure.details) for _ in items]
        results = list(reply.results)
        if [r.session_id for r in results] != [session_id for session_id, _ in items]:
            self._drop()
            return [StreamFailure(grpc.StatusCode.INTERNAL, "link reply does not answer the steps sent")
                    for _ in items]
        return results

    def _open(self) -> RequestStream:
        with self._lock:
            if self._stream is not None:
                return self._stream
            if not self.available:
                raise LinkUnavailable()
            swarm = self._swarm
            stream = RequestStream(swarm.stub(self.address).Link, self.address, swarm.watchdog,
                                   lambda: swarm.step_timeout, swarm.tls is not None)
            try:
                stream.exchange(pb.LinkRequest(open=pb.LinkOpen(model_id=swarm.model_id, link_key=self.key)))
            except StreamFailure as failure:
                stream.abort()
                if failure.code == grpc.StatusCode.UNIMPLEMENTED:  # a peer of an older version: for good
                    self._unavailable_until = float("inf")
                    raise LinkUnavailable() from None
                if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._unavailable_until = time.monotonic() + RETRY_SECONDS
                    raise LinkUnavailable() from None
                raise
            self._stream = stream
            return stream

    def _drop(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.abort()
                self._stream = None
