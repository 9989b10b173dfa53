"""A client's concurrent requests merged on the wire (tsotsa/client/link.py, peer/links.py): the decode
steps of all its sessions on a peer travel as one Link message per hop and step, and the peer runs them as
one batch. Outputs equal transformers with the link, and logits agree with and without it (1e-5); the
peers' `tsotsa:peer_link_steps` shows messages that carried two or more sessions' steps; a peer killed
while the link carries its steps costs no request. (Peer-side batching across separate client
processes, without this merging, is tests/test_batched_serving.py.)"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import run_all, swarm_fixture
from oracle import encode_prompts
from tsotsa.metrics_server import METRICS_READY
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

CALLS = [("The swarm pools ordinary lab machines", 40), ("Once upon", 24), ("A B C D E F G", 32), ("x", 48),
         ("Every machine hosts a span of blocks", 36), ("Students", 28)]

swarm = swarm_fixture(["0:2", "2:4", "2:4"], "--metrics-port", "0")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def references(tiny_model: Path, reference) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return [reference.generate(tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=new_tokens,
                               do_sample=False)[0].tolist() for prompt, new_tokens in CALLS]


def link_messages(swarm) -> tuple[float, float]:
    """(Link messages, messages that carried one step only), over all peers (`tsotsa:peer_link_steps`)."""
    total = alone = 0.0
    for peer in swarm.peers:
        host, port = peer.process.wait_for(METRICS_READY, timeout=5).groups()[1:3]
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30).read().decode()
        family = next(f for f in text_string_to_metric_families(text) if f.name == "tsotsa:peer_link_steps")
        total += next(s.value for s in family.samples if s.name.endswith("_count"))
        alone += next(s.value for s in family.samples if s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0)
    return total, alone


def generate_all(model, on_tokens=None) -> list[list[int]]:
    def generate(index: int, call: tuple[str, int]) -> list[int]:
        prompt, new_tokens = call
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        callback = on_tokens if index == 0 else None
        return model.generate(ids, max_new_tokens=new_tokens, on_tokens=callback)[0].tolist()

    return run_all(CALLS, generate)


def test_concurrent_generations_share_link_messages_and_each_equals_transformers(swarm, model, references):
    before = link_messages(swarm)
    assert generate_all(model) == references
    total, alone = (after - earlier for after, earlier in zip(link_messages(swarm), before))
    print(f"link messages: {total:.0f}, with one step only: {alone:.0f}")
    assert total > 0 and total - alone > 0, "no Link message carried two sessions' steps"


def test_a_batched_generate_among_single_ones_through_the_link(model, reference, references):
    """`generate` with a batch (left-padded prompts, one session of two rows) keeps working while the link
    carries its steps with other calls': its rows equal transformers' batched greedy."""
    batch = encode_prompts(model, [CALLS[1][0], CALLS[4][0]])
    with torch.no_grad():
        expected = reference.generate(**batch, max_new_tokens=20, do_sample=False)

    def work(index: int, call: tuple[str, int]) -> list:
        if index == 0:
            return model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=20).tolist()
        prompt, new_tokens = call
        return model.generate(model.tokenizer(prompt, return_tensors="pt").input_ids,
                              max_new_tokens=new_tokens)[0].tolist()

    results = run_all(CALLS[:4], work)
    assert results[0] == expected.tolist()
    assert results[1:] == references[1:4]


def teacher_forced_logits(model, ids: list[int], prompt_length: int) -> torch.Tensor:
    """Logits [len(ids) - prompt_length + 1, vocab] of one session fed `ids`: the prompt, then a token a step."""
    with model.inference_session(1, len(ids)) as session:
        hidden = session.step(model.embed(torch.tensor([ids[:prompt_length]])))
        rows = [model.logits(hidden[:, -1])]
        for token in ids[prompt_length:]:
            hidden = session.step(model.embed(torch.tensor([[token]])))
            rows.append(model.logits(hidden[:, -1]))
    return torch.cat(rows)


def test_logits_with_and_without_the_link_agree(model, references, reference):
    prompt_lengths = [len(model.tokenizer(prompt).input_ids) for prompt, _ in CALLS]

    def forced(index: int, ids: list[int]) -> torch.Tensor:
        return teacher_forced_logits(model, ids, prompt_lengths[index])

    linked = run_all(references, forced)
    model.configure(link_steps=False)
    try:
        unlinked = run_all(references, forced)
    finally:
        model.configure(link_steps=True)
    for ids, length, with_link, without in zip(references, prompt_lengths, linked, unlinked):
        assert (with_link - without).abs().max().item() <= 1e-5
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0, length - 1:]
        assert (with_link - expected).abs().max().item() <= 1e-4


def test_a_peer_killed_while_the_link_carries_its_steps_loses_no_request(swarm, model, references):
    """Once the first call has five tokens, the replica of blocks 2:4 holding more sessions is SIGKILLed:
    its Link messages fail, every session on it recovers alone on the other replica, and every output still
    equals transformers."""
    replicas = [peer for peer in swarm.peers if peer.start == 2]
    killed: list = []
    seen = 0
    lock = threading.Lock()

    def kill_at_fifth(tokens: torch.Tensor) -> None:
        nonlocal seen
        with lock:
            seen += 1
            if seen != 5:
                return
            loads = []
            for peer in replicas:
                with grpc.insecure_channel(peer.address) as channel:
                    loads.append(pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=30).open_sessions)
            busiest = replicas[loads.index(max(loads))]
            swarm.kill_peer(busiest)
            killed.append((busiest, loads))

    assert generate_all(model, kill_at_fifth) == references
    assert killed and max(killed[0][1]) > 0, killed
