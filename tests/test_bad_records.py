"""Garbage in the DHT: values any process can store with plain hivemind must not break the swarm.

Readers check every span record (`tsotsa.records.ServerRecord.from_dht`) and drop the bad ones: routes,
`tsotsa status`, a peer choosing its span and a restarted coordinator see only the real peers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import base58
import hivemind
import pytest
from hivemind.utils import get_dht_time
from transformers import LlamaForCausalLM

from conftest import cli, swarm_fixture
from oracle import PROMPTS, encode_prompts
from tsotsa.dht import block_key
from tsotsa.records import MAX_RECORD_LIFETIME, RecordError, ServerRecord

NEW_TOKENS = 12


def fake_peer_id() -> str:
    return base58.b58encode(b"\x12\x20" + os.urandom(32)).decode()


def good_value(**changes) -> dict:
    """A record that would pass every check, so that each bad one below fails for its one reason."""
    value = {"address": "127.0.0.1:9", "start": 0, "end": 2, "state": "online", "throughput": 1e9,
             "device": "cpu", "dtype": "float32", "quant": "none", "adapters": [], "dht_addresses": []}
    return {**value, **changes}


BAD_VALUES = {
    "string start": good_value(start="0"),
    "end past the model": good_value(end=99),
    "NaN throughput": good_value(throughput=math.nan),
    "garbage multiaddr": good_value(dht_addresses=["/ip4/garbage/tcp/x"]),
    "not a dict": [1, 2, 3],
    "bare string": "online",
}


swarm = swarm_fixture(["0:2", "2:4"])


@pytest.fixture(scope="module")
def vandal(swarm):
    """A plain hivemind node (no tsotsa code) that stores the bad values under block 0's and 1's keys."""
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True)
    try:
        def store_all() -> None:
            now = get_dht_time()
            for block in (0, 1):
                key = block_key(swarm.model_id, block)
                for value in BAD_VALUES.values():
                    assert dht.store(key, value, now + 50, subkey=fake_peer_id())
                # valid fields, but an expiration no honest peer writes: it would pin a dead peer for days
                assert dht.store(key, good_value(), now + 10 ** 6, subkey=fake_peer_id())

        store_all()
        yield store_all
    finally:
        dht.shutdown()


@pytest.mark.parametrize("reason", sorted(BAD_VALUES))
def test_each_bad_value_is_refused_by_the_record_type(reason) -> None:
    with pytest.raises(RecordError):
        ServerRecord.from_dht(fake_peer_id(), BAD_VALUES[reason], get_dht_time() + 10, block=0, num_blocks=4,
                              now=get_dht_time())


def test_far_future_expiration_and_foreign_subkeys_are_refused() -> None:
    now = get_dht_time()
    with pytest.raises(RecordError, match="maximum record lifetime"):
        ServerRecord.from_dht(fake_peer_id(), good_value(), now + 10 * MAX_RECORD_LIFETIME, block=0, num_blocks=4,
                              now=now)
    for subkey in (123, "", "not base58 0OIl"):
        with pytest.raises(RecordError, match="peer id"):
            ServerRecord.from_dht(subkey, good_value(), now + 10, block=0, num_blocks=4, now=now)
    with pytest.raises(RecordError, match="stored under block"):
        ServerRecord.from_dht(fake_peer_id(), good_value(), now + 10, block=3, num_blocks=4, now=now)
    record = ServerRecord.from_dht("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", good_value(extra="new"),
                                   now + 10, block=1, num_blocks=4, now=now)
    assert (record.peer_id, record.start, record.end, record.address) == (
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", 0, 2, "127.0.0.1:9")


def test_generation_still_equals_transformers(swarm, vandal, model, tiny_model: Path) -> None:
    batch = encode_prompts(model, PROMPTS)
    produced = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
    expected = LlamaForCausalLM.from_pretrained(tiny_model).generate(**batch, max_new_tokens=NEW_TOKENS,
                                                                      do_sample=False)
    assert produced.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    assert produced.tolist() == expected.tolist()


def status(swarm, tmp_path: Path) -> dict:
    result = subprocess.run([*cli("tsotsa"), "status", "--coordinator", swarm.coordinator_address, "--json"],
                            capture_output=True, text=True, timeout=60, env={"TSOTSA_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status_peer_ids(swarm, tmp_path: Path) -> set[str]:
    return {peer["peer_id"] for peer in status(swarm, tmp_path)["peers"]}


def test_status_lists_only_the_real_peers(swarm, vandal, tmp_path: Path) -> None:
    swarm_map = status(swarm, tmp_path)
    assert {peer["peer_id"] for peer in swarm_map["peers"]} == {peer.peer_id for peer in swarm.peers}
    assert swarm_map["rejected_records"] >= len(BAD_VALUES) + 1  # each stored under two keys; counted per key


def test_a_peer_without_blocks_still_joins(swarm, vandal, tmp_path: Path) -> None:
    vandal()
    (peer,) = swarm.add_peers([None], "--num-blocks", "1")
    assert 0 <= peer.start < peer.end <= 4
    assert status_peer_ids(swarm, tmp_path) == {peer.peer_id for peer in swarm.peers}


def test_a_restarted_coordinator_comes_back(swarm, vandal, tmp_path: Path) -> None:
    vandal()
    remembered = swarm.state_dir / "known-peers.txt"
    deadline = time.monotonic() + 60
    while not remembered.exists():  # the coordinator writes its peers' addresses every few seconds
        assert time.monotonic() < deadline, "the coordinator never remembered its peers"
        time.sleep(0.5)
    swarm.kill_coordinator()
    with open(remembered, "a") as damaged:
        damaged.write("/ip4/garbage\n/ip4/127.0.0.1/tcp/notaport\n\x00\xff\n")
    swarm.start_coordinator()
    real = {peer.peer_id for peer in swarm.peers}
    deadline = time.monotonic() + 60
    while (listed := status_peer_ids(swarm, tmp_path)) != real:  # until its DHT view has caught up
        assert listed <= real, listed - real
        assert time.monotonic() < deadline, f"status lists {listed}, not {real}"
        time.sleep(1)


def test_a_peer_that_refuses_this_client_is_routed_around(swarm, model, tiny_model: Path) -> None:
    """A peer in this swarm's DHT that answers UNAUTHENTICATED (it wants a token this swarm does not use):
    its record is well formed, yet generation goes around it, and it is banned for a while."""
    (stranger,) = swarm.add_peers(["0:4"], "--token", "another-swarm's-token")
    honest = next(peer for peer in swarm.peers if (peer.start, peer.end) == (2, 4))
    try:
        # So that the first route must use the stranger: the honest 2:4 peer is left out for the first second
        # only (the call then waits for a route, `route_wait`, and finds it back).
        model.configure(ban_seconds=1.0)
        model.swarm.ban(honest.peer_id)
        model.configure(ban_seconds=60.0)
        batch = encode_prompts(model, PROMPTS)
        produced = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
        expected = LlamaForCausalLM.from_pretrained(tiny_model).generate(**batch, max_new_tokens=NEW_TOKENS,
                                                                          do_sample=False)
        assert produced.tolist() == expected.tolist()
        assert stranger.peer_id in model.swarm.banned()  # it was tried, refused, and is left out now
    finally:
        model.configure(ban_seconds=15.0)
        swarm.stop_peer(stranger)
