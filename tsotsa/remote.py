"""Tensors from the coordinator: a checkpoint cache filled over `CoordinatorClient.fetch`, and adapters.

A lab machine without a copy of the checkpoint fetches just what its role needs (a peer: its blocks; a
client: the embeddings, final norm, LM head and tokenizer) into a local cache directory that is itself a
partial Hugging Face checkpoint, so it is read back with the same `Checkpoint` code as a full one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tsotsa.checkpoint import HEAD_PREFIXES, TOKENIZER_FILES, Checkpoint, block_prefix, check_model_id
from tsotsa.codec import DTYPES, decode, tensor_from_bytes
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.errors import CheckpointError, SwarmError
from tsotsa.v1 import tsotsa_pb2 as pb


def default_cache_dir() -> Path:
    return Path(os.environ.get("TSOTSA_CACHE", Path.home() / ".cache" / "tsotsa"))


def fetch_tensors(client: CoordinatorClient, model_id: str, prefixes: list[str], files: list[str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """`CoordinatorClient.fetch`, its tensors as torch tensors."""
    fetched, blobs = client.fetch(model_id, prefixes, files)
    tensors = {name: tensor_from_bytes(item.data, DTYPES[item.dtype], item.shape) for name, item in fetched.items()}
    return tensors, blobs


def fetch_adapter(client: CoordinatorClient, run: str, start: int = 0, end: int = 0
                  ) -> tuple[pb.LoraSpec, dict[str, torch.Tensor]]:
    """A run's latest aggregated adapter for blocks [start, end) (end 0: all), in PEFT's key names."""
    reply = client.adapter(run, start, end)
    return reply.lora, {item.name: decode(item.tensor, what=item.name, ndim=2) for item in reply.tensors}


def served_model_id(client: CoordinatorClient, info: pb.ModelInfo) -> str:
    """The coordinator's model id, checked before it names a directory (`check_model_id`)."""
    try:
        return check_model_id(info.model_id)
    except CheckpointError as error:
        raise SwarmError(f"coordinator at {client.address} serves {error}") from None


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def cached_checkpoint(
    client: CoordinatorClient, info: pb.ModelInfo, cache_dir: Path, *, blocks: range = range(0), head: bool = False
) -> Checkpoint:
    """A partial checkpoint in `cache_dir/<model_id>` holding the given blocks (and the head), fetched if missing.

    What the coordinator names is checked before anything is written: the model id is a model id (no path
    out of `cache_dir`), the tokenizer files are the known tokenizer file names."""
    directory = Path(cache_dir) / served_model_id(client, info)
    unknown = [name for name in info.tokenizer_files if name not in TOKENIZER_FILES]
    if unknown:
        raise SwarmError(f"coordinator at {client.address} offers files that are no tokenizer files: "
                         f"{', '.join(repr(name[:80]) for name in unknown[:3])}")
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    if not config_path.exists():
        _write_atomically(config_path, lambda p: p.write_text(info.config_json))
    for index in blocks:
        target = directory / f"block-{index:05d}.safetensors"
        if not target.exists():
            tensors, _ = fetch_tensors(client, info.model_id, [block_prefix(index)], [])
            if not tensors:
                raise SwarmError(f"coordinator has no tensors for block {index}")
            _write_atomically(target, lambda p: save_file(tensors, str(p)))
    if head:
        target = directory / "head.safetensors"
        if not target.exists():
            tensors, blobs = fetch_tensors(client, info.model_id, list(HEAD_PREFIXES), list(info.tokenizer_files))
            for name, blob in blobs.items():
                _write_atomically(directory / name, lambda p, blob=blob: p.write_bytes(blob))
            _write_atomically(target, lambda p: save_file(tensors, str(p)))
    return Checkpoint.open(directory)

