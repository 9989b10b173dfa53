"""A lab's machines boot in any order, lose power, and come back: every process starts on its own.

Each test builds its own small swarm of real processes on loopback and checks the swarm it forms against
`transformers`.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from transformers import LlamaForCausalLM

from conftest import cli, connect
from oracle import PROMPTS, encode_prompts
from tsotsa.errors import TsotsaError
from tsotsa.local_swarm import HTTP_READY, LocalSwarm, ManagedProcess
from tsotsa.state import StateDir, default_state_dir

NEW_TOKENS = 8
# A multiaddr of a node nobody runs: a closed port and a well-formed peer id.
DEAD_PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
    return LlamaForCausalLM.from_pretrained(tiny_model).generate(**batch, max_new_tokens=NEW_TOKENS,
                                                                  do_sample=False).tolist()


def generate(swarm: LocalSwarm, tmp_path_factory) -> list[list[int]]:
    with connect(swarm, tmp_path_factory) as model:
        batch = encode_prompts(model, PROMPTS)
        return model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS).tolist()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_peer_and_http_api_started_before_their_coordinator_serve_once_it_is_up(tiny_model, tmp_path_factory,
                                                                                 expected) -> None:
    from transformers import AutoTokenizer

    with LocalSwarm(tiny_model) as swarm:
        swarm.coordinator_address = f"127.0.0.1:{free_port()}"
        early = swarm.start_peer("0:4")
        api = ManagedProcess("tsotsa serve", [*cli("tsotsa"), "serve", "--coordinator", swarm.coordinator_address,
                                              "--port", "0"])
        try:
            time.sleep(10)
            for process in (early.process, api.process):
                assert process.poll() is None, early.output() + api.output()
            for process in (early, api):
                waiting = [line for line in process.lines if line.startswith("waiting for the coordinator")]
                assert waiting and all(swarm.coordinator_address in line for line in waiting), process.output()
            swarm.start_coordinator()
            swarm.wait_for_peers([early])
            assert generate(swarm, tmp_path_factory) == expected
            url = api.wait_for(HTTP_READY).group(1)
            reply = httpx.post(f"{url}/v1/completions", json={"model": swarm.model_id, "prompt": PROMPTS[0],
                                                              "max_tokens": NEW_TOKENS, "temperature": 0},
                               timeout=120)
            assert reply.status_code == 200, reply.text
            tokenizer = AutoTokenizer.from_pretrained(tiny_model)
            prompt = tokenizer(PROMPTS[0]).input_ids
            first = [token for token in expected[0] if token != tokenizer.pad_token_id]
            assert first[:len(prompt)] == prompt  # the longest prompt: the row has no padding
            assert reply.json()["choices"][0]["text"] == tokenizer.decode(first[len(prompt):],
                                                                          skip_special_tokens=True)
        finally:
            api.terminate()


def test_coordinator_whose_remembered_peers_are_all_dead_comes_up(tiny_model, tmp_path, tmp_path_factory,
                                                                  expected) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "known-peers.txt").write_text("".join(DEAD_PEER.format(port=free_port()) + "\n" for _ in range(3))
                                           + "not a multiaddr\n/ip4/garbage\n")
    with LocalSwarm(tiny_model, state_dir=state) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "2:4"])
        assert generate(swarm, tmp_path_factory) == expected


def test_a_swarm_comes_back_after_every_process_is_killed(tiny_model, tmp_path, tmp_path_factory, expected) -> None:
    """A power cut: SIGKILL for every process; the coordinator comes back first, alone, then the peers."""
    with LocalSwarm(tiny_model, state_dir=tmp_path / "state") as swarm:
        swarm.start_coordinator()
        peers = swarm.add_peers(["0:2", "2:4"])
        assert generate(swarm, tmp_path_factory) == expected
        remembered = (tmp_path / "state" / "known-peers.txt")
        deadline = time.monotonic() + 60
        while not remembered.exists():  # the coordinator writes its peers' addresses every few seconds
            assert time.monotonic() < deadline, "the coordinator never remembered its peers"
            time.sleep(0.5)
        identities = {(peer.start, peer.end): (peer.peer_id, state_dir_of(peer)) for peer in peers}
        for peer in peers:
            peer.process.process.send_signal(signal.SIGKILL)
            swarm.kill_peer(peer)
        swarm.kill_coordinator()
        swarm.start_coordinator()
        for (start, end), (peer_id, state_dir) in identities.items():  # each machine reboots with its disk
            (again,) = swarm.add_peers([f"{start}:{end}"], "--state-dir", state_dir)
            assert again.peer_id == peer_id  # one identity across restarts: the DHT key in its state directory
        assert generate(swarm, tmp_path_factory) == expected


def state_dir_of(peer) -> str:
    argv = peer.process.argv
    return argv[argv.index("--state-dir") + 1]


def test_one_state_directory_serves_one_process(tmp_path) -> None:
    held = StateDir(tmp_path / "state", "coordinator")
    try:
        with pytest.raises(TsotsaError, match="another coordinator on this machine uses the state directory"):
            StateDir(tmp_path / "state", "coordinator")
    finally:
        held.release()
    StateDir(tmp_path / "state", "coordinator").release()  # free again once the holder is gone
    assert default_state_dir("coordinator", "llama-a") != default_state_dir("coordinator", "llama-b")


def test_a_peer_killed_with_sigkill_leaves_no_process_behind(tiny_model) -> None:
    """The OOM killer or `kill -9` ends the peer's own process only: its DHT node (a forked child) and that
    node's p2pd must not live on, holding the DHT port and memory, until the machine reboots."""
    import os

    import psutil

    def ended(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE  # dead, its parent not yet told
        except psutil.NoSuchProcess:
            return True

    with LocalSwarm(tiny_model) as swarm:
        swarm.start_coordinator()
        (peer,) = swarm.add_peers(["0:4"])
        descendants = psutil.Process(peer.process.pid).children(recursive=True)
        assert any("p2pd" in " ".join(p.cmdline()) for p in descendants), [p.cmdline() for p in descendants]
        os.kill(peer.process.pid, signal.SIGKILL)  # the peer's process alone, not its process group
        deadline = time.monotonic() + 60
        while not all(map(ended, descendants)):
            assert time.monotonic() < deadline, [p.cmdline() for p in descendants if not ended(p)]
            time.sleep(0.5)
