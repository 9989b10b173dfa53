"""Checkpoints in the Hugging Face layout, read tensor by tensor."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import cli
from tsotsa.checkpoint import HEAD_PREFIXES, Checkpoint, block_prefix
from tsotsa.errors import CheckpointError



def test_make_tiny_model_cli_writes_a_loadable_gqa_sharded_llama(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = subprocess.run(
        [*cli("tsotsa"), "make-tiny-model", str(out), "--layers", "3", "--hidden", "32", "--heads", "4",
         "--kv-heads", "2", "--vocab", "300", "--seed", "5", "--shard-size", "50KB"],
        capture_output=True, text=True, check=True,
    )
    assert "wrote" in result.stdout
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.num_hidden_layers == 3
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello swarm").input_ids
    assert ids[0] == tokenizer.bos_token_id and max(ids) < 300


def test_same_seed_same_weights(tmp_path: Path, tiny_model: Path) -> None:
    from tsotsa.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", layers=4, hidden=64, heads=4, vocab=512, seed=1)
    assert Checkpoint.open(again).model_id == Checkpoint.open(tiny_model).model_id
    first = Checkpoint.open(tiny_model).read([block_prefix(0) + "mlp.up_proj.weight"])
    second = Checkpoint.open(again).read([block_prefix(0) + "mlp.up_proj.weight"])
    assert torch.equal(*first.values(), *second.values())


def test_reads_only_requested_tensors_and_counts_them(gqa_sharded_model: Path) -> None:
    checkpoint = Checkpoint.open(gqa_sharded_model)
    index = json.loads((gqa_sharded_model / "model.safetensors.index.json").read_text())
    assert set(checkpoint.files) == set(index["weight_map"])
    block = checkpoint.read_prefixes([block_prefix(2)])
    assert block and all(name.startswith("model.layers.2.") for name in block)
    assert checkpoint.bytes_read == sum(t.numel() * t.element_size() for t in block.values())
    head = checkpoint.read_prefixes(HEAD_PREFIXES)
    assert set(head) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert checkpoint.bytes_read < checkpoint.total_bytes


def test_bad_checkpoint_directories_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpoint.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="not supported"):
        Checkpoint.open(tmp_path / "empty")
