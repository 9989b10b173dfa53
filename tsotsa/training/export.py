"""A run's adapters as files anyone can use: PEFT's own adapter directory, and a merged plain checkpoint.

The adapter directory is exactly what PEFT saves (adapter_config.json + adapter_model.safetensors under
PEFT's key names), so `PeftModel.from_pretrained` loads a swarm-trained adapter like any other; merging
runs on CPU so that someone without a GPU can still turn it into a standalone Llama checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import LlamaConfig, LlamaForCausalLM

from tsotsa.checkpoint import TOKENIZER_FILES, head_dim, load_config
from tsotsa.errors import TsotsaError
from tsotsa.training.lora import LLAMA_LINEARS, LoraSettings, adapter_key, initial_lora_a, parse_adapter_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGING_SUFFIX, OLD_SUFFIX = ".partial", ".old"  # write_adapter's directories beside the one it writes
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


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], settings: LoraSettings, base_model: str,
                  extra: Callable[[Path], None] | None = None) -> Path:
    """Writes the adapter, and whatever `extra(staging)` adds beside it, into a staging directory next to
    `out_dir`, makes every file and directory of it durable (fsync), then renames it into place and syncs
    the parent: `out_dir` is either the whole new adapter or what it was before, and no other directory is
    touched. A full disk raises OSError (errno ENOSPC; the weights are written with plain file writes, so
    safetensors' own error never hides it) after removing the staging directory; a process killed before
    the rename leaves only a staging directory, which the next write of the same name removes.

    An existing `out_dir` is replaced by two renames (it aside, then the new one in): a crash between them
    leaves no `out_dir` and the old adapter whole in `.NAME.*.old/NAME`, never a mixture of the two."""
    out_dir = Path(out_dir)
    parent, name = out_dir.parent, out_dir.name
    parent.mkdir(parents=True, exist_ok=True)
    _remove_staging_left_by_a_crash(parent, name, keep_old=not out_dir.exists())
    staging = parent / f".{name}.{secrets.token_hex(4)}{STAGING_SUFFIX}"
    staging.mkdir()
    try:
        settings.peft_config(inference_mode=True, base_model=base_model).save_pretrained(staging)
        write_durably(staging / ADAPTER_WEIGHTS, save(
            {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}, metadata={"format": "pt"}))
        if extra is not None:
            extra(staging)
        _sync_tree(staging)
        if out_dir.exists():
            old = parent / f".{name}.{secrets.token_hex(4)}{OLD_SUFFIX}"
            old.mkdir()
            out_dir.rename(old / name)
            staging.rename(out_dir)
            _sync_directory(parent)
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
            _sync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def write_durably(path: Path, data: bytes) -> None:
    """A new file holding `data`, on the disk when this returns (written, then fsynced). Failures are the
    OSError of the write itself: ENOSPC when the disk is full."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directories after their contents), so that a rename of
    `root` never publishes names whose data is not on the disk yet."""
    for directory, _, files in os.walk(root, topdown=False):
        for file in files:
            descriptor = os.open(os.path.join(directory, file), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _sync_directory(Path(directory))


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_staging_left_by_a_crash(parent: Path, name: str, keep_old: bool) -> None:
    """Removes the staging directories of `name` that a killed writer left in `parent`; also the set-aside
    old adapters unless `keep_old` (then a crash mid-replace took `name` away, and the old one is all there is).
    The names are exactly write_adapter's, so a sibling's directories (`name` another prefix of theirs) stay."""
    staging = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}({re.escape(STAGING_SUFFIX)}|{re.escape(OLD_SUFFIX)})")
    for entry in parent.iterdir():
        match = staging.fullmatch(entry.name)
        if match and entry.is_dir() and not (keep_old and match.group(1) == OLD_SUFFIX):
            shutil.rmtree(entry, ignore_errors=True)


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
