"""One round's progress: the units done, by which peers, and what voids some of them.

A unit (grad_accum micro-batches and one optimizer step) is counted once its pipeline stepped on it. When a
spot check catches a liar (`coordinator/spot_checks.py`), every unit it took part in is void, and with it
every peer that shared such a unit (their adapters hold updates built on its answers), transitively: those
units are dealt again, and those peers start again from the round's adapter. Totals (samples, tokens, the
peers whose adapters are gathered, the samples each was dealt) are computed from the units that stand.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tsotsa.records import ServerRecord


@dataclass(eq=False)
class UnitDone:
    unit: list[int]
    peers: tuple[ServerRecord, ...]
    samples: int
    tokens: int
    wire: int
    losses: list[float]


@dataclass
class RoundProgress:
    done: list[UnitDone] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # peers that failed this round: not used again in it
    # Peers whose work since their last adapter push is void (they worked with a liar): until the next
    # pipelines are formed, when they get the round's adapter again, nothing they do counts.
    tainted: set[str] = field(default_factory=set)
    began: float = field(default_factory=time.perf_counter)

    @property
    def units_done(self) -> int:
        return len(self.done)

    @property
    def samples(self) -> int:
        return sum(unit.samples for unit in self.done)

    @property
    def tokens(self) -> int:
        return sum(unit.tokens for unit in self.done)

    @property
    def wire_bytes(self) -> int:
        return sum(unit.wire for unit in self.done)

    @property
    def losses(self) -> list[float]:
        return [loss for unit in self.done for loss in unit.losses]

    @property
    def trained(self) -> dict[str, ServerRecord]:
        """Peers whose adapters hold this round's work."""
        return {peer.peer_id: peer for unit in self.done for peer in unit.peers}

    @property
    def dealt(self) -> dict[str, int]:
        """Peer id -> samples this coordinator had it step on (what its replica weighs in aggregation)."""
        counts: dict[str, int] = {}
        for unit in self.done:
            for peer in unit.peers:
                counts[peer.peer_id] = counts.get(peer.peer_id, 0) + unit.samples
        return counts

    def void(self, liars: Iterable[str]) -> tuple[set[str], list[list[int]]]:
        """Voids the units `liars` took part in, and transitively those of every peer that shared one: the
        peers whose adapters no longer count, and the units to deal again."""
        tainted = set(liars)
        while True:
            voided = [unit for unit in self.done if any(peer.peer_id in tainted for peer in unit.peers)]
            grown = tainted | {peer.peer_id for unit in voided for peer in unit.peers}
            if grown == tainted:
                break
            tainted = grown
        self.done = [unit for unit in self.done if unit not in voided]
        self.tainted |= tainted
        return tainted, [unit.unit for unit in voided]
