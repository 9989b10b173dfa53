"""The coordinator's spot checks in training: a peer that answers TrainForward wrongly is caught, left out of
the run, and its pipeline's work is dealt again, so the round's aggregate is the sample-weighted mean of the
honest replicas only (`coordinator/spot_checks.py`, `coordinator/progress.py`).

Three peers serve the whole model (each a pipeline of its own): two honest, one liar
(`tests/rogue_peer.py perturb-training`, which adds noise to every TrainForward answer and answers Forward,
which referees use, honestly). A third peer can thus decide every disagreement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rogue_peer
from conftest import start_swarm
from finetune_oracle import write_color_task
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.errors import SwarmError
from tsotsa.training.export import read_adapter
from tsotsa.v1 import tsotsa_pb2 as pb

ADMIN = "admin-secret"
MICRO_BATCH = 2
STEPS = 6


@pytest.fixture(scope="module")
def swarm(tiny_model):
    swarm = start_swarm(tiny_model, ["0:4", "0:4"], admin_token=ADMIN)
    try:
        (liar,) = swarm.add_peers(["0:4"], command=rogue_peer.command("perturb-training"))
        yield swarm, liar
    finally:
        swarm.stop()


def config(**overrides) -> pb.RunConfig:
    return pb.RunConfig(rounds=1, steps_per_round=STEPS, micro_batch=MICRO_BATCH, grad_accum=1, seq_len=64,
                        lora_r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], lr=1e-2, seed=3,
                        **overrides)


def replicas(checkpoint: str) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    found = []
    for path in sorted((Path(checkpoint) / "replicas").glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found.append(({key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()))
    return found


@pytest.fixture(scope="module")
def checked_run(swarm, tmp_path_factory):
    swarm, liar = swarm
    data = write_color_task(tmp_path_factory.mktemp("data") / "colors.jsonl")
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("checked", config(verify_fraction=1.0), data, None)
        events = list(client.watch_run("checked"))
        return client.run("checked"), events, liar


def test_the_liar_is_caught_and_left_out(checked_run) -> None:
    run, events, liar = checked_run
    assert run.state == "finished", run.message
    caught = [event.message for event in events if liar.peer_id in event.message]
    assert caught and "differs from two other peers" in caught[0], [event.message for event in events]
    (round_info,) = run.rounds
    assert liar.peer_id not in round_info.peers and len(round_info.peers) == 2


def test_status_shows_the_caught_peer(swarm, checked_run) -> None:
    swarm, liar = swarm
    with CoordinatorClient(swarm.coordinator_address) as client:
        reported = client.swarm_status().reported
    assert [entry.peer_id for entry in reported] == [liar.peer_id]
    assert "run checked" in reported[0].last_reason


def test_the_aggregate_is_the_mean_of_the_honest_replicas(checked_run) -> None:
    run, _, liar = checked_run
    (round_info,) = run.rounds
    assert round_info.samples == STEPS * MICRO_BATCH  # the liar's units were dealt again: no sample lost
    gathered = replicas(round_info.checkpoint)
    assert len(gathered) == 2 and liar.address not in {metadata["address"] for _, metadata in gathered}
    aggregated, _ = read_adapter(Path(round_info.checkpoint))
    weights = [int(metadata["samples"]) for _, metadata in gathered]
    assert sum(weights) == round_info.samples and all(weights)
    for key in (k for k in aggregated if k.endswith(".lora_B.weight")):
        expected = sum(w * state[key].double() for (state, _), w in zip(gathered, weights)) / sum(weights)
        assert torch.allclose(aggregated[key].double(), expected, rtol=1e-6, atol=1e-9), key


def test_spot_checks_need_a_run_without_dropout(swarm, tmp_path) -> None:
    swarm, _ = swarm
    data = write_color_task(tmp_path / "colors.jsonl")
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        with pytest.raises(SwarmError, match="lora_dropout 0"):
            client.create_run("dropout", config(verify_fraction=0.5, lora_dropout=0.1), data, None)
        with pytest.raises(SwarmError, match="verify_fraction must be in"):
            client.create_run("too-much", config(verify_fraction=1.5), data, None)
