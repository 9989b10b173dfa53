"""What clients reported about peers their spot checks caught answering wrongly, for `tsotsa status`.

Reports are claims: any caller with the swarm token may send one, so the coordinator only counts and shows
them (the client that caught a peer has banned it already); it does not ban on its own. Bounded: the
`MAX_PEERS` most recently reported peers are kept, each reason cut to `MAX_REASON` characters.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from tsotsa.v1 import tsotsa_pb2 as pb

MAX_PEERS = 256
MAX_REASON = 300


@dataclass
class _Entry:
    reports: int
    reason: str
    at: float


class PeerReports:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, peer_id: str, reason: str) -> None:
        with self._lock:
            entry = self._entries.pop(peer_id, None)
            count = entry.reports + 1 if entry else 1
            self._entries[peer_id] = _Entry(count, reason[:MAX_REASON], time.monotonic())
            while len(self._entries) > MAX_PEERS:
                self._entries.popitem(last=False)

    def listing(self) -> list[pb.ReportedPeer]:
        """Most reported first."""
        now = time.monotonic()
        with self._lock:
            items = list(self._entries.items())
        return [pb.ReportedPeer(peer_id=peer_id, reports=entry.reports, last_reason=entry.reason,
                                seconds_ago=now - entry.at)
                for peer_id, entry in sorted(items, key=lambda item: (-item[1].reports, item[1].at))]
