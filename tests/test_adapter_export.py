"""Adapters exported in PEFT's own format, read back, and merged into a plain checkpoint on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from tsotsa.checkpoint import TOKENIZER_FILES, load_config
from tsotsa.tiny_model import make_tiny_model
from tsotsa.training.export import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, initial_adapter, merge_adapter,
                                    module_shape, read_adapter, write_adapter)
from tsotsa.training.lora import LLAMA_LINEARS, LoraSettings, adapter_key, parse_adapter_key

TOKENS = torch.tensor([[1, 17, 42, 300, 5, 99, 7, 256]])
EXPORT_SETTINGS = LoraSettings(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"), seed=7)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gqa_export") / "model", layers=2, hidden=64, heads=8, kv_heads=2,
                           vocab=512, seed=3)


@pytest.fixture(scope="module")
def trained(tiny_model: Path) -> dict[str, torch.Tensor]:
    """The initial adapter with B as if trained, so the adapter changes the model's output."""
    tensors = initial_adapter(load_config(tiny_model), EXPORT_SETTINGS)
    generator = torch.Generator().manual_seed(11)
    for key, tensor in tensors.items():
        if key.endswith("lora_B.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return tensors


@pytest.fixture(scope="module")
def exported(tiny_model: Path, trained: dict[str, torch.Tensor], tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("export") / "adapter", trained, EXPORT_SETTINGS, str(tiny_model))


@pytest.fixture(scope="module")
def peft_logits(tiny_model: Path, trained: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: a PEFT model into which the same tensors were loaded through PEFT's own API."""
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model), EXPORT_SETTINGS.peft_config())
    result = peft.set_peft_model_state_dict(model, trained)
    assert not result.unexpected_keys
    return logits(model)


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("model_fixture", ["tiny_model", "gqa_model"])
def test_key_names_and_shapes_are_peft_s(model_fixture: str, request) -> None:
    base = request.getfixturevalue(model_fixture)
    settings = LoraSettings(r=4, target_modules=LLAMA_LINEARS)
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base), settings.peft_config())
    theirs = peft.get_peft_model_state_dict(model)
    ours = initial_adapter(load_config(base), settings)
    assert set(ours) == set(theirs)
    assert {key: tuple(t.shape) for key, t in ours.items()} == {key: tuple(t.shape) for key, t in theirs.items()}
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_module_shape_follows_gqa(gqa_model: Path) -> None:
    config = load_config(gqa_model)  # 8 heads of 8, 2 KV heads
    assert module_shape(config, "q_proj") == (64, 64)
    assert module_shape(config, "k_proj") == module_shape(config, "v_proj") == (64, 16)
    assert module_shape(config, "down_proj") == (256, 64)
    with pytest.raises(ValueError):
        module_shape(config, "lm_head")


def test_initial_adapter_is_seeded_peft_init(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    settings = LoraSettings(r=8, target_modules=LLAMA_LINEARS, seed=5)
    first, again = initial_adapter(config, settings), initial_adapter(config, settings)
    other_seed = initial_adapter(config, LoraSettings(r=8, target_modules=LLAMA_LINEARS, seed=6))
    for key, tensor in first.items():
        assert torch.equal(tensor, again[key])
        _, path, part = parse_adapter_key(key)
        if part == "lora_B":
            assert not tensor.any()
            continue
        assert tensor.abs().max() <= 1 / math.sqrt(tensor.shape[1])
        assert tensor.std() > 0.5 / math.sqrt(3 * tensor.shape[1])  # spread over the bound, not near zero
        assert not torch.equal(tensor, other_seed[key])
    a_keys = [key for key in first if key.endswith("lora_A.weight")]
    assert len({first[key][0, 0].item() for key in a_keys}) == len(a_keys)  # each module its own draw


def test_initial_adapter_covers_only_the_given_blocks(tiny_model: Path) -> None:
    config = load_config(tiny_model)
    part = initial_adapter(config, EXPORT_SETTINGS, blocks=range(1, 3))
    assert {parse_adapter_key(key)[0] for key in part} == {1, 2}
    whole = initial_adapter(config, EXPORT_SETTINGS)
    assert all(torch.equal(tensor, whole[key]) for key, tensor in part.items())
    assert adapter_key(1, "mlp.down_proj", "lora_A") in part


def test_peft_loads_the_exported_adapter(tiny_model: Path, exported: Path, trained: dict[str, torch.Tensor],
                                         peft_logits: torch.Tensor) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model), exported)
    state = peft.get_peft_model_state_dict(loaded)
    assert set(state) == set(trained) and all(torch.equal(state[key], trained[key]) for key in trained)
    assert (logits(loaded) - peft_logits).abs().max() <= 1e-6
    base_logits = logits(LlamaForCausalLM.from_pretrained(tiny_model))
    assert (base_logits - peft_logits).abs().max() > 1e-2  # the adapter really applied


def test_read_adapter_returns_what_was_written(exported: Path, trained: dict[str, torch.Tensor]) -> None:
    tensors, settings = read_adapter(exported)
    assert set(tensors) == set(trained) and all(torch.equal(tensors[key], trained[key]) for key in trained)
    assert settings == LoraSettings(r=4, alpha=8.0, dropout=0.1, target_modules=EXPORT_SETTINGS.target_modules)


def test_write_adapter_replaces_an_existing_adapter(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    first = initial_adapter(load_config(tiny_model), EXPORT_SETTINGS)
    write_adapter(out, first, EXPORT_SETTINGS, str(tiny_model))
    settings = LoraSettings(r=2, target_modules=("k_proj",))
    second = initial_adapter(load_config(tiny_model), settings)
    assert write_adapter(out, second, settings, str(tiny_model)) == out
    tensors, read_settings = read_adapter(out)
    assert set(tensors) == set(second) and read_settings == settings
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left beside it


def test_merged_checkpoint_matches_the_peft_model(tiny_model: Path, exported: Path, peft_logits: torch.Tensor,
                                                  tmp_path: Path) -> None:
    out = merge_adapter(tiny_model, exported, tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())
    assert (logits(merged) - peft_logits).abs().max() <= 1e-5
    copied = [name for name in TOKENIZER_FILES if (tiny_model / name).is_file()]
    assert "tokenizer.json" in copied
    assert all((out / name).read_bytes() == (tiny_model / name).read_bytes() for name in copied)


def test_read_adapter_rejects_missing_and_corrupt(tiny_model: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path / "nowhere")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / ADAPTER_CONFIG).write_bytes((exported / ADAPTER_CONFIG).read_bytes())
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(AdapterError, match=ADAPTER_WEIGHTS) as raised:
        read_adapter(corrupt)
    assert "\n" not in str(raised.value)
    with pytest.raises(AdapterError):
        merge_adapter(tiny_model, corrupt, tmp_path / "merged")


def test_read_adapter_rejects_foreign_tensors(tiny_model: Path, tmp_path: Path) -> None:
    out = write_adapter(tmp_path / "adapter", initial_adapter(load_config(tiny_model), EXPORT_SETTINGS),
                        EXPORT_SETTINGS, str(tiny_model))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, out / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="not a LoRA adapter tensor"):
        read_adapter(out)
