"""Rebalancing: peers move to where the swarm needs blocks, and stay there.

The rule (peer/rebalance.py) on its own, then real peer processes on loopback: three peers started on the
same span of a two-span model spread out within a bounded time, no peer moves back and forth, a peer that
was left alone on a span and is killed is replaced by a move, and the swarm's greedy tokens still equal
`transformers`' through every move.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from tsotsa.local_swarm import PEER_READY, LocalSwarm, ManagedProcess
from tsotsa.records import ServerRecord, ServerState
from tsotsa.spans import SpanSpec
from tsotsa.peer.rebalance import RebalancePolicy, gives_way_to, plan_move
from tsotsa.peer.throughput import ServedThroughput
from tests.conftest import connect
from tests.oracle import PROMPTS, assert_greedy_matches

MOVED = re.compile(r"moving from blocks (\d+):(\d+) to (\d+):(\d+)")


def record(peer_id: str, start: int, end: int, throughput: float = 10.0,
           state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer_id=peer_id, address="127.0.0.1:1", start=start, end=end, state=state,
                        throughput=throughput)


def test_three_peers_on_one_span_one_moves_to_the_empty_one() -> None:
    a, b, c = record("a", 0, 2), record("b", 0, 2), record("c", 0, 2)
    move = plan_move(a, [b, c], 4, gain=1.3)
    assert move is not None and move.target == SpanSpec(2, 4)
    assert (move.uncovered_before, move.uncovered_after) == (2, 0)
    moved = replace(a, start=2, end=4)
    assert plan_move(b, [moved, c], 4, gain=1.3) is None  # both halves covered as well as they can be
    assert plan_move(moved, [b, c], 4, gain=1.3) is None


def test_a_move_needs_the_gain() -> None:
    alone = record("x", 0, 2)
    crowd = [record(name, 2, 4) for name in ("y", "z", "w")]
    move = plan_move(crowd[0], [alone, *crowd[1:]], 4, gain=1.3)  # weakest block: 10 -> 20 tok/s
    assert move is not None and move.target == SpanSpec(0, 2) and move.weakest_after == 2 * move.weakest_before
    assert plan_move(crowd[0], [alone, *crowd[1:]], 4, gain=2.5) is None
    slower = [alone, replace(crowd[1], throughput=1.0), crowd[2]]  # 11 -> 12: not worth a move at 1.3
    assert plan_move(replace(crowd[0], throughput=1.0), slower, 4, gain=1.3) is None


def test_a_peer_never_uncovers_blocks_it_serves_alone() -> None:
    lonely = record("l", 2, 4, throughput=1.0)
    assert plan_move(lonely, [record("f", 0, 2, throughput=100.0)], 4, gain=1.0) is None


def test_draining_peers_count_for_nothing_and_the_smaller_id_moves_first() -> None:
    a, b = record("a", 0, 2), record("b", 0, 2)
    leaving = record("c", 2, 4, state=ServerState.DRAINING)
    assert plan_move(a, [b, leaving], 4, gain=1.3).target == SpanSpec(2, 4)
    a_moving, b_moving = replace(a, state=ServerState.DRAINING), replace(b, state=ServerState.DRAINING)
    assert gives_way_to(b_moving, [a_moving, b_moving]) == a_moving
    assert gives_way_to(a_moving, [a_moving, b_moving]) is None
    assert gives_way_to(b_moving, [replace(a_moving, start=2, end=4)]) is None  # other blocks: no conflict


spans = st.tuples(st.integers(0, 5), st.integers(1, 3)).map(lambda t: (t[0], min(6, t[0] + t[1])))
swarms = st.lists(st.tuples(spans, st.floats(0.5, 50.0)), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(swarms, spans, st.floats(0.5, 50.0), st.floats(1.0, 2.0))
def test_a_move_always_helps_and_a_peer_that_moved_stays(others, mine, throughput, gain) -> None:
    """Hysteresis: every move removes uncovered blocks or raises the weakest block `gain` times, so moves
    cannot go round in a circle; and right after a move the mover wants to stay."""
    servers = [record(f"p{i}", start, end, rate) for i, ((start, end), rate) in enumerate(others)]
    me = record("me", *mine, throughput)
    move = plan_move(me, servers, 6, gain)
    if move is None:
        return
    assert (move.uncovered_after < move.uncovered_before
            or (move.uncovered_before == 0 and move.weakest_after >= gain * move.weakest_before))
    assert plan_move(replace(me, start=move.target.start, end=move.target.end), servers, 6, gain) is None


def test_waits_are_jittered_and_settle_after_a_move() -> None:
    import random

    policy = RebalancePolicy(period=10.0, settle=2.0)
    rng = random.Random(0)
    waits = [policy.next_wait(rng) for _ in range(100)]
    assert 5.0 <= min(waits) and max(waits) <= 15.0 and len(set(waits)) == 100
    assert all(25.0 <= policy.next_wait(rng, settling=True) <= 35.0 for _ in range(100))
    with pytest.raises(ValueError):
        RebalancePolicy(gain=0.9)


def test_served_throughput_follows_the_served_passes() -> None:
    estimate = ServedThroughput(100.0, span_blocks=4)
    for _ in range(200):
        estimate.observe(blocks=2, seconds=0.01)  # half the span in 10 ms: 50 tok/s over the whole span
    assert estimate.value == pytest.approx(50.0, rel=1e-3) and estimate.passes == 200
    estimate.observe(blocks=0, seconds=0.01)
    assert estimate.passes == 200


# ------------------------------------------------------------------ real peers

PERIOD = "2"  # mean seconds between looks: short, so that the test is short


def moves(process: ManagedProcess) -> list[tuple[SpanSpec, SpanSpec]]:
    return [(SpanSpec(int(m[1]), int(m[2])), SpanSpec(int(m[3]), int(m[4])))
            for m in map(MOVED.search, list(process.lines)) if m]


def wait_until(condition, timeout: float, what: str, processes: list[ManagedProcess]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:.0f} s:\n" + "\n\n".join(p.output() for p in processes))
        time.sleep(0.5)


def current_span(process: ManagedProcess, first: SpanSpec) -> SpanSpec:
    moved = moves(process)
    return moved[-1][1] if moved else first


def settled(process: ManagedProcess) -> bool:
    """The peer serves where its last move took it: one ready line at start and one after each move."""
    return sum(bool(PEER_READY.search(line)) for line in list(process.lines)) == 1 + len(moves(process))


def test_three_peers_on_one_span_spread_out_and_stay(tiny_model, tmp_path, tmp_path_factory) -> None:
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    with LocalSwarm(tiny_model, cache_dir=tmp_path / "cache") as swarm:
        swarm.start_coordinator()
        peers = swarm.add_peers(["0:2"] * 3, "--rebalance", "--rebalance-period", PERIOD)
        processes = [peer.process for peer in peers]
        first, second = SpanSpec(0, 2), SpanSpec(2, 4)

        def spread() -> bool:
            spans = [current_span(p, first) for p in processes]
            return second in spans and first in spans and all(map(settled, processes))

        wait_until(spread, 120, "the peers did not spread over both spans", processes)
        time.sleep(10 * float(PERIOD))  # every peer looks a few times more: nobody moves back
        history = [moves(p) for p in processes]
        assert 1 <= sum(map(len, history)) <= 2, history
        for moved in history:  # each peer moved at most once, and only from 0:2 to 2:4
            assert moved in ([], [(first, second)]), history
        with connect(swarm, tmp_path_factory) as model:
            assert_greedy_matches(model, reference, PROMPTS, new_tokens=6)

        # The peer alone on its span leaves as a crashed machine does: one of the other two moves there.
        spans = [current_span(p, first) for p in processes]
        lonely = next(i for i, s in enumerate(spans) if spans.count(s) == 1)
        swarm.kill_peer(peers[lonely])
        survivors = [p for i, p in enumerate(processes) if i != lonely]
        before = sum(len(moves(p)) for p in survivors)
        wait_until(lambda: {current_span(p, first) for p in survivors} == {first, second}
                   and all(map(settled, survivors)), 120, f"nobody moved to the uncovered {spans[lonely]}", survivors)
        assert sum(len(moves(p)) for p in survivors) == before + 1
        with connect(swarm, tmp_path_factory) as model:
            assert_greedy_matches(model, reference, PROMPTS, new_tokens=6)
