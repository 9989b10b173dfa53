"""Swarm fine-tuning with one replica per span, judged against single-process PEFT on the same weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from tsotsa.codec import decode, encode
from tsotsa.coordinator.runs_client import RunsClient
from tsotsa.errors import SwarmError
from tsotsa.rpc import open_channel
from tsotsa.training.export import read_adapter
from tsotsa.training.lora import LoraSettings
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from conftest import cli, connect, start_swarm
from finetune_oracle import eval_loss, train_locally, write_color_task

ADMIN = "admin-secret"
STEPS, MICRO_BATCH, GRAD_ACCUM, LR, SEQ_LEN = 5, 2, 2, 1e-2, 64
SCHEDULE, WARMUP = "cosine", 1
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
    """5 rounds of one optimizer step each (every round's train loss is one step's loss), cosine-scheduled."""
    with RunsClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create("exact", run_config(lr_schedule=SCHEDULE, warmup_steps=WARMUP), data, data)
        return finish(client, "exact")


@pytest.fixture(scope="module")
def oracle(tiny_model, data):
    return train_locally(tiny_model, data, SETTINGS, steps=STEPS, micro_batch=MICRO_BATCH, grad_accum=GRAD_ACCUM,
                         lr=LR, seq_len=SEQ_LEN, warmup_steps=WARMUP)


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


def coordinator_cli(*args: str, admin: str | None = ADMIN, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TSOTSA_ADMIN_TOKEN"}
    if admin:
        env["TSOTSA_ADMIN_TOKEN"] = admin
    return subprocess.run([*cli("tsotsa-coordinator"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_the_cli_launches_follows_lists_and_exports_a_run(swarm, data, tiny_model, tmp_path):
    address = swarm.coordinator_address
    launched = coordinator_cli("finetune", "--coordinator", address, "--data", str(data), "--eval-data", str(data),
                               "--name", "cli-run", "--rounds", "2", "--steps-per-round", "2", "--micro-batch", "2",
                               "--seq-len", "64", "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--lr", "1e-2")
    assert launched.returncode == 0, launched.stderr
    lines = launched.stdout.splitlines()
    assert lines[0] == "run cli-run created: queued" or lines[0].startswith("run cli-run created")
    assert any(re.fullmatch(r"round 1 step 1/2 loss \d+\.\d+ tok/s \d+\.\d+ peers \S+", line) for line in lines), lines
    assert any(line.startswith("round 2: train loss ") and "eval loss" in line for line in lines), lines
    assert lines[-1].startswith("run cli-run finished: 2 rounds")

    listed = coordinator_cli("runs", "--coordinator", address, "--json")
    runs = {run["name"]: run for run in json.loads(listed.stdout.strip().splitlines()[-1])}
    assert runs["cli-run"]["state"] == "finished" and runs["cli-run"]["rounds_done"] == 2
    shown = json.loads(coordinator_cli("run", "cli-run", "--coordinator", address, "--json").stdout.splitlines()[-1])
    assert [r["round"] for r in shown["rounds"]] == [0, 1] and len(shown["rounds"][0]["peers"]) == 3

    exported = coordinator_cli("export", "cli-run", "--coordinator", address, "--out", str(tmp_path / "adapter"))
    assert exported.returncode == 0, exported.stderr
    merged = coordinator_cli("export", "cli-run", "--coordinator", address, "--merge", "--base", str(tiny_model),
                             "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    ids = AutoTokenizer.from_pretrained(tiny_model)("the color of sky is", return_tensors="pt").input_ids
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                     str(tmp_path / "adapter"))
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        expected, got = peft(ids).logits, plain(ids).logits
    assert (expected - got).abs().max().item() <= 1e-5
    reference = read_adapter(Path(shown["rounds"][1]["checkpoint"]))[0]
    assert all(torch.equal(tensor, read_adapter(tmp_path / "adapter")[0][key]) for key, tensor in reference.items())


def test_several_adapters_are_served_side_by_side(exact_run, swarm, tiny_model, tmp_path):
    """`tsotsa generate --adapter RUN` for two runs on the same peers, and without adapter: each as PEFT makes it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "the color of lemon is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    outputs = {}
    for adapter in ("exact", "cli-run", None):
        argv = [*cli("tsotsa"), "generate", prompt, "--coordinator", swarm.coordinator_address, "--json",
                "--max-new-tokens", "10", "--cache-dir", str(tmp_path / "cache")]
        done = subprocess.run(argv + (["--adapter", adapter] if adapter else []), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        outputs[adapter] = json.loads(done.stdout.splitlines()[-1])["output_ids"]
        base = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model = base if adapter is None else PeftModel.from_pretrained(base, checkpoint_of(swarm, adapter))
        expected = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        assert outputs[adapter] == expected.tolist()[:len(outputs[adapter])], adapter


def checkpoint_of(swarm, run: str) -> str:
    with RunsClient(swarm.coordinator_address) as client:
        return [r for r in client.get(run).rounds if r.state == "done"][-1].checkpoint


def test_cli_errors_are_one_line(swarm, tmp_path, data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    address = swarm.coordinator_address
    for args, admin, message in [
        (["--data", str(bad)], ADMIN, 'error: bad.jsonl line 2: "completion" is missing'),
        (["--data", str(data)], None, "error: "),
        (["--data", str(tmp_path / "missing.jsonl")], ADMIN, "error: "),
        (["--data", str(data), "--lora-r", "0"], ADMIN, "error: "),
        (["--data", str(data), "--target-modules", "lm_head"], ADMIN, "error: "),
        (["--data", str(data), "--lr-schedule", "step"], ADMIN, "error: unknown learning-rate schedule 'step'"),
    ]:
        done = coordinator_cli("finetune", "--coordinator", address, "--name", "refused", *args, admin=admin)
        assert done.returncode == 1 and done.stderr.startswith(message), (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_stop_ends_a_run_between_steps(swarm, data):
    address = swarm.coordinator_address
    launched = coordinator_cli("finetune", "--coordinator", address, "--data", str(data), "--name", "stopped-run",
                               "--rounds", "50", "--steps-per-round", "20", "--micro-batch", "2", "--seq-len", "64",
                               "--detach")
    assert launched.returncode == 0, launched.stderr
    stopped = coordinator_cli("stop", "stopped-run", "--coordinator", address)
    assert stopped.returncode == 0, stopped.stderr
    with RunsClient(address) as client:
        deadline = time.monotonic() + 60
        while (info := client.get("stopped-run")).state != "stopped":
            assert time.monotonic() < deadline and info.state in ("queued", "running", "stopping"), info.state
            time.sleep(0.5)
    assert info.rounds_done < 50


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


def test_a_peer_that_never_trained_serves_a_run_by_name(swarm, tiny_model):
    """`tsotsa-peer join --adapters RUN` fetches the run's latest adapter from the coordinator."""
    newcomer = swarm.add_peers(["0:4"], "--adapters", "exact,cli-run")[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("the color of coal is", return_tensors="pt").input_ids
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      checkpoint_of(swarm, "exact"))
    with torch.no_grad():
        expected = model(ids).logits
        inner = model.base_model.model
        hidden = inner.model.embed_tokens(ids)
    channel = open_channel(newcomer.address, None)
    try:
        request = pb.ForwardRequest(model_id=swarm.model_id, start_block=0, end_block=4, adapter="exact",
                                    hidden_states=encode(hidden))
        reply = pb_grpc.PeerStub(channel).Forward(request, timeout=60)
    finally:
        channel.close()
    with torch.no_grad():
        logits = inner.lm_head(inner.model.norm(decode(reply.hidden_states)))
    assert (logits - expected).abs().max().item() <= 1e-4
