"""QLoRA: LoRA adapters trained on NF4-quantized blocks (bitsandbytes Linear4bit) on CPU peers."""

from __future__ import annotations

import pytest

from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.v1 import tsotsa_pb2 as pb

from conftest import start_swarm
from finetune_oracle import write_color_task

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def swarm(tiny_model):
    swarm = start_swarm(tiny_model, ["0:2", "2:4"], "--quant", "nf4", admin_token=ADMIN)
    yield swarm
    swarm.stop()


def test_qlora_on_nf4_peers_learns(swarm, tmp_path):
    data = write_color_task(tmp_path / "colors.jsonl")
    config = pb.RunConfig(rounds=3, steps_per_round=6, micro_batch=4, grad_accum=1, seq_len=64, lora_r=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lr=2e-2, seed=5,
                          gradient_checkpointing=True)
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("qlora", config, data, data)
        list(client.watch_run("qlora"))
        info = client.run("qlora")
    assert info.state == "finished", info.message
    losses = [r.eval_loss for r in info.rounds]
    assert losses[0] > losses[1] > losses[2], losses
    assert all(r.samples == 6 * 4 for r in info.rounds)
