"""Garbage in an open swarm's DHT (no token: anyone may add a peer): what any process can try to store with
plain hivemind must not break the swarm.

Every tsotsa DHT node refuses to store (and to accept from a lookup) a record that is not owner-signed or
not a valid span record (`tsotsa.admission`, `tsotsa.records.ServerRecord.from_dht`); readers also drop a
record whose span does not cover the block it is stored under. Routes, `tsotsa status`, a peer choosing
its span and a restarted coordinator see only the real peers.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from transformers import LlamaForCausalLM

import rogue_peer
from conftest import cli, swarm_fixture
from oracle import PROMPTS, encode_prompts
from tsotsa.dht import block_key
from tsotsa.records import MAX_RECORD_LIFETIME, RecordError, ServerRecord, peer_id_of_owner

NEW_TOKENS = 12
VANDAL_KEY = RSAPrivateKey()
VANDAL_OWNER = RSASignatureValidator(VANDAL_KEY).local_public_key.decode()  # "[owner:ssh-rsa ...]"


def fake_peer_id() -> str:
    """A libp2p peer id of a key nobody holds (the subkey form records had before owner signatures)."""
    return peer_id_of_owner(RSASignatureValidator(RSAPrivateKey()).local_public_key.decode())


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
    """A plain hivemind node (no tsotsa code) that signs what it stores with a key of its own, and tries to
    store the bad values under block 0's and 1's keys: the swarm's nodes refuse every one."""
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True,
                       record_validators=[RSASignatureValidator(VANDAL_KEY)])
    try:
        def store_all() -> None:
            now = get_dht_time()
            for block in (0, 1):
                key = block_key(swarm.model_id, block)
                for reason, value in BAD_VALUES.items():
                    assert not dht.store(key, value, now + 50, subkey=fake_peer_id())  # not signed
                    # signed, not a record; a node sees only a key's hash, so a span past the model is left to
                    # its readers
                    stored = dht.store(key, value, now + 50, subkey=VANDAL_OWNER)
                    assert stored == (reason == "end past the model"), reason
                # valid fields, but an expiration no honest peer writes: it would pin a dead peer for days
                assert not dht.store(key, good_value(), now + 10 ** 6, subkey=VANDAL_OWNER)
                assert not dht.store(key, good_value(), now + 50, subkey=fake_peer_id())  # a bare peer id
            # a well-formed signed record of span 0:2 under blocks 2 and 3: stored (a node sees only a key's
            # hash), dropped by every reader of those blocks
            for block in (2, 3):
                assert dht.store(block_key(swarm.model_id, block), good_value(), now + 50, subkey=VANDAL_OWNER)

        store_all()
        yield store_all
    finally:
        dht.shutdown()


@pytest.mark.parametrize("reason", sorted(BAD_VALUES))
def test_each_bad_value_is_refused_by_the_record_type(reason) -> None:
    with pytest.raises(RecordError):
        ServerRecord.from_dht(VANDAL_OWNER, BAD_VALUES[reason], get_dht_time() + 10, block=0, num_blocks=4,
                              now=get_dht_time())


def test_far_future_expiration_and_foreign_subkeys_are_refused() -> None:
    now = get_dht_time()
    with pytest.raises(RecordError, match="maximum record lifetime"):
        ServerRecord.from_dht(VANDAL_OWNER, good_value(), now + 10 * MAX_RECORD_LIFETIME, block=0, num_blocks=4,
                              now=now)
    not_rsa = "[owner:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGz1bC0ZzKmRkXo8yXw6yFqVvZbmF8m3m2kK8xXqH0dM]"
    for subkey in (123, "", fake_peer_id(), "[owner:ssh-rsa AAAA]", not_rsa, VANDAL_OWNER + " "):
        with pytest.raises(RecordError, match="subkey"):
            ServerRecord.from_dht(subkey, good_value(), now + 10, block=0, num_blocks=4, now=now)
    with pytest.raises(RecordError, match="stored under block"):
        ServerRecord.from_dht(VANDAL_OWNER, good_value(), now + 10, block=3, num_blocks=4, now=now)
    someone_else = f"/ip4/127.0.0.1/tcp/5/p2p/{fake_peer_id()}"
    with pytest.raises(RecordError, match="not the writer's"):
        ServerRecord.from_dht(VANDAL_OWNER, good_value(dht_addresses=[someone_else]), now + 10, now=now)
    own = f"/ip4/127.0.0.1/tcp/5/p2p/{peer_id_of_owner(VANDAL_OWNER)}"
    record = ServerRecord.from_dht(VANDAL_OWNER, good_value(extra="new", dht_addresses=[own]), now + 10, block=1,
                                   num_blocks=4, now=now)
    assert (record.peer_id, record.start, record.end, record.address) == (
        peer_id_of_owner(VANDAL_OWNER), 0, 2, "127.0.0.1:9")


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
    assert swarm_map["rejected_records"] >= 2  # the mis-keyed record, counted per key it was read under


def test_a_peer_without_blocks_still_joins(swarm, vandal, tmp_path: Path) -> None:
    vandal()
    (peer,) = swarm.add_peers([None], "--num-blocks", "1", "--no-rebalance")
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
    """A peer in this swarm's DHT that answers UNAUTHENTICATED (as one whose gRPC calls want another token):
    its record is well formed and signed, yet generation goes around it, and it is banned for a while."""
    (stranger,) = swarm.add_peers(["0:4"], command=rogue_peer.command("refuse-token"))
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
