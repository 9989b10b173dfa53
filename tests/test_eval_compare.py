"""`tsotsa eval compare` as a user runs it: an adapter trained through the swarm on the learnable shipped task,
then `transformers` and fp32 peers, each with and without it, compared on that task.

The comparison's own oracle is inside it: the swarm's fp32 rows must give the `transformers` rows' metrics
(1e-4), with the adapter too; the adapter must raise accuracy over the random base; the files (Markdown,
JSON, both PNGs) must hold one row per variant, and the measured figures must be the measured kind (bytes
per block = the fp32 block's parameter bytes, p99 >= median, peak RSS > 0)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import cli, finish, start_swarm
from finetune_oracle import write_color_task
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.evaluation.compare import CompareOptions, Variant, compare, parse_variants
from tsotsa.evaluation.latency import summary
from tsotsa.errors import TsotsaError
from tsotsa.evaluation.run import EvalOptions
from tsotsa.tiny_model import make_tiny_model
from tsotsa.v1 import tsotsa_pb2 as pb

ADMIN = "compare-admin"
RUN = "colors"
R = 16  # the adapter's LoRA rank, on all seven linears of every block
VARIANTS = ["transformers", f"transformers+{RUN}", "fp32", f"fp32+{RUN}"]


@pytest.fixture(scope="module")
def colors_model(tmp_path_factory) -> Path:
    """2 blocks of hidden 256: wide enough that 48 LoRA steps teach it the colors (hidden 64 barely moves)."""
    return make_tiny_model(tmp_path_factory.mktemp("colors-model") / "model", layers=2, hidden=256, heads=4,
                           vocab=512, seed=1)


@pytest.fixture(scope="module")
def coordinator(colors_model, tmp_path_factory):
    """A coordinator that trained RUN on the color data with one peer, which then left: compare starts its own."""
    swarm = start_swarm(colors_model, ["0:2"], admin_token=ADMIN)
    try:
        data = write_color_task(tmp_path_factory.mktemp("colors") / "colors.jsonl")
        config = pb.RunConfig(rounds=2, steps_per_round=24, micro_batch=8, seq_len=32, lora_r=R, lora_alpha=2 * R,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], lr=5e-3, seed=3)
        with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
            client.create_run(RUN, config, data, None)
            finish(client, RUN)
        swarm.stop_peer(swarm.peers[0])
        yield swarm.coordinator_address
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def compared(coordinator, colors_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("compare") / "out"
    done = subprocess.run(cli("tsotsa") + [
        "eval", "compare", "--coordinator", coordinator, "--model", str(colors_model), "--variants",
        "transformers,fp32", "--adapter", RUN, "--tasks", "tsotsa_colors", "--repeats", "2", "--new-tokens", "6",
        "--concurrency", "2", "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_compare_writes_one_row_per_variant(compared):
    out, done = compared
    report = (out / "results.md").read_text()
    for variant in VARIANTS:
        assert sum(line.startswith(f"| {variant} |") for line in report.splitlines()) == 2, report  # both tables
    assert "**Machine**" in report and "**Latency protocol**" in report and "torch 2." in report
    assert report in done.stdout  # the tables are printed too
    for noise in ("Traceback", "Warning", "Failed to load", "WARNING"):  # stderr: progress bars only
        assert noise not in done.stderr, done.stderr[-2000:]
    for name in ("accuracy_vs_memory.png", "latency.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # something is drawn
    result = json.loads((out / "results.json").read_text())
    assert [row["variant"] for row in result["variants"]] == VARIANTS
    machine = result["machine"]
    assert machine["logical_cores"] >= 1 and machine["libraries"]["lm_eval"] == "0.4.13"
    assert result["protocol"]["latency"]["repeats"] == 2


def test_the_swarm_rows_equal_the_transformers_rows_and_the_adapter_helps(compared):
    rows = {row["variant"]: row for row in json.loads((compared[0] / "results.json").read_text())["variants"]}
    for base in ("", f"+{RUN}"):
        expected = rows[f"transformers{base}"]["metrics"]["tsotsa_colors"]
        got = rows[f"fp32{base}"]["metrics"]["tsotsa_colors"]
        assert set(expected) == {"acc", "acc_norm"} == set(got)
        for metric in expected:
            assert abs(expected[metric]["value"] - got[metric]["value"]) <= 1e-4, (base, metric, expected, got)
            assert abs(expected[metric]["stderr"] - got[metric]["stderr"]) <= 1e-4
    base = rows["fp32"]["metrics"]["tsotsa_colors"]["acc"]
    adapted = rows[f"fp32+{RUN}"]["metrics"]["tsotsa_colors"]["acc"]
    assert adapted["value"] > base["value"], (base, adapted)


def test_the_measured_figures(compared, colors_model):
    rows = json.loads((compared[0] / "results.json").read_text())["variants"]
    model = LlamaForCausalLM.from_pretrained(colors_model, dtype=torch.float32)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    rotary = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())  # each span holds its own
    config = model.config
    lora = 4 * R * (4 * 2 * config.hidden_size + 3 * (config.hidden_size + config.intermediate_size))  # per block
    for row in rows:
        expected = block_bytes + (rotary if row["backend"] == "swarm" else 0)  # one block per peer here
        assert row["bytes_per_block"] == expected, (row["variant"], row["bytes_per_block"], expected)
        assert row["peak_rss_bytes"] > 50 << 20
        latency = row["latency"]
        assert latency["token_ms"]["n"] == 2 * 5  # 2 runs of 6 tokens: 5 gaps each
        for figure in latency.values():
            assert 0 < figure["min"] <= figure["median"] <= figure["p99"] <= figure["max"]
    swarm = [row for row in rows if row["backend"] == "swarm"]
    assert all([peer["blocks"] for peer in row["peers"]] == ["0:1", "1:2"] for row in swarm)
    assert all(peer["rss_measured"] == "peak" and peer["quant"] == "none" for row in swarm for peer in row["peers"])
    assert all(peer["adapters"] == [RUN] and peer["adapter_bytes"] == lora for row in swarm for peer in row["peers"])


def test_variants_and_options_are_checked_before_anything_starts(colors_model, tmp_path):
    assert [v.name for v in parse_variants("fp32,nf4+r1", adapter="r2")] == ["fp32", "fp32+r2", "nf4+r1"]
    tasks = EvalOptions(tasks=["tsotsa_colors"])
    bad = [("fp16", None, {}), ("fp32,fp32", None, {}), (" , ", None, {}),
           ("transformers", None, {"coordinator": "127.0.0.1:1"}),           # no --model for transformers
           ("swarm", None, {"model_dir": colors_model}),                        # swarm needs --coordinator
           ("fp32", RUN, {"model_dir": colors_model}),                          # adapters need a coordinator
           ("swarm,fp32", None, {"coordinator": "127.0.0.1:1", "model_dir": colors_model}),
           ("fp32", None, {"model_dir": tmp_path}),                           # not a checkpoint
           ("fp32", None, {"model_dir": colors_model, "peers": 3})]           # 2 blocks
    for text, adapter, fields in bad:
        with pytest.raises(TsotsaError):
            CompareOptions(variants=parse_variants(text, adapter), tasks=tasks, output_dir=tmp_path / "out", **fields)
    assert Variant("nf4", "x").name == "nf4+x"
    figures = summary([4.0, 1.0, 3.0, 2.0])
    assert figures["median"] == 2.5 and figures["mean"] == 2.5 and abs(figures["p99"] - 3.97) < 1e-9


def test_an_unknown_task_fails_before_any_peer_starts(coordinator, colors_model, tmp_path):
    options = CompareOptions(variants=parse_variants("fp32"), tasks=EvalOptions(tasks=["no_such_task"]),
                             output_dir=tmp_path / "out", model_dir=colors_model, coordinator=coordinator)
    said: list[str] = []
    with pytest.raises(TsotsaError, match="no task named no_such_task"):
        compare(options, say=said.append)
    assert said == []
    with CoordinatorClient(coordinator) as client:  # (the trainer's record may still say "draining")
        assert not [peer for peer in client.swarm_status().peers if peer.state == "online"]
