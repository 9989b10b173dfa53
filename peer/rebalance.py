"""When a serving peer moves to other blocks: the rule, its parameters, and how concurrent movers agree.

A swarm serves as fast as its weakest block (every token passes through every block), and a lab's swarm
drifts out of shape: machines leave for the night, three students start peers at once on the blocks that
were missing an hour ago, a machine gets slower as its owner uses it. A peer that chose its blocks itself
(no `--blocks`) therefore looks again, every `period` seconds on average, at the swarm's confirmed peers
(peer/selection.py `confirmed_servers`: a crashed machine's record counts for nothing) and moves when:

  * it would cover blocks that nobody serves, and leave none uncovered that it serves alone
    (fewer uncovered blocks after the move than before), or
  * no block is uncovered and the swarm's throughput, the coverage of its weakest block, would grow at
    least `gain` times (1.3 by default).

Where to is what a joining peer would choose (`choose_span` over the others). Hysteresis: the gain keeps a
peer from moving for a few per cent that measurement noise gives and takes back, each move raises the
weakest block's coverage by that factor, so moves cannot go round in a circle; a peer waits `settle` periods
after it joined or moved before it looks again; and waits are drawn at random from [0.5, 1.5] x period, so
that peers who started together do not all look at the same moment. Peers that still look at the same
moment (two of three on one span both wanting the empty one) each first announce themselves as draining,
wait `confirm` seconds, and look again: a peer that sees another one draining from blocks it also serves,
with a smaller peer id, gives way and stays. The mover then drains its open sessions (they finish; new
ones go elsewhere), stops serving, loads the new blocks and serves them under the same peer id and port.
A peer in a fine-tuning run does not move (the run would lose its blocks mid-round).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from tsotsa.records import ServerRecord, ServerState
from tsotsa.spans import SpanSpec
from tsotsa.peer.selection import choose_span, coverage


@dataclass(frozen=True)
class RebalancePolicy:
    period: float = 60.0   # mean seconds between two looks at the swarm
    gain: float = 1.3      # how many times the weakest block's throughput must grow for a move
    settle: float = 2.0    # periods a peer waits after joining or moving before it looks again
    confirm: float = 1.0   # seconds between announcing a move and confirming it (concurrent movers see it)

    def __post_init__(self) -> None:
        if self.period <= 0 or self.gain < 1 or self.settle < 0 or self.confirm < 0:
            raise ValueError("rebalancing needs period > 0, gain >= 1, settle >= 0 and confirm >= 0")

    def next_wait(self, rng: random.Random, settling: bool = False) -> float:
        """Seconds until the next look: after joining or a move, `settle` periods more."""
        return self.period * (rng.uniform(0.5, 1.5) + (self.settle if settling else 0.0))


@dataclass(frozen=True)
class Move:
    """A move worth making: where to, and the swarm's weakest block and uncovered blocks before and after."""

    target: SpanSpec
    weakest_before: float
    weakest_after: float
    uncovered_before: int
    uncovered_after: int

    def describe(self) -> str:
        if self.uncovered_after < self.uncovered_before:
            return f"{self.uncovered_before} blocks uncovered before, {self.uncovered_after} after"
        return (f"the weakest block would go from {self.weakest_before:.1f} to {self.weakest_after:.1f} tok/s "
                f"({self.weakest_after / self.weakest_before:.2f}x)")


def plan_move(me: ServerRecord, servers: list[ServerRecord], num_blocks: int, gain: float) -> Move | None:
    """Where `me` (an online peer's own record) should move in the swarm of `servers` (others' records;
    draining ones and `me`'s own are ignored), or None to stay."""
    others = [s for s in servers if s.peer_id != me.peer_id and s.state is not ServerState.DRAINING]
    here = replace(me, state=ServerState.ONLINE)
    target = choose_span(others, num_blocks, me.end - me.start)
    if (target.start, target.end) == (me.start, me.end):
        return None
    before = coverage([*others, here], num_blocks)
    after = coverage([*others, replace(here, start=target.start, end=target.end)], num_blocks)
    move = Move(target, min(before), min(after), before.count(0.0), after.count(0.0))
    if move.uncovered_after < move.uncovered_before:
        return move
    if move.uncovered_before == 0 and move.weakest_after >= gain * move.weakest_before:
        return move
    return None


def gives_way_to(me: ServerRecord, servers: list[ServerRecord]) -> ServerRecord | None:
    """Another peer that is draining from blocks `me` also serves and has a smaller peer id: it moves first
    (or leaves), and `me` stays. None: `me` may go on with its move."""
    for server in servers:
        if (server.peer_id != me.peer_id and server.state is ServerState.DRAINING and server.peer_id < me.peer_id
                and server.start < me.end and me.start < server.end):
            return server
    return None
