"""Many callers at once: threads sharing one `SwarmModel`, and separate clients through the same peers.

Every output must equal its single-threaded `transformers` reference: the peers keep each session's KV
cache apart, and the client keeps each call's state (route, bans, statistics) its own.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import connect, run_all, swarm_fixture

# Different prompts and lengths, so that a mixed-up cache or statistics would show.
CALLS = [("The swarm pools ordinary lab machines", 6), ("Once upon", 9), ("A B C D E F G", 12), ("x", 15)]


swarm = swarm_fixture(["0:2", "2:4"])


@pytest.fixture(scope="module")
def references(tiny_model: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    return [reference.generate(tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=new_tokens,
                               do_sample=False)[0].tolist() for prompt, new_tokens in CALLS]


def test_four_threads_through_one_model_each_get_their_own_tokens_and_stats(model, references) -> None:
    def generate(_index: int, call: tuple[str, int]):
        prompt, new_tokens = call
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        return model.generate(ids, max_new_tokens=new_tokens, return_stats=True)

    results = run_all(CALLS, generate)
    for (produced, stats), expected, (prompt, new_tokens) in zip(results, references, CALLS):
        assert produced[0].tolist() == expected
        prompt_length = len(model.tokenizer(prompt).input_ids)
        assert stats.new_tokens == len(expected) - prompt_length > 0 and stats.hops == 2
    assert len({stats.new_tokens for _, stats in results}) == len(CALLS)  # each call's own statistics


def test_threads_mixing_forward_and_generate(model, tiny_model: Path, references) -> None:
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([references[0]])
    with torch.no_grad():
        expected_logits = reference(ids).logits

    def work(index: int, call: tuple[str, int]):
        if index % 2:
            return model.forward(ids)
        prompt, new_tokens = call
        return model.generate(model.tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=new_tokens)

    results = run_all(CALLS, work)
    for index, result in enumerate(results):
        if index % 2:
            assert (result - expected_logits).abs().max().item() <= 1e-4
        else:
            assert result[0].tolist() == references[index]


def test_separate_clients_through_the_same_peers_keep_their_caches_apart(swarm, tmp_path_factory,
                                                                          references) -> None:
    clients = [connect(swarm, tmp_path_factory) for _ in range(2)]
    try:
        def generate(index: int, call: tuple[str, int]):
            client = clients[index % 2]
            prompt, new_tokens = call
            return client.generate(client.tokenizer(prompt, return_tensors="pt").input_ids,
                                   max_new_tokens=new_tokens)[0].tolist()

        assert run_all(CALLS, generate) == references
    finally:
        for client in clients:
            client.close()


def test_a_long_generation_does_not_starve_a_short_one_that_comes_later(model) -> None:
    """Fairness, the request as its unit: a 160-token generation is under way when a 4-token one starts.
    Each pass on a peer takes every session's queued step in arrival order (and prefills run in chunks
    between passes), so the short one ends a few passes later, while the long one still has most of its
    tokens to go."""
    long_ids = model.tokenizer(CALLS[0][0], return_tensors="pt").input_ids
    short_ids = model.tokenizer(CALLS[1][0], return_tensors="pt").input_ids
    steps: list[int] = []  # one entry per token step of the long generation
    under_way = threading.Event()

    def on_long(tokens: torch.Tensor) -> None:
        steps.append(tokens.shape[-1])
        if len(steps) == 8:
            under_way.set()

    long_call = threading.Thread(target=model.generate, args=(long_ids,),
                                 kwargs=dict(max_new_tokens=160, eos_token_id=-1, on_tokens=on_long))
    long_call.start()
    try:
        assert under_way.wait(120)
        short = model.generate(short_ids, max_new_tokens=4, eos_token_id=-1)
        done_meanwhile = len(steps)
        assert short.shape[1] == short_ids.shape[1] + 4
        assert long_call.is_alive() and done_meanwhile < 100, done_meanwhile
    finally:
        long_call.join(300)
    assert len(steps) == 160
