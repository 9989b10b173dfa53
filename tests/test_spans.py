"""Block spans, routing and block selection, in one process (no swarm needed)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaForCausalLM

from tsotsa.checkpoint import Checkpoint, block_prefix
from tsotsa.client.routing import plan_route
from tsotsa.client.session import Failures
from tsotsa.client.swarm import Swarm
from tsotsa.codec import WireError, decode, encode
from tsotsa.records import ServerRecord, ServerState
from tsotsa.errors import SwarmError
from tsotsa.peer.selection import choose_span
from tsotsa.spans import BlockSpan, SpanSpec, position_ids_from_mask


def _span(checkpoint: Checkpoint, start: int, end: int, **kwargs) -> BlockSpan:
    tensors = checkpoint.read_prefixes([block_prefix(i) for i in range(start, end)])
    return BlockSpan(checkpoint.config, SpanSpec(start, end), tensors, **kwargs)


def test_spans_with_and_without_cache_match_transformers_hidden_states(gqa_sharded_model: Path) -> None:
    checkpoint = Checkpoint.open(gqa_sharded_model)
    reference = LlamaForCausalLM.from_pretrained(gqa_sharded_model)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [1, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    spans = [_span(checkpoint, 0, 2), _span(checkpoint, 2, 8)]
    embeddings = reference.model.embed_tokens(ids).detach()
    positions = position_ids_from_mask(mask)
    uncached = spans[0](embeddings, mask, positions, None, 0, 2)
    uncached = spans[1](uncached, mask, positions, None, 2, 3)  # a sub-span of the second span
    assert (uncached - expected)[mask.bool()].abs().max() < 1e-5

    caches = [span.new_cache() for span in spans]
    outputs = []
    for begin, end in [(0, 4), (4, 5), (5, 6)]:
        hidden = embeddings[:, begin:end]
        hidden = spans[0](hidden, mask[:, :end], positions[:, begin:end], caches[0], 0, 2)
        outputs.append(spans[1](hidden, mask[:, :end], positions[:, begin:end], caches[1], 2, 3))
    assert (torch.cat(outputs, 1) - expected)[mask.bool()].abs().max() < 1e-5


def test_span_outside_model_is_refused(tiny_model: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model)
    with pytest.raises(ValueError, match="outside"):
        BlockSpan(checkpoint.config, SpanSpec(2, 6), {})


def test_codec_round_trip_and_validation() -> None:
    tensor = torch.randn(2, 3, 4)
    assert torch.equal(decode(encode(tensor)), tensor)
    assert torch.equal(decode(encode(tensor, compress=True)), tensor)
    assert decode(encode(tensor, torch.bfloat16)).dtype == torch.bfloat16
    mask = torch.tensor([[True, False]])
    assert torch.equal(decode(encode(mask)), mask)
    message = encode(tensor)
    message.data = message.data[:-1]
    with pytest.raises(WireError, match="bytes"):
        decode(message)
    with pytest.raises(WireError, match="last dimension"):
        decode(encode(tensor), last_dim=5)


def _server(name: str, start: int, end: int, throughput: float, state: str = "online") -> ServerRecord:
    return ServerRecord(peer_id=name, address=f"{name}:1", start=start, end=end, state=ServerState(state),
                        throughput=throughput)


def test_route_prefers_fast_peers_and_fewer_hops() -> None:
    servers = [_server("a", 0, 4, 100.0), _server("b", 0, 2, 10.0), _server("c", 2, 4, 10.0),
               _server("d", 0, 4, 1000.0, state="draining")]
    route = plan_route(servers, 0, 4)
    assert [(hop.server.peer_id, hop.start, hop.end) for hop in route] == [("a", 0, 4)]
    route = plan_route(servers, 0, 4, exclude=frozenset({"a"}))
    assert [(hop.server.peer_id, hop.start, hop.end) for hop in route] == [("b", 0, 2), ("c", 2, 4)]
    route = plan_route([_server("a", 0, 3, 10.0), _server("b", 2, 4, 10.0)], 0, 4)
    assert [(hop.start, hop.end) for hop in route] in ([(0, 2), (2, 4)], [(0, 3), (3, 4)])
    with pytest.raises(SwarmError, match="no route covers block 2"):
        plan_route([_server("a", 0, 2, 10.0), _server("b", 3, 4, 10.0)], 0, 4)


def test_block_selection_fills_the_weakest_span() -> None:
    assert choose_span([], 8, 3) == SpanSpec(0, 3)
    servers = [_server("a", 0, 4, 50.0)]
    assert choose_span(servers, 8, 4) == SpanSpec(4, 8)
    servers.append(_server("b", 4, 6, 50.0, state="joining"))
    assert choose_span(servers, 8, 2) == SpanSpec(6, 8)
    servers.append(_server("c", 6, 8, 80.0))
    # b, still joining, counts as the median online peer (80 tok/s): blocks 0:4 at 50 tok/s are now weakest.
    assert choose_span(servers, 8, 2) == SpanSpec(0, 2)


def test_failure_rules_ban_dead_and_foreign_peers_but_not_busy_ones() -> None:
    swarm = Swarm(dht=None, model_id="m", num_blocks=4)  # the rules need no DHT: nothing is looked up here
    failures = Failures(swarm)
    failures.note("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "peer busy: RESOURCE_EXHAUSTED: no\\nslot")
    failures.note("dead", grpc.StatusCode.UNAVAILABLE, "peer dead: UNAVAILABLE")
    failures.note("foreign", grpc.StatusCode.UNAUTHENTICATED, "peer foreign: UNAUTHENTICATED")
    failures.note("other model", grpc.StatusCode.FAILED_PRECONDITION, "peer of another model")
    assert failures.banned == {"busy", "dead", "foreign", "other model"}  # this call avoids all four
    assert swarm.banned() == {"dead", "foreign", "other model"}  # other calls may still use the busy one
    with pytest.raises(SwarmError, match="bad request"):
        failures.note("any", grpc.StatusCode.INVALID_ARGUMENT, "bad request")  # the caller's mistake: fatal
    for _ in range(swarm.config.max_failures - failures.count):
        failures.note("again", grpc.StatusCode.UNAVAILABLE, "again")
    with pytest.raises(SwarmError, match="giving up after 8 peer failures"):
        failures.note("last", grpc.StatusCode.UNAVAILABLE, "last")
