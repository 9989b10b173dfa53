"""A run's adapters as files anyone can use: PEFT's own adapter directory, and a merged plain checkpoint.

The adapter directory is exactly what PEFT saves (adapter_config.json + adapter_model.safetensors under
PEFT's key names), so `PeftModel.from_pretrained` loads a swarm-trained adapter like any other; merging
runs on CPU so that someone without a GPU can still turn it into a standalone Llama checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tsotsa.checkpoint import TOKENIZER_FILES, head_dim, load_config
from tsotsa.errors import TsotsaError
from tsotsa.training.lora import LLAMA_LINEARS, LoraSettings, adapter_key, initial_lora_a, parse_adapter_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterError(TsotsaError):
    """The adapter directory is missing, incomplete or not a LoRA adapter of Llama blocks."""


def module_shape(config: LlamaConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of one linear, from the config alone, so no peer loads weights to size A."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * head_dim(config)
    kv_width = (config.num_key_value_heads or config.num_attention_heads) * head_dim(config)
    shapes = {"q_proj": (hidden, q_width), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
              "o_proj": (q_width, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    if module not in shapes:
        raise ValueError(f"{module!r} is not a Llama linear; choose from {', '.join(LLAMA_LINEARS)}")
    return shapes[module]


def module_path(module: str) -> str:
    return f"self_attn.{module}" if module in _ATTENTION else f"mlp.{module}"


def initial_adapter(config: LlamaConfig, settings: LoraSettings, blocks: range | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapter every replica starts from: seeded A, zero B (so the model starts as the base model)."""
    tensors = {}
    for block in blocks if blocks is not None else range(config.num_hidden_layers):
        for module in settings.target_modules:
            in_features, out_features = module_shape(config, module)
            path = module_path(module)
            a_key = adapter_key(block, path, "lora_A")
            tensors[a_key] = initial_lora_a(settings.seed, a_key, settings.r, in_features)
            tensors[adapter_key(block, path, "lora_B")] = torch.zeros(out_features, settings.r)
    return tensors


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], settings: LoraSettings, base_model: str) -> Path:
    """Writes into a temporary directory beside `out_dir` and renames it, so a crash never leaves a
    half-written adapter where a reader would take it for a whole one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        settings.peft_config(inference_mode=True, base_model=base_model).save_pretrained(staging)
        save_file({key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()},
                  staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """An adapter directory PEFT's way, checked to be LoRA on Llama blocks. PEFT's config has no place for
    the run's seed, and A is in the file anyway, so the settings come back with seed 0."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{adapter_dir}: no {path.name} (not a PEFT adapter directory)")
    try:
        raw = json.loads(config_path.read_text())
        targets = raw["target_modules"]
        if raw.get("peft_type") != "LORA" or isinstance(targets, str):
            raise ValueError("only LoRA adapters with a list of target modules are supported")
        settings = LoraSettings(r=raw["r"], alpha=float(raw["lora_alpha"]), dropout=raw["lora_dropout"],
                                target_modules=tuple(m for m in LLAMA_LINEARS if m in targets))
        if set(targets) != set(settings.target_modules):
            raise ValueError(f"target modules {sorted(targets)} are not all Llama linears")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{config_path}: not a usable LoRA config ({exc})") from exc
    try:
        tensors = load_file(weights_path)
        for key, tensor in tensors.items():
            _, path, part = parse_adapter_key(key)
            if path.rsplit(".", 1)[-1] not in settings.target_modules:
                raise ValueError(f"{key!r} is not one of the target modules")
            if tensor.dim() != 2 or tensor.shape[0 if part == "lora_A" else 1] != settings.r:
                raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, not rank {settings.r}")
    except (OSError, SafetensorError, ValueError) as exc:
        raise AdapterError(f"{weights_path}: not a usable LoRA adapter ({exc})") from exc
    return tensors, settings


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Folds the adapter into the base weights on CPU, giving a plain Llama checkpoint (with the base's
    tokenizer) that needs neither PEFT nor a GPU to run."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    read_adapter(adapter_dir)  # a one-line error for a bad adapter, before PEFT's own
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=load_config(base_dir).dtype, device_map="cpu")
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    return out_dir
