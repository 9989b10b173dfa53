"""Which blocks a joining peer takes when it is not told: the contiguous span the swarm needs most."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import torch
from transformers import LlamaConfig

from tsotsa.checkpoint import head_dim
from tsotsa.records import ServerRecord, ServerState
from tsotsa.rpc import open_channel
from tsotsa.tls import TlsSettings
from tsotsa.spans import SpanSpec
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

# Bytes per weight in memory, by quantization (NF4 stores 4 bits plus one absmax per 64 weights).
BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 64}
MEMORY_FRACTION = 0.6  # of the memory free when the peer starts: what its blocks and KV cache may take
KV_SHARE = 0.2         # of that share: the KV-cache budget unless --cache-mib is given
MIN_CACHE_BYTES = 256 << 20
SESSION_TOKENS = 1024  # the session the default cap on sessions counts: one sequence of this many tokens
SESSION_CAP = (4, 128)  # bounds of the default cap on sessions (each holds a gRPC worker thread)


def block_parameter_count(config: LlamaConfig) -> int:
    attention = config.hidden_size * head_dim(config) * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return attention + mlp + 2 * config.hidden_size


def free_memory(device: str) -> int:
    """Bytes free for a peer now: the GPU's free memory on CUDA, else the RAM the kernel says is available."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def default_cache_bytes(free_bytes: float) -> int:
    """The KV-cache budget of a peer not given `--cache-mib`: KV_SHARE of its share of `free_bytes`, in whole
    MiB, at least MIN_CACHE_BYTES (15 GiB free: 1.8 GiB; 23 GiB: 2.76 GiB; 127 GiB: 15.2 GiB)."""
    return max(MIN_CACHE_BYTES, int(free_bytes * MEMORY_FRACTION * KV_SHARE) >> 20 << 20)


def default_max_sessions(cache_bytes: int, session_bytes: int) -> int:
    """The cap on sessions of a peer not given `--max-sessions`: as many sessions of `session_bytes` (one
    sequence of SESSION_TOKENS over the peer's blocks) as its budget holds, within SESSION_CAP. Shorter
    sessions reserve less, so more of them fit the bytes; the cap bounds the threads they hold."""
    low, high = SESSION_CAP
    return max(low, min(high, cache_bytes // max(1, session_bytes)))


def blocks_that_fit(config: LlamaConfig, quant: str, dtype: torch.dtype, device: str, reserve_bytes: int) -> int:
    """How many blocks this machine can hold next to `reserve_bytes` of KV cache, at least one."""
    per_weight = BYTES_PER_WEIGHT.get(quant, torch.empty((), dtype=dtype).element_size())
    per_block = block_parameter_count(config) * per_weight
    budget = free_memory(device) * MEMORY_FRACTION - reserve_bytes
    return max(1, min(config.num_hidden_layers, int(budget // per_block)))


PROBE_TIMEOUT = 3.0


def confirmed_servers(servers: list[ServerRecord], model_id: str, token: str | None,
                      timeout: float = PROBE_TIMEOUT, tls: TlsSettings | None = None) -> list[ServerRecord]:
    """The records whose peer answers `Info` as the record says (same peer, model and span), asked in parallel.

    A record outlives its peer by up to its ttl: a machine that just crashed, or was unplugged, still looks
    online in the DHT, and a peer choosing its span from that view would leave the dead peer's blocks
    uncovered. Records of peers still joining (no address yet) are kept as they are.
    """

    def answers(server: ServerRecord) -> bool:
        if not server.address:
            return server.state is ServerState.JOINING
        channel = open_channel(server.address, token, tls)
        try:
            info = pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        finally:
            channel.close()
        return (info.peer_id, info.model_id, info.start_block, info.end_block) == (
            server.peer_id, model_id, server.start, server.end)

    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(servers))) as pool:
        return [server for server, alive in zip(servers, pool.map(answers, servers)) if alive]


def coverage(servers: list[ServerRecord], num_blocks: int) -> list[float]:
    """Per block, the throughput of the peers that serve it (draining peers count for nothing).

    Peers still joining count with the median throughput of the others, so two machines joining at once
    do not both pile onto the same gap.
    """
    online = sorted(s.throughput for s in servers if s.state is ServerState.ONLINE and s.throughput > 0)
    nominal = online[len(online) // 2] if online else 1.0
    covered = [0.0] * num_blocks
    for server in servers:
        if server.state is ServerState.DRAINING:
            continue
        value = server.throughput if server.state is ServerState.ONLINE else nominal
        for index in range(max(0, server.start), min(num_blocks, server.end)):
            covered[index] += value
    return covered


def choose_span(servers: list[ServerRecord], num_blocks: int, length: int) -> SpanSpec:
    """The window of `length` blocks whose weakest block has the least throughput (ties: least in total,
    then the first)."""
    length = max(1, min(length, num_blocks))
    covered = coverage(servers, num_blocks)
    best = min(
        range(num_blocks - length + 1),
        key=lambda start: (min(covered[start:start + length]), sum(covered[start:start + length]), start),
    )
    return SpanSpec(best, best + length)
