"""DHT admission: in a swarm with a token, a process without it cannot add a peer or change an admitted
peer's record, and an admitted peer cannot change another's (`tsotsa.admission`).

The intruder is plain hivemind, as an attacker on the lab network would run it: it joins the DHT (as a full
node, so it also holds records and answers lookups), reads the admitted peers' records, points them at its
own TCP listener, and stores them under its own owner-signed subkey (with a huge throughput) and over every
admitted peer's subkey (with a later expiration). None of it may reach a reader.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from transformers import LlamaForCausalLM

from conftest import cli, connect
from oracle import PROMPTS, encode_prompts
from tsotsa.admission import record_validators
from tsotsa.dht import block_key
from tsotsa.local_swarm import LocalSwarm
from tsotsa.records import MAX_RECORD_LIFETIME

TOKEN = "admission-test-token"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory):
    with LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "2:4"])
        yield swarm


class Listener:
    """A TCP listener that counts the connections it is offered (the intruder's bait address)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


class ReadTagged(RecordValidatorBase):
    """What an intruder who read tsotsa's source would use to decode records: accept everything, cut the
    signature and token tags off."""

    def validate(self, record: DHTRecord) -> bool:
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value.split(b"[signature:", 1)[0].split(b"[swarm-mac:", 1)[0]

    @property
    def priority(self) -> int:
        return 100


class SignOnly(RSASignatureValidator):
    """hivemind's owner signature on what the intruder stores, without refusing what it reads."""

    def validate(self, record: DHTRecord) -> bool:
        return True


def admitted_records(dht: hivemind.DHT, model_id: str, block: int) -> dict:
    found = dht.get(block_key(model_id, block), latest=True)
    assert found is not None, f"the intruder found no record for block {block}"
    return {subkey: item.value for subkey, item in found.value.items()}


@pytest.fixture(scope="module")
def intruder(swarm):
    listener = Listener()
    key = RSAPrivateKey()
    dht = hivemind.DHT(initial_peers=swarm.initial_peers, start=True,
                       record_validators=[ReadTagged(), SignOnly(key)])
    own = RSASignatureValidator(key).local_public_key.decode()
    try:
        later = get_dht_time() + MAX_RECORD_LIFETIME
        for block in range(4):
            for subkey, value in admitted_records(dht, swarm.model_id, block).items():
                forged = {**value, "address": listener.address, "throughput": 1e12, "dht_addresses": []}
                dht.store(block_key(swarm.model_id, block), forged, later, subkey=own)  # owner-signed, no token
                dht.store(block_key(swarm.model_id, block), forged, later, subkey=subkey)  # over a peer's own
        yield listener
    finally:
        dht.shutdown()
        listener.close()


def status(swarm, tmp_path: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {"TSOTSA_CACHE": str(tmp_path), **({"TSOTSA_TOKEN": token} if token else {})}
    return subprocess.run([*cli("tsotsa"), "status", "--coordinator", swarm.coordinator_address, "--json"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_an_intruder_without_the_token_is_never_routed_to(swarm, intruder, tiny_model, tmp_path_factory) -> None:
    with connect(swarm, tmp_path_factory, token=TOKEN) as model:
        batch = encode_prompts(model, PROMPTS)
        for _ in range(2):
            produced = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
            expected = LlamaForCausalLM.from_pretrained(tiny_model).generate(**batch, max_new_tokens=NEW_TOKENS,
                                                                              do_sample=False)
            assert produced.tolist() == expected.tolist()
        servers = model.swarm.dht.find_servers(swarm.model_id, 4)
    assert set(servers) == {peer.peer_id for peer in swarm.peers}
    assert {server.address for server in servers.values()} == {peer.address for peer in swarm.peers}
    assert intruder.connections == 0


def test_status_does_not_list_the_intruder(swarm, intruder, tmp_path: Path) -> None:
    result = status(swarm, tmp_path)
    assert result.returncode == 0, result.stderr
    peers = json.loads(result.stdout)["peers"]
    assert {(peer["peer_id"], peer["address"]) for peer in peers} == {(p.peer_id, p.address) for p in swarm.peers}
    assert intruder.connections == 0


def test_a_client_without_the_token_gets_one_line(swarm, tmp_path: Path) -> None:
    result = status(swarm, tmp_path, token=None)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "token" in lines[0]


def test_an_admitted_peer_cannot_overwrite_another_peers_record(swarm, tmp_path: Path) -> None:
    """A node that holds the token (and signs with its own key) stores over a peer's subkey: refused."""
    listener = Listener()
    reader = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, client_mode=True,
                          record_validators=[ReadTagged()])
    insider = hivemind.DHT(initial_peers=swarm.initial_peers, start=True, client_mode=True,
                           record_validators=record_validators(TOKEN, RSAPrivateKey()))
    try:
        records = admitted_records(reader, swarm.model_id, 0)
        for subkey, value in records.items():
            forged = {**value, "address": listener.address, "throughput": 1e12}
            # (the store may "succeed" on the intruder's node, which keeps anything: it only matters that
            # no tsotsa node takes it, or takes it from a lookup)
            insider.store(block_key(swarm.model_id, 0), forged, get_dht_time() + MAX_RECORD_LIFETIME, subkey=subkey)
        result = status(swarm, tmp_path)
        assert result.returncode == 0, result.stderr
        assert {peer["address"] for peer in json.loads(result.stdout)["peers"]} == {p.address for p in swarm.peers}
        assert listener.connections == 0
    finally:
        insider.shutdown()
        reader.shutdown()
        listener.close()
