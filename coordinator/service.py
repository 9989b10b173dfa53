"""The coordinator's gRPC service: the model's identity, the swarm map, and the checkpoint's tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import hivemind
from hivemind.utils import get_dht_time

from tsotsa.checkpoint import Checkpoint, TOKENIZER_FILES
from tsotsa.codec import DTYPE_NAMES, tensor_bytes
from tsotsa.dht import find_servers
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

CHUNK_BYTES = 1 << 20
ALLOWED_PREFIXES = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, checkpoint: Checkpoint, model_id: str, dht: hivemind.DHT) -> None:
        self.checkpoint, self.model_id, self.dht = checkpoint, model_id, dht
        self.config_json = (checkpoint.directory / "config.json").read_text()
        self.tokenizer_files = [name for name in TOKENIZER_FILES if (checkpoint.directory / name).is_file()]
        self.initial_peers = [str(addr) for addr in dht.get_visible_maddrs()]
        dtypes = {dtype for dtype, _ in checkpoint.specs.values()}
        self.torch_dtype = ",".join(sorted(dtypes))

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(
            model_id=self.model_id,
            config_json=self.config_json,
            num_blocks=self.checkpoint.config.num_hidden_layers,
            dht_initial_peers=self.initial_peers,
            tokenizer_files=self.tokenizer_files,
            torch_dtype=self.torch_dtype,
            total_bytes=self.checkpoint.total_bytes,
        )

    def SwarmStatus(self, request: pb.SwarmStatusRequest, context: grpc.ServicerContext) -> pb.SwarmMap:
        servers = find_servers(self.dht, self.model_id, self.checkpoint.config.num_hidden_layers)
        now = get_dht_time()
        peers = [
            pb.PeerRecord(
                peer_id=record.peer_id, address=record.address, start_block=record.start, end_block=record.end,
                state=record.state, throughput=record.throughput, device=record.device, dtype=record.dtype,
                quant=record.quant, expires_in=max(0.0, record.expires_at - now),
            )
            for record in sorted(servers.values(), key=lambda r: (r.start, r.end, r.peer_id))
        ]
        return pb.SwarmMap(model_id=self.model_id, num_blocks=self.checkpoint.config.num_hidden_layers, peers=peers)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        if request.model_id != self.model_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this coordinator serves model {self.model_id}, not {request.model_id!r}")
        bad = [p for p in request.tensor_prefixes if not p.startswith(ALLOWED_PREFIXES)]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tensor prefixes not served: {bad[:3]}")
        unknown = [name for name in request.file_names if name not in self.tokenizer_files]
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"files not served: {unknown[:3]}")
        for name in self.checkpoint.names_with_prefix(list(request.tensor_prefixes)):
            tensor = self.checkpoint.read([name])[name]
            yield from _chunks(name, tensor_bytes(tensor), is_file=False, dtype=DTYPE_NAMES[tensor.dtype],
                               shape=list(tensor.shape))
        for name in request.file_names:
            yield from _chunks(name, (self.checkpoint.directory / name).read_bytes(), is_file=True)


def _chunks(name: str, data: bytes, *, is_file: bool, dtype: str = "", shape: list[int] | None = None
            ) -> Iterator[pb.FetchChunk]:
    digest = hashlib.sha256(data).hexdigest()
    for offset in range(0, max(len(data), 1), CHUNK_BYTES):
        first, last = offset == 0, offset + CHUNK_BYTES >= len(data)
        yield pb.FetchChunk(
            name=name, is_file=is_file, dtype=dtype if first else "", shape=(shape or []) if first else [],
            total_bytes=len(data), offset=offset, data=data[offset:offset + CHUNK_BYTES], sha256=digest if last else "",
        )
