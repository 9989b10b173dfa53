"""Two replicas per span: exact aggregation of their adapters, learning over rounds, and faults mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.training.export import read_adapter
from tsotsa.v1 import tsotsa_pb2 as pb

from conftest import start_swarm
from finetune_oracle import write_color_task

ADMIN = "admin-secret"
MICRO_BATCH = 2


@pytest.fixture(scope="module")
def swarm(tiny_model):
    swarm = start_swarm(tiny_model, ["0:2", "0:2", "2:4", "2:4"], admin_token=ADMIN)
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_color_task(tmp_path_factory.mktemp("data") / "colors.jsonl")


def config(rounds: int, steps: int, **overrides) -> pb.RunConfig:
    return pb.RunConfig(rounds=rounds, steps_per_round=steps, micro_batch=MICRO_BATCH, grad_accum=1, seq_len=64,
                        lora_r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj"], lr=1e-2, seed=3,
                        **overrides)


def replicas(checkpoint: str) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Each replica's adapter as the coordinator gathered it, with its sample count."""
    found = []
    for path in sorted((Path(checkpoint) / "replicas").glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found.append(({key: handle.get_tensor(key) for key in handle.keys()}, int(handle.metadata()["samples"])))
    return found


@pytest.fixture(scope="module")
def averaged_run(swarm, data) -> pb.RunInfo:
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("averaged", config(rounds=3, steps=6), data, data)
        list(client.watch_run("averaged"))
        return client.run("averaged")


def test_aggregated_delta_w_is_the_sample_weighted_mean_of_the_replicas(averaged_run):
    assert averaged_run.state == "finished", averaged_run.message
    for round_info in averaged_run.rounds:
        assert len(round_info.peers) == 4  # two pipelines took part
        aggregated, _ = read_adapter(Path(round_info.checkpoint))
        gathered = replicas(round_info.checkpoint)
        assert len(gathered) == 4
        for key in (k for k in aggregated if k.endswith(".lora_B.weight")):
            a_key = key.replace(".lora_B.", ".lora_A.")
            holders = [(state, samples) for state, samples in gathered if key in state]
            assert len(holders) == 2 and all(samples > 0 for _, samples in holders)
            assert sum(samples for _, samples in holders) == round_info.samples  # every sample, once, per block
            expected = sum(samples * (state[key].double() @ state[a_key].double()) for state, samples in holders)
            expected /= sum(samples for _, samples in holders)
            delta = aggregated[key].double() @ aggregated[a_key].double()
            assert ((delta - expected).norm() / expected.norm()).item() <= 1e-5
            assert not torch.equal(holders[0][0][key], holders[1][0][key])  # the replicas saw different data


def test_eval_loss_falls_over_rounds(averaged_run):
    losses = [r.eval_loss for r in averaged_run.rounds]
    assert losses[0] > losses[1] > losses[2], losses


def test_killed_replicas_cost_only_their_unfinished_micro_batches(swarm, data):
    """SIGKILL one replica mid-round (the round completes, every sample counted once); then the other replica
    of that span (the run waits and says so); a newcomer joins, gets the latest adapter, and the run ends."""
    steps = 40
    first, second = [peer for peer in swarm.peers if peer.start == 0]
    killed: list[str] = []
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("faults", config(rounds=3, steps=steps), data, None)
        waiting_message = ""
        newcomer = None
        for event in client.watch_run("faults"):
            if event.kind == "step" and event.round == 0 and not killed:
                swarm.kill_peer(first)
                killed.append(first.peer_id)
            elif event.kind == "round" and event.round == 0:
                swarm.kill_peer(second)
                killed.append(second.peer_id)
            elif event.kind == "state" and event.state == "waiting":
                waiting_message = event.message
                newcomer = swarm.add_peers(["0:2"])[0]
        info = client.run("faults")
    assert info.state == "finished", info.message
    assert "no peer serves blocks 0:2" in waiting_message
    for round_info in info.rounds:
        assert round_info.samples == steps * MICRO_BATCH  # the data dealt
        peers = [line.split() for line in round_info.peers]
        # The replicas of blocks 2:4 all survived: together they hold every sample exactly once.
        assert sum(int(samples) for _, blocks, samples in peers if blocks == "2:4") == round_info.samples
        assert 0 < sum(int(samples) for _, blocks, samples in peers if blocks == "0:2") <= round_info.samples
    round0 = [line.split()[0] for line in info.rounds[0].peers]
    assert first.peer_id not in round0 and second.peer_id in round0
    later = [line.split()[0] for r in info.rounds[1:] for line in r.peers]
    assert newcomer.peer_id in later and not set(killed) & set(later)
