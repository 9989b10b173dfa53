"""Faults and the CLI's errors on a live swarm: a peer killed mid-generation, a peer draining on SIGTERM,
an uncovered block, a peer choosing its own blocks, and inference while the coordinator is down.

The tests share one swarm whose membership they change, as a lab's swarm changes; each first brings the
swarm to the membership it needs (`replicas_of_the_second_half`), so none depends on what another left.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import cli, swarm_fixture
from oracle import PROMPTS, encode_prompts
from tsotsa.client.model import SwarmModel
from tsotsa.errors import SwarmError
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

NEW_TOKENS = 24


swarm = swarm_fixture(["0:2", "2:4", "2:4"])


@pytest.fixture(scope="module")
def expected(tiny_model: Path, model: SwarmModel) -> list[list[int]]:
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    return reference.generate(**encode_prompts(model, PROMPTS), max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def replicas_of_the_second_half(swarm, count: int) -> list:
    """Makes the swarm have exactly `count` peers serving 2:4 (stopping or adding some); returns them."""
    replicas = [p for p in swarm.peers if (p.start, p.end) == (2, 4)]
    for extra in replicas[count:]:
        swarm.stop_peer(extra)
    if len(replicas) < count:
        swarm.add_peers(["2:4"] * (count - len(replicas)))
    return [p for p in swarm.peers if (p.start, p.end) == (2, 4)]


def open_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10).open_sessions


def generate_with(model: SwarmModel, after_tokens: int, action) -> list[list[int]]:
    """Greedy generation of the test prompts that calls `action()` once `after_tokens` tokens are out."""
    batch = encode_prompts(model, PROMPTS)
    count = 0

    def on_tokens(_tokens: torch.Tensor) -> None:
        nonlocal count
        count += 1
        if count == after_tokens:
            action()

    return model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                          on_tokens=on_tokens).tolist()


def test_peer_killed_mid_generation_is_replaced_and_tokens_are_unchanged(swarm, model, expected) -> None:
    replicas = replicas_of_the_second_half(swarm, 2)

    def kill_the_replica_in_use() -> None:
        victim = next(p for p in replicas if open_sessions(p.address) == 1)
        victim.process.process.send_signal(signal.SIGKILL)
        victim.process.process.wait(10)
        swarm.peers.remove(victim)
        victim.process.kill()

    assert generate_with(model, 6, kill_the_replica_in_use) == expected
    assert len([p for p in swarm.peers if (p.start, p.end) == (2, 4)]) == 1


def test_sigterm_drains_the_open_session_then_the_peer_leaves(swarm, model, expected) -> None:
    (last,) = replicas_of_the_second_half(swarm, 1)
    assert generate_with(model, 4, lambda: last.process.process.send_signal(signal.SIGTERM)) == expected
    assert last.process.process.wait(30) == 0
    assert any("left the swarm" in line for line in last.process.lines)
    swarm.peers.remove(last)


def test_uncovered_block_is_a_clear_error_in_python_and_one_line_in_the_cli(swarm, model, tmp_path) -> None:
    replicas_of_the_second_half(swarm, 0)
    # A killed peer's record may not have expired yet: the client tries it, bans it, then finds no route.
    with pytest.raises(SwarmError, match="no route covers block 2"):
        generate_with(model, 1, lambda: None)
    result = subprocess.run(
        [*cli("tsotsa"), "generate", "--coordinator", swarm.coordinator_address, "hello"],
        capture_output=True, text=True, timeout=120, env={"TSOTSA_CACHE": str(tmp_path)},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: no route covers block 2"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == "hello\n"  # the streamed text's line ends before the error line


def test_peer_without_blocks_takes_the_uncovered_span(swarm, model, expected) -> None:
    """Right after 2:4's peers went away, their records may still say online (killed peers' until they
    expire): the joining peer must not trust them, and takes 2:4."""
    replicas = replicas_of_the_second_half(swarm, 1)
    replicas[0].process.process.send_signal(signal.SIGKILL)
    swarm.kill_peer(replicas[0])
    (peer,) = swarm.add_peers([None], "--num-blocks", "2", "--no-rebalance")
    assert (peer.start, peer.end) == (2, 4)
    assert generate_with(model, 1, lambda: None) == expected


def test_frozen_peer_is_replaced_after_the_step_timeout(swarm, model, expected) -> None:
    replicas = replicas_of_the_second_half(swarm, 2)
    frozen = []

    def freeze_the_replica_in_use() -> None:
        victim = next(p for p in replicas if open_sessions(p.address) == 1)
        victim.process.process.send_signal(signal.SIGSTOP)
        frozen.append(victim)

    model.configure(step_timeout=3.0)
    try:
        assert generate_with(model, 3, freeze_the_replica_in_use) == expected
    finally:
        model.configure(step_timeout=300.0)
        for victim in frozen:
            victim.process.process.send_signal(signal.SIGCONT)
    assert frozen


def test_inference_keeps_working_while_the_coordinator_is_down(swarm, tiny_model: Path, expected) -> None:
    replicas_of_the_second_half(swarm, 1)
    swarm.coordinator.terminate()
    swarm.coordinator = None
    with SwarmModel.from_checkpoint(tiny_model, swarm.peers[0].dht_addresses) as local_head:
        assert generate_with(local_head, 1, lambda: None) == expected


def test_unreachable_coordinator_and_bad_checkpoint_are_one_readable_line(tmp_path: Path) -> None:
    commands = [
        ([*cli("tsotsa"), "generate", "--coordinator", "127.0.0.1:9", "hi"],
         "error: cannot reach coordinator at 127.0.0.1:9"),
        ([*cli("tsotsa"), "status", "--coordinator", "127.0.0.1:9"], "error: cannot reach coordinator"),
        ([*cli("tsotsa-peer"), "join", "--coordinator", "127.0.0.1:9", "--wait-timeout", "3"],
         "error: cannot reach coordinator"),
        ([*cli("tsotsa-coordinator"), "up", "--model", str(tmp_path / "nowhere"), "--port", "0"],
         "error: " + str(tmp_path / "nowhere") + ": no such checkpoint directory"),
        ([*cli("tsotsa-peer"), "join", "--coordinator", "127.0.0.1:9", "--blocks", "3"],
         "error: bad block span '3'"),
    ]
    for argv, message in commands:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                env={"TSOTSA_CACHE": str(tmp_path)})
        assert result.returncode == 1, (argv, result.stderr)
        assert result.stderr.startswith(message), (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (argv, result.stderr)
