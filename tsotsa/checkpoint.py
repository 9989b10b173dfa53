"""Reads Hugging Face Llama checkpoints tensor by tensor, so that no role ever loads the whole model.

A checkpoint directory holds config.json and one or more *.safetensors files (with or without
model.safetensors.index.json). Peers read only `model.layers.{i}.*` of their blocks; the client and the
coordinator read only the embeddings, the final norm and the LM head. Every read is counted, which is how
the tests prove a peer never touched the rest.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig

from tsotsa.errors import CheckpointError

HEAD_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")  # what clients and the coordinator hold
BLOCKS_PREFIX = "model.layers."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")  # transformers 5 writes a chat template to its own file
SUPPORTED_MODEL_TYPES = ("llama",)


def block_prefix(index: int) -> str:
    return f"{BLOCKS_PREFIX}{index}."


def head_dim(config: LlamaConfig) -> int:
    """Width of one attention head: the config's `head_dim` where it sets one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def load_config(model_dir: Path) -> LlamaConfig:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
    return config_from_json(json.dumps(raw), origin=str(config_path))


def config_from_json(text: str, origin: str = "config") -> LlamaConfig:
    raw = json.loads(text)
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{origin}: model_type {raw.get('model_type')!r} is not supported (need 'llama')")
    raw.pop("model_type")
    return LlamaConfig(**raw)


# Written by whichever library saved the checkpoint: not part of the model's identity.
_CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype")


MODEL_ID_PATTERN = re.compile(r"llama-\d+x\d+-[0-9a-f]{12}")


def check_model_id(model_id: str) -> str:
    """A model id as `model_id_for` writes it: also a safe directory name (no `/`, no `..`), since caches
    are laid out by model id and the id comes from a coordinator, which a client need not trust."""
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise CheckpointError(f"{str(model_id)[:80]!r} is not a model id")
    return model_id


def model_id_for(config_json: str, tensor_specs: dict[str, tuple[str, tuple[int, ...]]], fingerprint: str) -> str:
    """Names a model by its config, tensor layout and a sample of its weights, the same on every machine
    whatever its path or library versions; two fine-tunes of one architecture get different ids."""
    raw = {k: v for k, v in json.loads(config_json).items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode())
    for name in sorted(tensor_specs):
        digest.update(f"{name}:{tensor_specs[name]}".encode())
    digest.update(fingerprint.encode())
    return f"llama-{raw.get('num_hidden_layers')}x{raw.get('hidden_size')}-{digest.hexdigest()[:12]}"


@dataclass
class Checkpoint:
    """An index of where each tensor lives; reads tensors lazily and counts the bytes it reads."""

    directory: Path
    config: LlamaConfig
    files: dict[str, Path]                                  # tensor name -> safetensors file
    specs: dict[str, tuple[str, tuple[int, ...]]]          # tensor name -> (dtype, shape)
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, directory: Path | str) -> "Checkpoint":
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        config = load_config(directory)
        shards = sorted(directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        files: dict[str, Path] = {}
        specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in handle.keys():
                        sliced = handle.get_slice(name)
                        files[name] = shard
                        specs[name] = (str(sliced.get_dtype()), tuple(sliced.get_shape()))
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{shard}: unreadable safetensors file ({exc})") from exc
        return cls(directory=directory, config=config, files=files, specs=specs)

    @cached_property
    def model_id(self) -> str:
        return model_id_for((self.directory / "config.json").read_text(), self.specs, self.weight_fingerprint())

    def weight_fingerprint(self) -> str:
        """sha256 over the first row of every tensor: cheap to read, yet differs between fine-tunes."""
        digest = hashlib.sha256()
        by_file: dict[Path, list[str]] = {}
        for name in sorted(self.files):
            by_file.setdefault(self.files[name], []).append(name)
        read = 0
        for path, names in sorted(by_file.items()):
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    row = handle.get_slice(name)[:1].contiguous()
                    read += row.numel() * row.element_size()
                    digest.update(name.encode() + row.view(-1).view(torch.uint8).numpy().tobytes())
        with self._lock:
            self.bytes_read += read
        return digest.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(tensor_nbytes(dtype, shape) for dtype, shape in self.specs.values())

    def names_with_prefix(self, prefixes: tuple[str, ...] | list[str]) -> list[str]:
        return sorted(name for name in self.files if name.startswith(tuple(prefixes)))

    def has_block(self, index: int) -> bool:
        return bool(self.names_with_prefix([block_prefix(index)]))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.files]
        if missing:
            raise CheckpointError(f"{self.directory}: missing tensors {missing[:3]}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        with self._lock:
            self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors

    def read_prefixes(self, prefixes: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        return self.read(self.names_with_prefix(prefixes))


_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    size = _SAFETENSORS_DTYPE_BYTES.get(dtype.upper())
    if size is None:
        size = torch.empty((), dtype=getattr(torch, dtype.replace("torch.", ""))).element_size()
    return count * size
