"""Which callers a peer trains for: only the coordinator, proven by a run credential on every training call.

The swarm token admits a caller to inference; the training RPCs (open, set/get adapter, forward, backward,
step, discard, close) also need the coordinator's signed credential for the run they name
(`tsotsa.run_credentials`). The coordinator's public key comes with `ModelInfo` when the peer joins; a
credential signed by another key makes the peer ask the coordinator again (at most every
`REFRESH_INTERVAL` seconds), so a coordinator that lost its state directory and made a new key is followed
without restarting its peers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from tsotsa.run_credentials import METADATA_KEY, CredentialError, ForeignSignature, RunVerifier
from tsotsa.peer.errors import PeerError

REFRESH_INTERVAL = 30.0


class CoordinatorOnly:
    """Admits a training call when it carries a valid credential for its run; PERMISSION_DENIED if not."""

    def __init__(self, model_id: str, public_key: bytes, fetch_key: Callable[[], bytes] | None = None) -> None:
        """`fetch_key`: asks the coordinator for its current key (None: the first one is kept for good)."""
        self.model_id, self._fetch_key = model_id, fetch_key
        self._lock = threading.Lock()
        self._verifier = self._load(public_key)
        self._refreshed = time.monotonic()

    @staticmethod
    def _load(public_key: bytes) -> RunVerifier | None:
        try:
            return RunVerifier(public_key)
        except CredentialError:
            return None  # a coordinator without a key (older version): no training calls until it has one

    def check(self, context: grpc.ServicerContext, run: str) -> None:
        presented = dict(context.invocation_metadata() or ()).get(METADATA_KEY)
        try:
            try:
                self._verify(presented, run)
            except ForeignSignature:
                if not self._refresh():
                    raise
                self._verify(presented, run)
        except CredentialError as error:
            raise PeerError(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None

    def _verify(self, presented: bytes | None, run: str) -> None:
        verifier = self._verifier
        if verifier is None:
            raise CredentialError("the coordinator announced no run-signing key: training calls are refused")
        verifier.check(presented, self.model_id, run)

    def _refresh(self) -> bool:
        """Fetches the coordinator's key again unless done lately; whether it changed."""
        with self._lock:
            if self._fetch_key is None or time.monotonic() - self._refreshed < REFRESH_INTERVAL:
                return False
            self._refreshed = time.monotonic()
            try:
                fresh = self._load(self._fetch_key())
            except Exception:  # the coordinator is away: keep the key we have
                return False
            if fresh is None:
                return False
            self._verifier = fresh
            return True
