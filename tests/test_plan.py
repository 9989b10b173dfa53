"""`tsotsa plan`: its numbers against values worked out by hand, and against what real peers hold.

Llama-2's sizes are computed here from the published shapes, written out, not with the code under test.
The bytes a block takes are then checked against what a peer serving it reports (`PeerInfo.
parameter_bytes_held`) and, for what torch does not count as parameters (the NF4 absmax and code tables,
int8 row scales), against bitsandbytes' own quantization state in a `BlockSpan` built from the same
checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import cli, start_swarm
from tsotsa.checkpoint import HEAD_PREFIXES, load_config
from tsotsa.cli import app
from tsotsa.peer.throughput import measure_throughput
from tsotsa.plan import (block_bytes, estimated_block_bytes, load_model_config, peer_blocks,
                         plan_swarm, span_buffer_bytes)
from tsotsa.peer.selection import SESSION_TOKENS, blocks_that_fit, default_cache_bytes, default_max_sessions
from tsotsa.spans import BlockSpan, SpanSpec
from tsotsa.tiny_model import make_tiny_model
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

GiB = 1 << 30

# Llama-2-7B: hidden 4096, intermediate 11008, 32 heads = 32 KV heads of 128, vocab 32000; fp16 checkpoint.
WEIGHTS_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008          # q, k, v, o + gate, up, down = 202,375,168
assert WEIGHTS_7B == 202_375_168
NF4_PACKED_7B = WEIGHTS_7B // 2                          # two 4-bit codes per byte
NF4_STATS_7B = WEIGHTS_7B // 64 * 4 + 7 * 16 * 4          # a float32 absmax per 64 weights, a 16-entry code per layer
NORMS_7B_FP16 = 2 * 4096 * 2
HEAD_7B = (2 * 32000 * 4096 + 4096) * 2                   # embeddings, LM head, final norm in fp16
KV_7B_FP16_4096 = 2 * 32 * 32 * 128 * 4096 * 2            # 2 x layers x kv heads x head dim x tokens x bytes


def test_llama_2_7b_nf4_numbers_equal_the_hand_computed_ones() -> None:
    result = subprocess.run([*cli("tsotsa"), "plan", "--model", "llama-2-7b", "--quant", "nf4", "--dtype", "float16",
                             "--max-length", "4096", "--machines", "8x16GiB,2x24GiB", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["block"] == {"weights": NF4_PACKED_7B, "statistics": NF4_STATS_7B, "norms": NORMS_7B_FP16,
                             "biases": 0}
    assert plan["block_bytes"] == 101_187_584 + 12_648_896 + 16_384
    assert plan["head_bytes"] == HEAD_7B == 524_296_192
    assert plan["kv_bytes_per_session"] == KV_7B_FP16_4096 == 2 * GiB
    assert plan["blocks"] == 32 and plan["machines_needed"] == 1  # a 24 GiB machine takes all 32 NF4 blocks


def test_llama_2_70b_gqa_spans_are_the_ones_joining_peers_pick() -> None:
    """70B has 8 KV heads for 64 query heads: k and v are 1024 wide. The spans: a 24 GiB machine, 1 GiB
    reserved, gives a peer 23 GiB x 0.6 = 13.8 GiB, of which its default KV budget takes a fifth (2826 MiB),
    leaving 11.85e9 bytes for blocks it estimates at 855,654,400 parameters x 0.5625 bytes = 481.3e6 each:
    24 blocks; a 16 GiB one 16 (next to 1843 MiB). Joining largest first, each takes the first uncovered
    window."""
    plan = plan_swarm("llama-2-70b", "nf4", torch.bfloat16, [16 * GiB] * 8 + [24 * GiB] * 2).as_json()
    weights = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672
    assert plan["block"]["weights"] == weights // 2
    assert plan["block"]["statistics"] == weights // 64 * 4 + 7 * 64
    assert plan["kv_bytes_per_session"] == 2 * 80 * 8 * 128 * 4096 * 2
    spans = [(m["start"], m["end"]) for m in plan["machines"] if m["needed"]]
    assert spans == [(0, 24), (24, 48), (48, 64), (64, 80)]
    assert [m["replica"] for m in plan["machines"]] == [False] * 4 + [True] * 6
    assert [m["cache_bytes"] >> 20 for m in plan["machines"]] == [2826] * 2 + [1843] * 8


def test_a_planned_peer_takes_as_many_blocks_as_the_peer_itself_would() -> None:
    """The peer's own rule (blocks_that_fit, which reads this machine's free memory) against the plan's on
    the same amount; free memory moves between the two reads, so the plan is taken either side of it."""
    from tsotsa.peer.service import PeerLimits

    assert PeerLimits().max_cache_bytes is None  # the budget a peer reserves unless told: from its memory
    _, config = load_model_config("llama-2-70b")
    for quant, dtype in (("nf4", torch.bfloat16), ("int8", torch.float16), ("none", torch.float16)):
        before = psutil.virtual_memory().available
        actual = blocks_that_fit(config, quant, dtype, "cpu", 512 << 20)
        after = psutil.virtual_memory().available
        planned = {peer_blocks(config, quant, dtype, free, 512 << 20) for free in (before, after)}
        assert max(actual, 1) in {max(p, 1) for p in planned}, (quant, actual, planned)


@pytest.mark.parametrize("model, sessions", [("llama-2-7b", 8), ("llama-2-13b", 3), ("llama-2-70b", 40)])
def test_machines_that_must_hold_n_sessions_get_the_budget_and_blocks_that_fit_both(model, sessions) -> None:
    """With --sessions, each machine's KV budget holds N sessions over its blocks, its blocks and that budget
    fit in the peer's share of memory, one more block would not, and where the peer would pick another
    number of blocks next to that budget, the plan tells it how many (--num-blocks)."""
    _, config = load_model_config(model)
    memories = [24 * GiB, 16 * GiB, 12 * GiB]
    plan = plan_swarm(model, "nf4", torch.bfloat16, memories * 3, max_length=2048, sessions=sessions)
    session = 2048 * plan.kv_bytes_per_token_per_block
    estimate = estimated_block_bytes(config, "nf4", torch.bfloat16)
    for machine in plan.machines:
        free = (machine.memory - GiB) * 0.6
        assert machine.sessions >= sessions and machine.cache_bytes >= sessions * session * machine.blocks
        assert machine.blocks * estimate + machine.cache_bytes <= free
        one_more = machine.blocks + 1  # with the budget it would need, rounded up to MiB as --cache-mib is
        assert machine.blocks == config.num_hidden_layers or (
            one_more * estimate + max(machine.default_cache_bytes, math.ceil(sessions * session * one_more / (1 << 20)) << 20) > free)
        own_pick = peer_blocks(config, "nf4", torch.bfloat16, machine.memory - GiB, machine.cache_bytes)
        assert machine.num_blocks == (None if own_pick == machine.blocks else machine.blocks)
    if model != "llama-2-7b":  # the branch where the peer must be told how many blocks is exercised
        assert any(m.num_blocks for m in plan.machines)


@pytest.mark.parametrize("args, message", [
    (["--machines", "8x16"], "bad --machines entry '8x16'"),
    (["--machines", "eight"], "bad --machines entry 'eight'"),
    (["--machines", "0x16GiB"], "at least 1"),
    (["--model", "llama-2-700b"], "not a checkpoint directory, a config.json or a known model"),
    (["--quant", "fp4"], "unknown --quant 'fp4'"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
    (["--model", "llama-2-70b", "--machines", "3x16GiB"],
     "hold 48 of llama-2-70b's 80 blocks (nf4, float32): the other 32 need about"),
])
def test_bad_input_is_one_line(args, message) -> None:
    base = {"--model": "llama-2-7b", "--machines": "2x16GiB", "--quant": "nf4"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = CliRunner().invoke(app, ["plan", *[part for pair in base.items() for part in pair]])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_too_small_a_swarm_is_told_how_much_more_it_needs() -> None:
    """3 x 16 GiB hold 3 x 16 = 48 of 70B's blocks; 32 more need a machine where a peer would take 32 next
    to its default KV budget (a fifth of its share): 1 GiB + 32 x 855,654,400 x 0.5625 / (0.6 x 0.8) =
    30.88 GiB, or 2 more 16 GiB machines; and a plan with that machine holds them all."""
    with pytest.raises(ValueError, match=r"about 30\.88 GiB more memory .* or 2 more like the largest \(16\.00 GiB\)"):
        plan_swarm("llama-2-70b", "nf4", torch.float32, [16 * GiB] * 3)
    assert plan_swarm("llama-2-70b", "nf4", torch.float32, [16 * GiB] * 3 + [int(30.9 * GiB)]).blocks == 80


# ----------------------------------------------------------------------- against what real peers hold

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Hidden 128 (bitsandbytes quantizes every projection), grouped-query attention (4 heads, 2 KV heads)."""
    return make_tiny_model(tmp_path_factory.mktemp("plan") / "model", layers=4, hidden=128, heads=4, kv_heads=2,
                           intermediate=320, vocab=512, seed=3)


def info_of(address: str) -> pb.PeerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10)


def held_by_peer(address: str) -> int:
    return info_of(address).parameter_bytes_held


def test_bytes_per_block_times_blocks_is_what_peers_hold(checkpoint, tmp_path_factory) -> None:
    """An NF4 peer serving 2 blocks and an fp32 peer serving all 4, started as real processes: each holds the
    plan's bytes per block (weights and bitsandbytes' statistics, as a CPU peer keeps them after its first
    forward) times its blocks, plus its span's rotary tables, to the byte."""
    plan = json.loads(CliRunner().invoke(app, ["plan", "--model", str(checkpoint), "--quant", "nf4", "--device",
                                               "cpu", "--machines", "1x16GiB", "--json"]).stdout)
    config = load_config(checkpoint)
    swarm = start_swarm(checkpoint, [], cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        nf4, fp32 = swarm.wait_for_peers([swarm.start_peer("1:3", "--quant", "nf4"), swarm.start_peer("0:4")])
        assert held_by_peer(nf4.address) == 2 * plan["block_bytes"] + plan["span_buffer_bytes"]
        dense = block_bytes(config, "none", torch.float32)
        assert held_by_peer(fp32.address) == 4 * dense.total + span_buffer_bytes(config)
        # no --cache-mib, no --max-sessions: both from the memory free when the peer started (which moves)
        info, free = info_of(fp32.address), psutil.virtual_memory().available
        assert default_cache_bytes(free * 0.7) <= info.cache_bytes_limit <= default_cache_bytes(free * 1.4)
        session = 4 * min(SESSION_TOKENS, config.max_position_embeddings) * plan["kv_bytes_per_token_per_block"]
        assert info.max_sessions == default_max_sessions(info.cache_bytes_limit, session)
    finally:
        swarm.stop()
    assert plan["block_bytes"] == plan["block_parameter_bytes"] + plan["block"]["statistics"] > 0


@pytest.mark.parametrize("quant, dtype", [("nf4", torch.float32), ("nf4", torch.bfloat16), ("int8", torch.float32),
                                          ("none", torch.bfloat16)])
def test_quantization_statistics_are_what_bitsandbytes_keeps(checkpoint, quant, dtype) -> None:
    """The NF4 absmax and code tables and the int8 row scales live beside the weights, not among torch's
    parameters: counted here from the quantized layers of a real span, as quantized (what a CUDA peer keeps)
    and after a first forward on the CPU (bitsandbytes then repacks NF4 absmax to bfloat16)."""
    config = load_config(checkpoint)
    span = BlockSpan(config, SpanSpec(0, 4), load_file(checkpoint / "model.safetensors"), dtype=dtype, quant=quant)
    expected = block_bytes(config, quant, dtype, "cuda")
    statistics = weights = 0
    for module in span.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() == 1:  # the norms
            continue
        weights += weight.numel() * weight.element_size()
        if quant == "nf4":
            state = weight.quant_state
            statistics += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
        elif quant == "int8":
            statistics += weight.SCB.numel() * weight.SCB.element_size()
    assert (weights, statistics) == (4 * expected.weights, 4 * expected.statistics)
    assert span.parameter_bytes == 4 * expected.total + span_buffer_bytes(config)
    measure_throughput(span)  # the peer's first forward
    assert span.parameter_bytes == 4 * block_bytes(config, quant, dtype, "cpu").total + span_buffer_bytes(config)
    per_token = json.loads(CliRunner().invoke(app, ["plan", "--model", str(checkpoint / "config.json"), "--quant",
                                                    quant, "--dtype", str(dtype).removeprefix("torch."),
                                                    "--machines", "16GiB", "--json"]).stdout)
    assert span.cache_bytes(1, 100) == 4 * 100 * per_token["kv_bytes_per_token_per_block"]


def test_head_bytes_are_the_checkpoints_head_tensors(checkpoint) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    held = sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith(HEAD_PREFIXES))
    assert held > 0
    assert plan_swarm(str(checkpoint), "nf4", torch.float32, [16 * GiB]).head_bytes == held
