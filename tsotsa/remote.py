"""The coordinator as seen by peers and clients: model identity, the swarm map, and fetching tensors.

A lab machine without a copy of the checkpoint fetches just what its role needs (a peer: its blocks; a
client: the embeddings, final norm, LM head and tokenizer) into a local cache directory that is itself a
partial Hugging Face checkpoint, so it is read back with the same `Checkpoint` code as a full one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from tsotsa.checkpoint import Checkpoint, block_prefix
from tsotsa.codec import DTYPES, decode, tensor_from_bytes
from tsotsa.errors import SwarmError
from tsotsa.rpc import describe_refusal, describe_rpc_error, open_channel
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

RPC_TIMEOUT = 30.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("TSOTSA_CACHE", Path.home() / ".cache" / "tsotsa"))


class CoordinatorClient:
    def __init__(self, address: str, timeout: float = RPC_TIMEOUT, token: str | None = None) -> None:
        self.address, self.timeout = address, timeout
        self._channel = open_channel(address, token)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_info(self) -> pb.ModelInfo:
        try:
            return self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, wait_for_ready=False)
        except grpc.RpcError as error:
            raise describe_rpc_error(self.address, "coordinator", error) from None

    def swarm_status(self) -> pb.SwarmMap:
        try:
            return self._stub.SwarmStatus(pb.SwarmStatusRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise describe_rpc_error(self.address, "coordinator", error) from None

    def adapter(self, run: str, start: int = 0, end: int = 0) -> tuple[pb.LoraSpec, dict[str, torch.Tensor]]:
        """A run's latest aggregated adapter, for blocks [start, end) (end 0: all), in PEFT's key names."""
        try:
            reply = self._stub.GetAdapter(pb.AdapterRequest(run=run, start_block=start, end_block=end),
                                          timeout=max(self.timeout, 120.0))
        except grpc.RpcError as error:
            raise describe_refusal(self.address, "coordinator", error) from None
        return reply.lora, {item.name: decode(item.tensor, what=item.name, ndim=2) for item in reply.tensors}

    def fetch(self, model_id: str, prefixes: list[str], files: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """Downloads tensors and files, checking every item's sha256."""
        tensors: dict[str, torch.Tensor] = {}
        blobs: dict[str, bytes] = {}
        request = pb.FetchRequest(model_id=model_id, tensor_prefixes=prefixes, file_names=files)
        current: pb.FetchChunk | None = None
        buffer = bytearray()
        try:
            for chunk in self._stub.Fetch(request, timeout=max(self.timeout, 600.0)):
                if chunk.offset == 0:
                    current, buffer = chunk, bytearray()
                if current is None or chunk.name != current.name or chunk.offset != len(buffer):
                    raise SwarmError(f"coordinator at {self.address} sent an out-of-order chunk of {chunk.name}")
                buffer += chunk.data
                if not chunk.sha256:
                    continue
                if len(buffer) != current.total_bytes or hashlib.sha256(buffer).hexdigest() != chunk.sha256:
                    raise SwarmError(f"checksum mismatch for {chunk.name} from coordinator at {self.address}")
                if current.is_file:
                    blobs[current.name] = bytes(buffer)
                else:
                    tensors[current.name] = tensor_from_bytes(buffer, DTYPES[current.dtype], tuple(current.shape))
                current = None
        except grpc.RpcError as error:
            raise describe_rpc_error(self.address, "coordinator", error) from None
        return tensors, blobs


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def cached_checkpoint(
    client: CoordinatorClient, info: pb.ModelInfo, cache_dir: Path, *, blocks: range = range(0), head: bool = False
) -> Checkpoint:
    """A partial checkpoint in `cache_dir/<model_id>` holding the given blocks (and the head), fetched if missing."""
    directory = Path(cache_dir) / info.model_id
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    if not config_path.exists():
        _write_atomically(config_path, lambda p: p.write_text(info.config_json))
    for index in blocks:
        target = directory / f"block-{index:05d}.safetensors"
        if not target.exists():
            tensors, _ = client.fetch(info.model_id, [block_prefix(index)], [])
            if not tensors:
                raise SwarmError(f"coordinator has no tensors for block {index}")
            _write_atomically(target, lambda p: save_file(tensors, str(p)))
    if head:
        target = directory / "head.safetensors"
        if not target.exists():
            tensors, blobs = client.fetch(info.model_id, ["model.embed_tokens.", "model.norm.", "lm_head."],
                                          list(info.tokenizer_files))
            for name, blob in blobs.items():
                _write_atomically(directory / name, lambda p, blob=blob: p.write_bytes(blob))
            _write_atomically(target, lambda p: save_file(tensors, str(p)))
    return Checkpoint.open(directory)

