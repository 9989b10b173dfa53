"""`tsotsa plan`: how a model's blocks fit on a lab's machines, worked out before anything is installed.

A lab chooses what to run (Llama-2-7B, 13B or 70B; fp16, NF4 or int8) and how many machines it needs from
numbers, not by starting peers until one runs out of memory. So the numbers here are the ones the running
code uses, not a second model of it:

* bytes per block are what a peer holds once `BlockSpan` has loaded and bitsandbytes has quantized the
  block (NF4: two weights per byte plus a float32 absmax per 64 weights and a 16-entry code table per
  layer; int8: one byte per weight plus a float32 scale per output row), counted from the config;
* the KV cache is what `BlockSpan.cache_bytes` reserves per session;
* the number of blocks a machine takes is what a peer started there without `--blocks` picks for itself
  (`tsotsa.peer.selection`: its per-weight estimate, its memory fraction and its KV-cache reserve), and
  the spans are placed by the peer's own `choose_span`, machines joining one after another.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig

from tsotsa.checkpoint import config_from_json, head_dim, load_config

# The published Llama-2 configs (meta-llama/Llama-2-*-hf config.json), so a lab can plan without a download.
BUILTIN_MODELS: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
}
LLAMA_2_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="float16")

NF4_BLOCKSIZE = 64   # bitsandbytes' default for Params4bit, which BlockSpan uses (compress_statistics=False)
NF4_CODE_ENTRIES = 16  # the NF4 code table every quantized layer keeps (float32)
# NF4 absmax bytes per 64-weight block: float32 as bitsandbytes quantizes (and a CUDA peer keeps); on the CPU,
# its first forward repacks the weights for its CPU kernels and keeps absmax in bfloat16.
NF4_ABSMAX_BYTES = {"cpu": 2, "cuda": 4}
MiB, GiB = 1 << 20, 1 << 30
_UNITS = {"mib": MiB, "gib": GiB, "tib": 1 << 40, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def load_model_config(model: str) -> tuple[str, LlamaConfig]:
    """A built-in name, a checkpoint directory or a config.json path → (display name, config)."""
    if model.lower() in BUILTIN_MODELS:
        return model.lower(), LlamaConfig(**BUILTIN_MODELS[model.lower()], **LLAMA_2_COMMON)
    path = Path(model)
    if path.is_dir():
        return path.name, load_config(path)
    if path.is_file():
        return path.parent.name or path.name, config_from_json(path.read_text(), origin=str(path))
    raise ValueError(f"--model {model}: not a checkpoint directory, a config.json or a known model "
                     f"({', '.join(BUILTIN_MODELS)})")


def parse_size(text: str) -> int:
    """'16GiB', '24GB', '512MiB' → bytes (binary and decimal units both, since vendors use either)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text!r}; expected a number and a unit, e.g. 16GiB or 24GB "
                         f"(units: MiB, GiB, TiB, MB, GB, TB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_machines(text: str) -> list[int]:
    """'8x16GiB,2x24GiB' → the memory of each machine, in bytes (ten entries here)."""
    machines: list[int] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        count, _, size = entry.rpartition("x") if re.match(r"^\d+\s*x", entry) else ("1", "", entry)
        try:
            if int(count) < 1:
                raise ValueError("a count of machines must be at least 1")
            machines += [parse_size(size)] * int(count)
        except ValueError as error:
            raise ValueError(f"bad --machines entry {entry!r}: {error}") from None
    if not machines:
        raise ValueError(f"bad --machines {text!r}; expected COUNTxSIZE entries, e.g. 8x16GiB,2x24GiB")
    return machines


def gib(count: float) -> str:
    return f"{count / GiB:.2f} GiB"


@dataclass(frozen=True)
class BlockBytes:
    """One transformer block in memory, as a peer holds it."""

    weights: int     # the seven projections: dense, or bitsandbytes' packed/int8 storage
    statistics: int  # quantization state beside the weights (NF4 absmax and code, int8 row scales)
    norms: int       # the two RMSNorm weights
    biases: int      # projections' biases (none in Llama-2)

    @property
    def total(self) -> int:
        return self.weights + self.statistics + self.norms + self.biases

    @property
    def parameters(self) -> int:
        """What torch counts as the block's parameters; bitsandbytes keeps the statistics beside them
        (`BlockSpan.parameter_bytes`, and so `PeerInfo.parameter_bytes_held`, counts `total`)."""
        return self.weights + self.norms + self.biases


def linear_shapes(config: LlamaConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of q, k, v, o (grouped-query: k and v have kv_heads heads) and gate, up, down."""
    hidden, heads, kv_heads, dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                    head_dim(config))
    inter = config.intermediate_size
    return [(heads * dim, hidden), (kv_heads * dim, hidden), (kv_heads * dim, hidden), (hidden, heads * dim),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def block_bytes(config: LlamaConfig, quant: str, dtype: torch.dtype, device: str = "cuda") -> BlockBytes:
    """One block on a peer of `device` ("cpu" or "cuda": bitsandbytes keeps NF4 statistics differently)."""
    size = torch.empty((), dtype=dtype).element_size()
    absmax = NF4_ABSMAX_BYTES[device_kind(device)]
    shapes = linear_shapes(config)
    if quant == "nf4":
        weights = sum((o * i + 1) // 2 for o, i in shapes)
        statistics = sum(math.ceil(o * i / NF4_BLOCKSIZE) * absmax + NF4_CODE_ENTRIES * 4 for o, i in shapes)
    elif quant == "int8":
        weights, statistics = sum(o * i for o, i in shapes), sum(o * 4 for o, _ in shapes)
    elif quant == "none":
        weights, statistics = sum(o * i for o, i in shapes) * size, 0
    else:
        raise ValueError(f"unknown --quant {quant!r}; expected none, nf4 or int8")
    biases = 0
    if getattr(config, "attention_bias", False):
        biases += sum(o for o, _ in shapes[:4]) * size
    if getattr(config, "mlp_bias", False):
        biases += sum(o for o, _ in shapes[4:]) * size
    return BlockBytes(weights, statistics, 2 * config.hidden_size * size, biases)


def device_kind(device: str) -> str:
    kind = device.split(":")[0]
    if kind not in NF4_ABSMAX_BYTES:
        raise ValueError(f"unknown --device {device!r}; expected cpu or cuda")
    return kind


def span_buffer_bytes(config: LlamaConfig) -> int:
    """The rotary-embedding tables one span keeps beside its blocks, whatever its length (BlockSpan.rotary)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    return sum(b.numel() * b.element_size() for b in rotary.buffers())


def checkpoint_dtype(config: LlamaConfig) -> torch.dtype:
    """The dtype the checkpoint stores (its config's `dtype`), in which clients and the coordinator keep the head."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def head_bytes(config: LlamaConfig) -> int:
    """Embeddings, final norm and LM head (one matrix when tied), as `ModelHead` holds them."""
    matrices = 1 if config.tie_word_embeddings else 2
    elements = matrices * config.vocab_size * config.hidden_size + config.hidden_size
    return elements * torch.empty((), dtype=checkpoint_dtype(config)).element_size()


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in one block: 2 × kv_heads × head_dim × bytes (BlockSpan.cache_bytes)."""
    return 2 * config.num_key_value_heads * head_dim(config) * torch.empty((), dtype=dtype).element_size()


def estimated_block_bytes(config: LlamaConfig, quant: str, dtype: torch.dtype) -> float:
    """The peer's own estimate of a block's bytes (`tsotsa.peer.selection`), by which it decides how many to take."""
    from tsotsa.peer.selection import BYTES_PER_WEIGHT, block_parameter_count

    return block_parameter_count(config) * BYTES_PER_WEIGHT.get(quant, torch.empty((), dtype=dtype).element_size())


def peer_blocks(config: LlamaConfig, quant: str, dtype: torch.dtype, free_bytes: float, cache_bytes: int) -> int:
    """How many blocks a peer takes with `free_bytes` free: `tsotsa.peer.selection.blocks_that_fit`'s rule on a
    given amount of memory (it reads the machine's own), except that a machine too small for one block gets 0
    here where the peer would still try one."""
    from tsotsa.peer.selection import MEMORY_FRACTION

    budget = free_bytes * MEMORY_FRACTION - cache_bytes
    return max(0, min(config.num_hidden_layers, int(budget // estimated_block_bytes(config, quant, dtype))))


def fit_machine(config: LlamaConfig, quant: str, dtype: torch.dtype, free_bytes: float, cache_bytes: int,
                session_bytes_per_block: int) -> tuple[int, int, int | None]:
    """(blocks, KV budget, --num-blocks or None) for one machine whose every block must hold
    `session_bytes_per_block` of sessions' cache. With the default budget the peer's own pick stands; when
    that budget is too small, the most blocks whose weights and sessions fit together in the peer's share of
    memory, the budget they need, and `--num-blocks` where the peer given that budget would pick otherwise."""
    from tsotsa.peer.selection import MEMORY_FRACTION

    blocks = peer_blocks(config, quant, dtype, free_bytes, cache_bytes)
    if session_bytes_per_block * blocks <= cache_bytes:
        return blocks, cache_bytes, None
    per_block = estimated_block_bytes(config, quant, dtype) + session_bytes_per_block
    blocks = min(config.num_hidden_layers, int(free_bytes * MEMORY_FRACTION // per_block))

    def budget_for(count: int) -> int:
        return max(cache_bytes, math.ceil(session_bytes_per_block * count / MiB) * MiB)

    while blocks and peer_blocks(config, quant, dtype, free_bytes, budget_for(blocks)) < blocks:
        blocks -= 1  # the budget's rounding up to whole MiB took the last block's room
    own_pick = peer_blocks(config, quant, dtype, free_bytes, budget_for(blocks))
    return blocks, budget_for(blocks), (blocks if blocks and own_pick != blocks else None)


@dataclass
class MachinePlan:
    memory: int
    blocks: int = 0          # what a peer there takes; 0: too small for one block
    start: int = 0
    end: int = 0
    cache_bytes: int = 0     # its KV-cache budget (--cache-mib)
    default_cache_bytes: int = 0  # the budget a peer there takes unless given --cache-mib
    weight_bytes: int = 0    # its blocks and their span's rotary tables
    sessions: int = 0        # sessions of max_length its budget holds
    num_blocks: int | None = None  # --num-blocks to give the peer, where its own pick would differ
    replica: bool = False    # joined when its span was already served: a second copy, for throughput
    needed: bool = False     # among the fewest machines (largest first) that hold every block


@dataclass
class Plan:
    model: str
    quant: str
    dtype: str
    blocks: int
    max_length: int
    block: BlockBytes
    span_buffer_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_block: int
    kv_bytes_per_session: int
    reserve_bytes: int
    machines: list[MachinePlan] = field(default_factory=list)

    @property
    def needed(self) -> list[MachinePlan]:
        return [m for m in self.machines if m.needed]

    def as_json(self) -> dict:
        return {"model": self.model, "quant": self.quant, "dtype": self.dtype, "blocks": self.blocks,
                "max_length": self.max_length, "block_bytes": self.block.total,
                "block_parameter_bytes": self.block.parameters, "block": asdict(self.block),
                "span_buffer_bytes": self.span_buffer_bytes, "model_block_bytes": self.blocks * self.block.total,
                "head_bytes": self.head_bytes, "kv_bytes_per_token_per_block": self.kv_bytes_per_token_per_block,
                "kv_bytes_per_session": self.kv_bytes_per_session, "reserve_bytes": self.reserve_bytes,
                "machines_needed": len(self.needed), "machines": [asdict(m) for m in self.machines]}


def plan_swarm(model: str, quant: str, dtype: torch.dtype, machines: list[int], *, max_length: int | None = None,
               sessions: int = 1, reserve_bytes: int = GiB, cache_bytes: int | None = None,
               device: str = "cuda") -> Plan:
    """The plan for `machines` (memory in bytes each): largest first, each as a peer joining after the others.

    `reserve_bytes` is what the OS, the runtime (the CUDA context on a GPU) and anything else leave in use
    when the peer starts; `cache_bytes` the peers' KV-cache budget (`--cache-mib`; None: each peer's own
    default, `tsotsa.peer.selection.default_cache_bytes` of its free memory), raised on a machine where
    `sessions` sessions of `max_length` tokens need more (the peer then takes fewer blocks, and is given that
    budget). Raises ValueError saying how much memory is missing when the blocks do not fit.
    """
    from tsotsa.peer.selection import choose_span, default_cache_bytes
    from tsotsa.records import ServerRecord, ServerState

    name, config = load_model_config(model)
    layers = config.num_hidden_layers
    max_length = max_length or config.max_position_embeddings
    per_token = kv_bytes_per_token(config, dtype)
    plan = Plan(name, quant, str(dtype).removeprefix("torch."), layers, max_length,
                block_bytes(config, quant, dtype, device),
                span_buffer_bytes(config), head_bytes(config), per_token, layers * max_length * per_token,
                reserve_bytes)
    for memory in sorted(machines, reverse=True):
        free = max(0, memory - reserve_bytes)
        own = default_cache_bytes(free)
        blocks, budget, num_blocks = fit_machine(config, quant, dtype, free, own if cache_bytes is None else cache_bytes,
                                                 sessions * max_length * per_token)
        plan.machines.append(MachinePlan(memory, blocks, cache_bytes=budget, default_cache_bytes=own,
                                         num_blocks=num_blocks))

    records: list[ServerRecord] = []
    covered = [False] * layers
    for machine in (m for m in plan.machines if m.blocks):
        span = choose_span(records, layers, machine.blocks)
        machine.replica = all(covered[span.start:span.end])
        machine.needed = not all(covered)
        covered[span.start:span.end] = [True] * span.length
        records.append(ServerRecord(peer_id=str(len(records)), address="planned", start=span.start, end=span.end,
                                    state=ServerState.ONLINE, throughput=1.0))
        machine.start, machine.end = span.start, span.end
        machine.weight_bytes = span.length * plan.block.total + plan.span_buffer_bytes
        machine.sessions = machine.cache_bytes // (max_length * per_token * span.length)
    if not all(covered):
        raise ValueError(missing_memory(plan, config, dtype, covered.count(False), cache_bytes, sessions))
    return plan


def missing_memory(plan: Plan, config: LlamaConfig, dtype: torch.dtype, missing: int, cache_bytes: int | None,
                   sessions: int) -> str:
    """What to add when the blocks do not fit: the one extra machine that would hold the rest, as a peer
    there would count it, and how many more machines like the largest."""
    from tsotsa.peer.selection import KV_SHARE, MEMORY_FRACTION

    weights = missing * estimated_block_bytes(config, plan.quant, dtype)
    needed = sessions * plan.max_length * plan.kv_bytes_per_token_per_block * missing
    if cache_bytes is None:  # the peer's own budget grows with the machine: KV_SHARE of its share
        share = max(weights / (1 - KV_SHARE), weights + needed)
    else:
        share = weights + max(cache_bytes, needed)
    extra = plan.reserve_bytes + share / MEMORY_FRACTION
    largest = plan.machines[0]
    held = plan.blocks - missing
    like_largest = f", or {math.ceil(missing / largest.blocks)} more like the largest ({gib(largest.memory)})" \
        if largest.blocks else ""
    return (f"the machines hold {held} of {plan.model}'s {plan.blocks} blocks ({plan.quant}, {plan.dtype}): the other "
            f"{missing} need about {gib(extra)} more memory (one more machine of at least {gib(extra)}"
            f"{like_largest})")


def format_plan(plan: Plan) -> str:
    """The plan as a terminal reads it: the sizes, then one line per machine with its flags."""
    b = plan.block
    lines = [
        f"{plan.model}: {plan.blocks} blocks, {plan.dtype if plan.quant == 'none' else plan.quant} weights, "
        f"{plan.dtype} compute and KV cache",
        f"  per block      {gib(b.total)}  ({b.total:,} bytes: weights {b.weights:,}, quantization statistics "
        f"{b.statistics:,}, norms {b.norms:,}{f', biases {b.biases:,}' if b.biases else ''})",
        f"  all blocks     {gib(plan.blocks * b.total)}  (+ {plan.span_buffer_bytes:,} bytes of rotary tables "
        f"per span)",
        f"  head           {gib(plan.head_bytes)}  ({plan.head_bytes:,} bytes: embeddings, final norm, LM head; held "
        f"by every client and the coordinator)",
        f"  KV per session {gib(plan.kv_bytes_per_session)}  ({plan.kv_bytes_per_session:,} bytes for "
        f"{plan.max_length} tokens: {plan.kv_bytes_per_token_per_block:,} per token per block)",
        f"machines (largest first; each after a {gib(plan.reserve_bytes)} reserve for the OS and runtime, as a peer "
        f"joining without --blocks would pick):",
    ]
    for index, m in enumerate(plan.machines, 1):
        if not m.blocks:
            lines.append(f"  {index:>2}. {gib(m.memory):>11}  too small: not one block next to a "
                         f"{m.cache_bytes // MiB} MiB KV-cache budget")
            continue
        role = "replica" if m.replica else "needed"
        flags = (f" --cache-mib {m.cache_bytes // MiB}" if m.cache_bytes != m.default_cache_bytes else "") + (
            f" --num-blocks {m.num_blocks}" if m.num_blocks else "")
        lines.append(f"  {index:>2}. {gib(m.memory):>11}  blocks {m.start:>2}:{m.end:<2} ({m.blocks:>2})  weights "
                     f"{gib(m.weight_bytes)}  KV budget {m.cache_bytes // MiB} MiB ({m.sessions} "
                     f"session{'s' if m.sessions != 1 else ''})  {role}"
                     f"{'  flags:' + flags if flags else ''}")
    needed = plan.needed
    sizes: dict[int, int] = {}
    for m in needed:
        sizes[m.memory] = sizes.get(m.memory, 0) + 1
    lines.append(f"needed: {len(needed)} machine{'s' if len(needed) != 1 else ''} "
                 f"({', '.join(f'{n}x{gib(size)}' for size, n in sizes.items())}) to hold all {plan.blocks} blocks"
                 f"{'; the others add replicas' if len(needed) < len(plan.machines) else ''}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.as_json())
