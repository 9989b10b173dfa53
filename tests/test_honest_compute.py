"""Honest compute: an admitted peer that answers some decode steps wrongly is caught by spot checks
(`tsotsa.client.verify`), banned and reported, and a generation that asks for verified tokens only still
equals transformers'.

The liar is `tests/rogue_peer.py perturb`, started like any other peer: it claims 10x its throughput (so
routes prefer it) and perturbs one decode step in five once a session holds more than 12 tokens; its
prefill, cache and Forward answers stay honest. Two honest replicas of each span let a third peer decide
every disagreement, and give every hop one to be checked against.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import rogue_peer
from conftest import cli, connect, swarm_fixture
from oracle import PROMPTS, encode_prompts
from tsotsa.client.config import ClientConfig

NEW_TOKENS = 24
MAX_REQUESTS = 6

swarm = swarm_fixture(["0:2", "0:2", "2:4", "2:4"])


@pytest.fixture(scope="module")
def liar(swarm):
    (peer,) = swarm.add_peers(["0:2"], command=rogue_peer.command("perturb"))
    return peer


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model)


def expected_tokens(model, reference, prompts=PROMPTS) -> tuple[dict, list]:
    batch = encode_prompts(model, prompts)
    with torch.no_grad():
        return batch, reference.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def test_without_checks_the_liar_changes_the_tokens(swarm, liar, reference, tmp_path_factory) -> None:
    """The control: the liar is on the route and its lies change what an unchecked client gets."""
    with connect(swarm, tmp_path_factory) as model:
        batch, expected = expected_tokens(model, reference)
        produced = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
        assert produced.tolist() != expected


def test_verified_tokens_only_equal_transformers_and_the_liar_is_banned(swarm, liar, reference,
                                                                        tmp_path_factory) -> None:
    # Every hop is checked at the end only (no random checks): the liar's first lie (after LIE_AFTER tokens)
    # is then always found after tokens were built on it, so the rewind is certain. A random check could
    # catch it right at the lying step, before any token depended on it (nothing to rewind): the random
    # checks are the next test's.
    config = ClientConfig(verify_fraction=0.0, verified_only=True)
    honest = {peer.peer_id for peer in swarm.peers if peer is not liar}
    with connect(swarm, tmp_path_factory, config=config) as model:
        batch, expected = expected_tokens(model, reference)
        streamed = []
        produced, stats = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                                         on_tokens=lambda tokens: streamed.append(tokens.tolist()),
                                         return_stats=True)
        assert produced.tolist() == expected
        prompt = batch["input_ids"].shape[1]
        assert streamed == [produced[:, prompt + i].tolist() for i in range(NEW_TOKENS)]  # only verified ones
        assert stats.checks >= 3 and stats.rewound_tokens > 0
        assert liar.peer_id in model.swarm.banned()
        assert not honest & model.swarm.banned()
        # once banned, the liar is left out and the next generation needs no rewind
        produced, stats = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                                         return_stats=True)
        assert produced.tolist() == expected and stats.rewound_tokens == 0


def test_spot_checks_catch_the_liar_within_a_few_requests(swarm, liar, reference, tmp_path_factory) -> None:
    with connect(swarm, tmp_path_factory, config=ClientConfig(verify_fraction=0.2)) as model:
        batch, expected = expected_tokens(model, reference)
        for request in range(1, MAX_REQUESTS + 1):
            model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
            if liar.peer_id in model.swarm.banned():
                break
        assert liar.peer_id in model.swarm.banned(), f"not caught in {MAX_REQUESTS} requests"
        assert not {peer.peer_id for peer in swarm.peers if peer is not liar} & model.swarm.banned()
        model.configure(verify_fraction=0.0)
        produced = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
        assert produced.tolist() == expected  # the liar is out of its routes now


def test_honest_swarm_checks_pass_without_rewinds(swarm, liar, reference, tmp_path_factory) -> None:
    """Every hop checked at every step, with the liar out of the routes: no false alarm in fp32."""
    with connect(swarm, tmp_path_factory, config=ClientConfig(verify_fraction=1.0)) as model:
        model.swarm.ban(liar.peer_id, 600)
        batch, expected = expected_tokens(model, reference)
        produced, stats = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                                         return_stats=True)
        assert produced.tolist() == expected
        assert stats.rewound_tokens == 0 and stats.checks >= NEW_TOKENS
        assert model.swarm.banned() == {liar.peer_id}
        config = model.client_config
    assert replace(config, verify_fraction=0.0) != config


def test_status_shows_the_reported_liar(swarm, liar, tmp_path: Path) -> None:
    """The clients above reported what they caught; `tsotsa status` lists it (and only it)."""
    result = subprocess.run([*cli("tsotsa"), "status", "--coordinator", swarm.coordinator_address, "--json"],
                            capture_output=True, text=True, timeout=60, env={"TSOTSA_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)["reported"]
    assert [entry["peer_id"] for entry in reported] == [liar.peer_id]
    assert reported[0]["reports"] >= 2 and "differs from two other peers" in reported[0]["last_reason"]
    text = subprocess.run([*cli("tsotsa"), "status", "--coordinator", swarm.coordinator_address],
                          capture_output=True, text=True, timeout=60, env={"TSOTSA_CACHE": str(tmp_path)})
    assert f"peer {liar.peer_id} reported" in text.stdout
