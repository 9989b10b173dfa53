"""A GQA checkpoint sharded into many files; one peer has no copy and fetches just its 2 of 8 blocks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from transformers import LlamaForCausalLM

from conftest import start_swarm
from oracle import PROMPTS, assert_greedy_matches, max_logit_difference
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def swarm(gqa_sharded_model: Path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("peer-cache")
    swarm = start_swarm(gqa_sharded_model, [], cache_dir=cache)
    try:
        swarm.add_peers(["0:2"], local_model=False)  # reads its blocks from the coordinator, into `cache`
        swarm.add_peers(["2:7", "7:8"])
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def reference(gqa_sharded_model: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(gqa_sharded_model).eval()


def test_logits_and_greedy_generation_match_transformers(model, reference) -> None:
    assert max_logit_difference(model, reference, PROMPTS) <= 1e-4
    assert_greedy_matches(model, reference, PROMPTS[:1], new_tokens=32)
    assert_greedy_matches(model, reference, PROMPTS, new_tokens=16)


def test_peer_serving_2_of_8_blocks_reads_and_holds_under_30_percent(swarm) -> None:
    peer = next(p for p in swarm.peers if (p.start, p.end) == (0, 2))
    with grpc.insecure_channel(peer.address) as channel:
        info = pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert info.checkpoint_bytes_total > 0
    assert info.checkpoint_bytes_read / info.checkpoint_bytes_total <= 0.30
    assert info.parameter_bytes_held / info.checkpoint_bytes_total <= 0.30
    cached = swarm.cache_dir / swarm.model_id
    on_disk = sum(f.stat().st_size for f in cached.glob("*.safetensors"))
    assert 0 < on_disk <= 0.30 * info.checkpoint_bytes_total
    assert sorted(f.name for f in cached.glob("*.safetensors")) == ["block-00000.safetensors",
                                                                     "block-00001.safetensors"]
