"""Swarm fine-tuning with one replica per span, judged against single-process PEFT on the same weights."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from tsotsa.coordinator.runs_client import RunsClient
from tsotsa.errors import SwarmError
from tsotsa.training.export import read_adapter
from tsotsa.training.lora import LoraSettings
from tsotsa.v1 import tsotsa_pb2 as pb

from conftest import connect, start_swarm
from finetune_oracle import eval_loss, train_locally, write_color_task

ADMIN = "admin-secret"
STEPS, MICRO_BATCH, GRAD_ACCUM, LR, SEQ_LEN = 5, 2, 2, 1e-2, 64
SETTINGS = LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"), seed=7)


@pytest.fixture(scope="module")
def swarm(tiny_model):
    swarm = start_swarm(tiny_model, ["0:1", "1:3", "3:4"], admin_token=ADMIN)
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_color_task(tmp_path_factory.mktemp("data") / "colors.jsonl")


def run_config(**overrides) -> pb.RunConfig:
    fields = dict(rounds=STEPS, steps_per_round=1, micro_batch=MICRO_BATCH, grad_accum=GRAD_ACCUM, seq_len=SEQ_LEN,
                  lora_r=SETTINGS.r, lora_alpha=SETTINGS.alpha, target_modules=list(SETTINGS.target_modules),
                  lr=LR, seed=SETTINGS.seed)
    return pb.RunConfig(**{**fields, **overrides})


def finish(client: RunsClient, name: str, timeout: float = 300.0) -> pb.RunInfo:
    """Waits (bounded) for the run to end; it must have finished."""
    deadline = time.monotonic() + timeout
    while (info := client.get(name)).state not in ("finished", "failed", "stopped"):
        assert time.monotonic() < deadline, f"run {name} still {info.state} ({info.message}) after {timeout:g} s"
        time.sleep(0.5)
    assert info.state == "finished", info.message
    return info


@pytest.fixture(scope="module")
def exact_run(swarm, data) -> pb.RunInfo:
    """5 rounds of one optimizer step each: every round's train loss is one step's loss."""
    with RunsClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create("exact", run_config(), data, data)
        return finish(client, "exact")


@pytest.fixture(scope="module")
def oracle(tiny_model, data):
    return train_locally(tiny_model, data, SETTINGS, steps=STEPS, micro_batch=MICRO_BATCH, grad_accum=GRAD_ACCUM,
                         lr=LR, seq_len=SEQ_LEN)


def test_losses_and_weights_match_single_process_peft(exact_run, oracle):
    model, local_losses = oracle
    swarm_losses = [r.train_loss for r in exact_run.rounds]
    assert len(swarm_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(swarm_losses, local_losses)) <= 1e-4, (swarm_losses, local_losses)
    assert local_losses[-1] < local_losses[0]  # it trained: the comparison is not between two idle models

    tensors, _ = read_adapter(Path(exact_run.rounds[-1].checkpoint))
    local = {name.replace(".default", ""): p.detach() for name, p in model.named_parameters() if ".lora_" in name}
    assert set(tensors) == set(local)
    worst = max((tensors[key] - local[key]).abs().max().item() for key in local)
    assert worst <= 1e-5
    assert any(local[key].abs().max() > 0 for key in local if ".lora_B." in key)


def test_exported_adapter_gives_the_reported_eval_loss(exact_run, tiny_model, data):
    last = exact_run.rounds[-1]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), last.checkpoint)
    assert abs(eval_loss(model, tiny_model, data, SEQ_LEN, MICRO_BATCH) - last.eval_loss) <= 1e-4
    assert exact_run.rounds[-1].eval_loss < exact_run.rounds[0].eval_loss


def test_generation_with_the_adapter_equals_peft_generation(exact_run, swarm, tiny_model, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer("the color of plum is", return_tensors="pt").input_ids
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      exact_run.rounds[-1].checkpoint)
    model.eval()
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with connect(swarm, tmp_path_factory) as swarm_model:
        produced = generate_when_announced(swarm_model, prompt, "exact")
    assert produced.tolist() == expected.tolist()


def generate_when_announced(swarm_model, prompt: torch.Tensor, adapter: str, timeout: float = 20.0) -> torch.Tensor:
    """Peers announce a new adapter in the DHT at once, but the DHT is eventually consistent."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return swarm_model.generate(prompt, max_new_tokens=12, adapter=adapter)
        except SwarmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_bad_data_fails_before_training_with_the_line(swarm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with RunsClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        with pytest.raises(SwarmError, match=r"bad.jsonl line 2: invalid JSON"):
            client.create("bad-data", run_config(), bad, None)
        with pytest.raises(SwarmError, match="no run named"):
            client.get("bad-data")


def test_launching_and_stopping_need_the_admin_token(swarm, data):
    for token in (None, "wrong"):
        with RunsClient(swarm.coordinator_address, admin_token=token) as client:
            with pytest.raises(SwarmError, match="admin token"):
                client.create("no-admin", run_config(), data, None)
            with pytest.raises(SwarmError, match="admin token"):
                client.stop("exact")


def test_a_run_resumes_after_the_coordinator_is_killed(swarm, data):
    """Last in this module: it kills the module's coordinator (and starts another on the same ports)."""
    with RunsClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create("resumed", run_config(rounds=4, steps_per_round=12), data, None)
        for event in client.watch("resumed"):
            if event.kind == "round":
                break
        first = client.get("resumed").rounds[0]
    swarm.kill_coordinator()
    swarm.start_coordinator()
    swarm.coordinator.wait_for(re.compile(r"resuming run resumed"))
    with RunsClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        info = finish(client, "resumed")
    assert [r.round for r in info.rounds] == [0, 1, 2, 3]
    assert (info.rounds[0].train_loss, info.rounds[0].checkpoint) == (first.train_loss, first.checkpoint)
    assert all(r.samples == 12 * MICRO_BATCH * GRAD_ACCUM for r in info.rounds)
    assert info.rounds[-1].train_loss < info.rounds[0].train_loss
