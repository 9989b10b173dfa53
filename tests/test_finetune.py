"""Swarm fine-tuning with one replica per span, judged against single-process PEFT on the same weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from tsotsa.codec import decode, encode
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.errors import SwarmError
from tsotsa.rpc import open_channel
from tsotsa.training.export import read_adapter
from tsotsa.training.lora import LoraSettings
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from conftest import cli, connect, finish, start_swarm
from finetune_oracle import batch, eval_loss, examples, stream, train_locally, write_color_task

ADMIN = "admin-secret"
STEPS, MICRO_BATCH, GRAD_ACCUM, LR, SEQ_LEN = 5, 2, 2, 1e-2, 64
# Swarm logits equal PEFT's within EQUAL; an adapter that changes anything moves them by more than CHANGED
# (the trained adapters here move them by about 0.3-0.7).
EQUAL, CHANGED = 1e-4, 1e-2
SCHEDULE, WARMUP = "cosine", 1
# Plain values for the oracle (which uses no tsotsa code); the swarm gets the same through LoraSettings.
LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"), seed=7)
SETTINGS = LoraSettings(**LORA)


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


@pytest.fixture(scope="module")
def exact_run(swarm, data) -> pb.RunInfo:
    """5 rounds of one optimizer step each (every round's train loss is one step's loss), cosine-scheduled."""
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("exact", run_config(lr_schedule=SCHEDULE, warmup_steps=WARMUP), data, data)
        return finish(client, "exact")


@pytest.fixture(scope="module")
def oracle(tiny_model, data):
    return train_locally(tiny_model, data, LORA, steps=STEPS, micro_batch=MICRO_BATCH, grad_accum=GRAD_ACCUM,
                         lr=LR, seq_len=SEQ_LEN, warmup_steps=WARMUP)


@pytest.fixture(scope="module")
def cli_run(swarm, data) -> subprocess.CompletedProcess:
    """Run "cli-run", launched and followed by `tsotsa-coordinator finetune` (2 rounds of 2 steps, q_proj and
    v_proj only): the CLI test judges its output; the adapter tests serve it beside "exact"."""
    return coordinator_cli("finetune", "--coordinator", swarm.coordinator_address, "--data", str(data),
                           "--eval-data", str(data), "--name", "cli-run", "--rounds", "2", "--steps-per-round", "2",
                           "--micro-batch", "2", "--seq-len", "64", "--lora-r", "4", "--target-modules",
                           "q_proj,v_proj", "--lr", "1e-2")


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
    unadapted = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).generate(
        prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model(prompt).logits
    with connect(swarm, tmp_path_factory) as swarm_model:
        produced = generate_when_announced(swarm_model, prompt, "exact")
        adapted = when_announced(lambda: swarm_model.forward(prompt, adapter="exact"))
        plain = swarm_model.forward(prompt)
    assert produced.tolist() == expected.tolist()
    # The equality above says nothing if the adapter changes nothing: it changes the greedy tokens, and the
    # swarm's logits with it are PEFT's, not the base model's.
    assert expected.tolist() != unadapted.tolist()
    assert (adapted - reference).abs().max().item() <= EQUAL
    assert (adapted - plain).abs().max().item() > CHANGED


def when_announced(call: Callable[[], torch.Tensor], timeout: float = 20.0) -> torch.Tensor:
    """Peers announce a new adapter in the DHT at once, but the DHT is eventually consistent."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except SwarmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def generate_when_announced(swarm_model, prompt: torch.Tensor, adapter: str, timeout: float = 20.0) -> torch.Tensor:
    return when_announced(lambda: swarm_model.generate(prompt, max_new_tokens=12, adapter=adapter), timeout)


def test_bad_data_fails_before_training_with_the_line(swarm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        with pytest.raises(SwarmError, match=r"bad.jsonl line 2: invalid JSON"):
            client.create_run("bad-data", run_config(), bad, None)
        with pytest.raises(SwarmError, match="no run named"):
            client.run("bad-data")


def test_launching_and_stopping_need_the_admin_token(swarm, data):
    for token in (None, "wrong"):
        with CoordinatorClient(swarm.coordinator_address, admin_token=token) as client:
            with pytest.raises(SwarmError, match="admin token"):
                client.create_run("no-admin", run_config(), data, None)
            with pytest.raises(SwarmError, match="admin token"):
                client.stop_run("exact")
            with pytest.raises(SwarmError, match="no run named"):  # refused, and nothing was created either
                client.run("no-admin")


def coordinator_cli(*args: str, admin: str | None = ADMIN, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TSOTSA_ADMIN_TOKEN"}
    if admin:
        env["TSOTSA_ADMIN_TOKEN"] = admin
    return subprocess.run([*cli("tsotsa-coordinator"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_the_cli_launches_follows_lists_and_exports_a_run(cli_run, swarm, tiny_model, tmp_path):
    address = swarm.coordinator_address
    launched = cli_run
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
        unadapted = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
    assert (expected - got).abs().max().item() <= 1e-5
    assert (got - unadapted).abs().max().item() > CHANGED  # the merge folded in an adapter that does something
    reference = read_adapter(Path(shown["rounds"][1]["checkpoint"]))[0]
    assert all(torch.equal(tensor, read_adapter(tmp_path / "adapter")[0][key]) for key, tensor in reference.items())


def test_several_adapters_are_served_side_by_side(exact_run, cli_run, swarm, tiny_model, tmp_path, tmp_path_factory):
    """`tsotsa generate --adapter RUN` for two runs on the same peers, and without adapter: each as PEFT makes it."""
    assert cli_run.returncode == 0, cli_run.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "the color of lemon is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    outputs, references = {}, {}
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
        # Both stop at EOS or after 10 tokens: the same length, and never nothing (which the prefix test passes).
        assert 0 < len(outputs[adapter]) == len(expected), (adapter, outputs[adapter], expected.tolist())
        assert outputs[adapter] == expected.tolist()[:len(outputs[adapter])], adapter
        with torch.no_grad():
            references[adapter] = model(ids).logits
    # Each adapter changes the greedy tokens, so the equalities above could not hold with the base model's ...
    assert outputs["exact"] != outputs[None] and outputs["cli-run"] != outputs[None], outputs
    # ... and on the same peers each request gets its own adapter: the swarm's logits with each are that
    # adapter's PEFT logits, and the three differ from one another.
    with connect(swarm, tmp_path_factory) as swarm_model:
        logits = {adapter: when_announced(lambda: swarm_model.forward(ids, adapter=adapter))
                  for adapter in ("exact", "cli-run", None)}
    for adapter, got in logits.items():
        assert (got - references[adapter]).abs().max().item() <= EQUAL, adapter
    for one, other in (("exact", None), ("cli-run", None), ("exact", "cli-run")):
        assert (references[one] - references[other]).abs().max().item() > CHANGED, (one, other)


def checkpoint_of(swarm, run: str) -> str:
    with CoordinatorClient(swarm.coordinator_address) as client:
        return [r for r in client.run(run).rounds if r.state == "done"][-1].checkpoint


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
    with CoordinatorClient(address) as client:
        deadline = time.monotonic() + 60
        while (info := client.run("stopped-run")).state != "stopped":
            assert time.monotonic() < deadline and info.state in ("queued", "running", "stopping"), info.state
            time.sleep(0.5)
    assert info.rounds_done < 50


def test_a_run_resumes_after_the_coordinator_is_killed(swarm, data, tiny_model):
    """It kills the module's coordinator (and starts another on the same ports and state). A resume, not a
    rerun: the rounds done before the kill stay as they were (stored times, files), the new coordinator starts
    at the first unfinished round, from the last done round's adapter."""
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        client.create_run("resumed", run_config(rounds=4, steps_per_round=12), data, None)
        for event in watch(swarm.coordinator_address, "resumed"):
            if event.kind == "round":
                break
        first = client.run("resumed").rounds[0]
    swarm.kill_coordinator()
    killed_at = time.time()
    # The dead coordinator's store and files hold still: what was done before the kill.
    before = stored_rounds(swarm, "resumed")
    done = [r for r, row in before.items() if row["state"] == "done"]
    assert done == list(range(len(done))) and 1 <= len(done) < 4, before  # round 0 done, the run not
    files = {r: snapshot(Path(before[r]["checkpoint"])) for r in done}
    resumes_at = len(done)  # usually 1; 2 when round 1 ended before the kill landed

    swarm.start_coordinator()
    swarm.coordinator.wait_for(re.compile(r"resuming run resumed"))
    events = list(watch(swarm.coordinator_address, "resumed"))  # the new coordinator's, from its start to the end
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        info = finish(client, "resumed")
    assert [r.round for r in info.rounds] == [0, 1, 2, 3]
    assert (info.rounds[0].train_loss, info.rounds[0].checkpoint) == (first.train_loss, first.checkpoint)
    assert all(r.samples == 12 * MICRO_BATCH * GRAD_ACCUM for r in info.rounds)
    assert info.rounds[-1].train_loss < info.rounds[0].train_loss

    after = stored_rounds(swarm, "resumed")
    for r in done:  # not run again: same start and end times, same files (a rewrite replaces the directory)
        assert after[r] == before[r], (r, before[r], after[r])
        assert snapshot(Path(after[r]["checkpoint"])) == files[r], r
    assert all(after[r]["started"] > killed_at for r in range(resumes_at, 4)), (killed_at, after)
    progress = [event for event in events if event.kind in ("step", "round")]
    assert [e.round for e in progress if e.kind == "round"] == list(range(resumes_at, 4)), events
    assert all(e.round >= resumes_at for e in progress), events
    # Its first step is unit 0 of round `resumes_at` (one pipeline here), trained from the last done round's
    # adapter: its loss is that adapter's PEFT loss on the unit's micro-batches, not the base model's.
    step = progress[0]
    assert (step.kind, step.round, step.steps_done, len(step.peers)) == ("step", resumes_at, 1, 3), step
    expected = unit_loss(tiny_model, data, Path(before[resumes_at - 1]["checkpoint"]), resumes_at * 12)
    assert abs(step.loss - expected) <= 1e-4, (step.loss, expected)


def watch(address: str, run: str, timeout: float = 300.0) -> Iterator[pb.RunEvent]:
    """WatchRun's events until the run ends (bounded by `timeout`); leaving the loop early cancels the stream."""
    channel = open_channel(address, None)
    call = pb_grpc.CoordinatorStub(channel).WatchRun(pb.RunRequest(name=run), timeout=timeout)
    try:
        yield from call
    finally:
        call.cancel()
        channel.close()


def stored_rounds(swarm, run: str) -> dict[int, dict]:
    """The run's rounds as the coordinator's SQLite store holds them (start and end times are not on the wire)."""
    uri = (Path(swarm.state_dir) / "coordinator.sqlite").resolve().as_uri() + "?mode=ro"
    connection = sqlite3.connect(uri, uri=True)
    try:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM rounds WHERE run = ? ORDER BY round", (run,)).fetchall()
    finally:
        connection.close()
    return {row["round"]: dict(row) for row in rows}


def snapshot(directory: Path) -> dict[str, tuple]:
    """Each file under an exported round (and the directory itself): inode, mtime and contents."""
    entries = {".": (directory.stat().st_ino, directory.stat().st_mtime_ns)}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries[str(path.relative_to(directory))] = (stat.st_ino, stat.st_mtime_ns,
                                                         hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(entries) > 2, entries  # the adapter's files were there to compare
    return entries


def unit_loss(tiny_model: Path, data: Path, checkpoint: Path, unit: int) -> float:
    """PEFT's loss on optimizer step `unit`'s micro-batches (mean over them) with the adapter at `checkpoint`."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), checkpoint)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = examples(data, tokenizer, SEQ_LEN)
    order = stream(len(rows), SETTINGS.seed, (unit + 1) * GRAD_ACCUM * MICRO_BATCH)
    losses = []
    with torch.no_grad():
        for index in range(unit * GRAD_ACCUM, (unit + 1) * GRAD_ACCUM):
            input_ids, mask, labels = batch([rows[i] for i in order[index * MICRO_BATCH:(index + 1) * MICRO_BATCH]],
                                            tokenizer.pad_token_id)
            losses.append(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_a_peer_that_never_trained_serves_a_run_by_name(exact_run, cli_run, swarm, tiny_model):
    """`tsotsa-peer join --adapters RUN` fetches the run's latest adapter from the coordinator."""
    assert cli_run.returncode == 0, cli_run.stderr
    newcomer = swarm.add_peers(["0:4"], "--adapters", "exact,cli-run")[0]
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        ids = tokenizer("the color of coal is", return_tensors="pt").input_ids
        logits, expected = {}, {}
        for run in ("exact", "cli-run", None):  # both runs it was told to serve, and the bare base model
            model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
            if run is not None:
                model = PeftModel.from_pretrained(model, checkpoint_of(swarm, run))
            inner = model.base_model.model if run is not None else model
            with torch.no_grad():
                expected[run] = model(ids).logits
                hidden = inner.model.embed_tokens(ids)
            channel = open_channel(newcomer.address, None)
            try:
                request = pb.ForwardRequest(model_id=swarm.model_id, start_block=0, end_block=4, adapter=run or "",
                                            hidden_states=encode(hidden))
                reply = pb_grpc.PeerStub(channel).Forward(request, timeout=60)
            finally:
                channel.close()
            with torch.no_grad():
                logits[run] = inner.lm_head(inner.model.norm(decode(reply.hidden_states)))
    finally:
        swarm.stop_peer(newcomer)  # the module's swarm as the other tests know it (one pipeline)
    assert (logits["exact"] - expected["exact"]).abs().max().item() <= 1e-4
    assert all((logits[run] - expected[run]).abs().max().item() <= EQUAL for run in logits)
    # Not vacuous: the newcomer applies each adapter it fetched, each its own, and none without being asked.
    for one, other in (("exact", None), ("cli-run", None), ("exact", "cli-run")):
        assert (logits[one] - logits[other]).abs().max().item() > CHANGED, (one, other)
