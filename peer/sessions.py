"""Inference sessions: each holds a KV cache for one client stream, within caps on count and bytes.

The caps are checked when a session opens, against the bytes its cache reaches at `max_length`, so a
peer refuses work with RESOURCE_EXHAUSTED instead of growing until the kernel kills it. A burst does not
fail at once: an open that finds the peer full waits in line (up to `admission_wait` seconds) for a
session to close or expire, and only then is refused, with a hint to retry; a cache that could never fit
the budget is refused at once. Sessions idle past
the timeout are reclaimed by the peer's heartbeat (`reap`), when capacity is needed, or when their own
next step finds them idle, whichever comes first; their cache is dropped, so the bytes they gave back are
really free, and their streams then get NOT_FOUND ("expired").
A session belongs to the stream that opened it: no other stream may step it, refresh it or close it, with
one exception its opener chooses: a session opened with a `link_key` may also be stepped on that client's
Link stream holding the same key (`linked`), where its decode steps travel with the client's other
sessions'. One step at a time either way (`claim`): a second, on the other stream, is refused.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import torch
from transformers import DynamicCache

from tsotsa.peer.errors import PeerError

MAX_SESSION_ID = 128
REMEMBERED_EXPIRED = 1024


@dataclass
class Session:
    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    reserved_bytes: int
    cache: DynamicCache | None                    # None once the session expired
    attention_mask: torch.Tensor                  # [batch, tokens seen so far]
    adapter: str = ""                             # the adapter the session applies ("" for the base model)
    link_key: bytes = b""                         # the key of the client's Link stream that may step it too
    last_used: float = field(default_factory=time.monotonic)
    _stepping: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def claim(self) -> None:
        """Marks a step under way (`release` ends it); FAILED_PRECONDITION while another one is: a session
        stepped on its stream and its link at once would see its cache change under it."""
        if not self._stepping.acquire(blocking=False):
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION, f"session {self.session_id} is taking a step already")

    def release(self) -> None:
        self._stepping.release()


class SessionTable:
    def __init__(self, max_sessions: int, max_cache_bytes: int, idle_timeout: float,
                 admission_wait: float = 0.0) -> None:
        self.max_sessions, self.max_cache_bytes, self.idle_timeout = max_sessions, max_cache_bytes, idle_timeout
        self.admission_wait = admission_wait
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a session closed or expired: room for a waiting open
        self.waiting = 0  # opens waiting for room now

    @property
    def open_count(self) -> int:
        return len(self._sessions)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in list(self._sessions.values()))

    def open(self, session: Session) -> None:
        if not session.session_id or len(session.session_id) > MAX_SESSION_ID:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"session id must have 1..{MAX_SESSION_ID} characters")
        if session.reserved_bytes > self.max_cache_bytes:
            raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a KV cache of {session.reserved_bytes} bytes "
                            f"does not fit: this peer's budget is {self.max_cache_bytes} bytes")
        deadline = time.monotonic() + self.admission_wait
        with self._changed:
            while True:
                self._expire_idle()
                if session.session_id in self._sessions:
                    raise PeerError(grpc.StatusCode.ALREADY_EXISTS, f"session {session.session_id} is already open")
                full = self._no_room(session)
                if full is None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waited = f"; waited {self.admission_wait:g} s in line, retry later" if self.admission_wait else ""
                    raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, full + waited)
                self.waiting += 1
                try:  # woken by a close or an expiry; idle sessions are looked at again at least every second
                    self._changed.wait(min(remaining, 1.0))
                finally:
                    self.waiting -= 1
            self._sessions[session.session_id] = session
            self._expired.pop(session.session_id, None)

    def _no_room(self, session: Session) -> str | None:
        """Why `session` cannot open now (None: it can)."""
        if len(self._sessions) >= self.max_sessions:
            return f"peer is at its limit of {self.max_sessions} concurrent sessions"
        used = self.reserved_bytes
        if used + session.reserved_bytes > self.max_cache_bytes:
            return (f"a KV cache of {session.reserved_bytes} bytes does not fit: {used} of {self.max_cache_bytes} "
                    f"bytes are in use")
        return None

    def reap(self) -> int:
        """Reclaims every session idle past the timeout; how many there were."""
        with self._lock:
            before = len(self._sessions)
            self._expire_idle()
            return before - len(self._sessions)

    def touch(self, session: Session) -> None:
        """Marks a stream's own session used, or raises NOT_FOUND if it expired in the meantime."""
        with self._lock:
            if self._is_open(session) and time.monotonic() - session.last_used > self.idle_timeout:
                self._forget(session.session_id)
            if not self._is_open(session):
                raise self._expired_error(session.session_id)
            session.last_used = time.monotonic()

    def refusal(self, session_id: str) -> PeerError:
        """Why a stream may not step `session_id`, which it did not open: another stream's, expired, or unknown.

        Looking does not refresh another stream's session, so a stranger cannot keep it from expiring.
        """
        with self._lock:
            return self._refusal(session_id, "was not opened on this stream")

    def linked(self, session_id: str, link_key: bytes) -> Session:
        """The open session `session_id`, touched, for a step on the Link stream holding `link_key`; or the
        refusal: opened without that key (FAILED_PRECONDITION, and not refreshed), expired, or unknown."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and time.monotonic() - session.last_used > self.idle_timeout:
                self._forget(session_id)
                session = None
            if session is None or not session.link_key or not hmac.compare_digest(session.link_key, link_key):
                raise self._refusal(session_id, "was not opened for this link")
            session.last_used = time.monotonic()
            return session

    def _refusal(self, session_id: str, foreign: str) -> PeerError:
        if session_id in self._sessions:
            return PeerError(grpc.StatusCode.FAILED_PRECONDITION, f"session {session_id} {foreign}")
        if session_id in self._expired:
            return self._expired_error(session_id)
        # cut short: an id of megabytes echoed back would not fit in the status's trailer
        return PeerError(grpc.StatusCode.NOT_FOUND, f"unknown session {session_id[:MAX_SESSION_ID]!r}")

    def close(self, session: Session) -> None:
        """Ends a stream's session; if it expired and its id was reopened since, the newcomer stays open."""
        with self._lock:
            if self._is_open(session):
                del self._sessions[session.session_id]
                self._changed.notify_all()

    def _is_open(self, session: Session) -> bool:
        return self._sessions.get(session.session_id) is session

    def _expired_error(self, session_id: str) -> PeerError:
        return PeerError(grpc.StatusCode.NOT_FOUND, f"session {session_id} expired after {self.idle_timeout:g} s idle")

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for session_id in [i for i, s in self._sessions.items() if now - s.last_used > self.idle_timeout]:
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        session.cache = None  # its stream may stay open for long: the bytes it gave back must be free
        self._changed.notify_all()
        self._expired[session_id] = None
        while len(self._expired) > REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)
