"""A bidirectional gRPC call driven one request at a time: the Inference stream of a session's hop
(tsotsa/client/session.py) and a client's Link to a peer (tsotsa/client/link.py) both send a request,
wait for its one reply within the step timeout, and end the same ways."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

import grpc

from tsotsa.client.watchdog import Watchdog
from tsotsa.rpc import tls_failure

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class StreamFailure(Exception):
    """The call failed: its status code and one line of details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class RequestStream:
    """`open(requests)` (a stub's stream-stream method) fed from a queue; `exchange` sends one request and
    returns its reply, or raises StreamFailure (a peer silent past `timeout()` seconds counts as failed:
    DEADLINE_EXCEEDED; read at each exchange, so a changed client setting holds for streams already open).
    Not for concurrent callers: one exchange at a time."""

    def __init__(self, open_call: Callable[[Iterator], Iterator], address: str, watchdog: Watchdog,
                 timeout: Callable[[], float], tls: bool) -> None:
        self.address, self.timeout, self._watchdog, self._tls = address, timeout, watchdog, tls
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = open_call(iter(self._requests.get, None))

    def exchange(self, request):
        timeout = self.timeout()
        self._requests.put(request)
        token = self._watchdog.arm(self._call, timeout)
        try:
            reply = next(self._call)
        except StopIteration:
            self._watchdog.disarm(token)
            raise StreamFailure(grpc.StatusCode.UNAVAILABLE, "peer closed the stream") from None
        except grpc.RpcError as error:
            if self._watchdog.disarm(token):
                raise StreamFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s") from None
            details = tls_failure(self.address, "peer", error, self._tls) or error.details() or ""
            raise StreamFailure(error.code(), details) from None
        self._watchdog.disarm(token)
        return reply

    def close(self) -> None:
        """Half-closes the stream: the peer finishes what it holds for it and ends the call."""
        self._requests.put(None)

    def abort(self) -> None:
        self._requests.put(None)
        self._call.cancel()
