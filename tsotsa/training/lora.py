"""The LoRA adapters a run trains: their settings, their names in PEFT's format, and their seeded start.

Aggregation across replicas must be exact: the model applies ΔW = B·A, and averaging A's and B's separately
is not the mean of the replicas' ΔW. Every replica therefore starts from the same A, drawn from the run's
seed and the module's name (no peer needs any other peer's state or the whole model to draw it), and keeps
A frozen, training only B (FFA-LoRA). Then mean(B_i)·A is exactly the sample-weighted mean of B_i·A.
See docs/training.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from tsotsa.v1 import tsotsa_pb2 as pb

if TYPE_CHECKING:
    from peft import LoraConfig

DEFAULT_TARGETS = ("q_proj", "v_proj")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 1024  # a low-rank adapter; a larger rank is a mistake, and could exhaust a peer's memory
# A run names its adapter on every peer; peft refuses adapter names with a '.' (torch module names).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
PEFT_BLOCK_PREFIX = "base_model.model.model.layers."  # keys of PEFT's adapter_model.safetensors for LlamaForCausalLM


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"LoRA rank must be in 1..{MAX_RANK}, not {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:  # NaN fails this too
            raise ValueError(f"LoRA dropout must be in [0, 1), not {self.dropout}")
        unknown = [name for name in self.target_modules if name not in LLAMA_LINEARS]
        if unknown or not self.target_modules:
            shown = [name[:40] for name in unknown[:4]] if unknown else "(none)"  # a refusal must fit in a status
            raise ValueError(f"target modules {shown} are not Llama linears; choose from "
                             f"{', '.join(LLAMA_LINEARS)}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def peft_config(self, *, inference_mode: bool = False, base_model: str | None = None) -> "LoraConfig":
        from peft import LoraConfig  # here: the CLI reads these settings without loading peft and transformers

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          inference_mode=inference_mode, base_model_name_or_path=base_model)

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoraSettings":
        return cls(**{**data, "target_modules": tuple(data["target_modules"])})


@dataclass
class OptimizerSettings:
    """AdamW on each peer, over its own blocks' B matrices (the optimizer state never leaves the peer)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = field(default=(0.9, 0.999))
    eps: float = 1e-8

    def __post_init__(self) -> None:
        numbers = (self.lr, self.weight_decay, *self.betas, self.eps)
        if (not all(math.isfinite(x) for x in numbers) or not self.lr > 0 or self.weight_decay < 0
                or not all(0 <= beta < 1 for beta in self.betas) or not self.eps > 0):
            raise ValueError("optimizer settings need finite lr > 0, weight_decay >= 0, betas in [0, 1) and eps > 0")


def check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"bad run name {name[:80]!r}: letters, digits, '_', '-'; at most 64")


def lora_spec(lora: LoraSettings, optimizer: OptimizerSettings | None = None,
              gradient_checkpointing: bool = False) -> pb.LoraSpec:
    """The wire form of a run's adapter settings (and, for training, its optimizer's)."""
    spec = pb.LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules),
                       seed=lora.seed, gradient_checkpointing=gradient_checkpointing)
    if optimizer is not None:
        spec.lr, spec.weight_decay, spec.eps = optimizer.lr, optimizer.weight_decay, optimizer.eps
        spec.beta1, spec.beta2 = optimizer.betas
    return spec


def lora_from_spec(spec: pb.LoraSpec) -> LoraSettings:
    """ValueError for settings out of range: the wire is not trusted."""
    return LoraSettings(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=tuple(spec.target_modules),
                        seed=spec.seed)


def optimizer_from_spec(spec: pb.LoraSpec) -> OptimizerSettings:
    return OptimizerSettings(lr=spec.lr, weight_decay=spec.weight_decay, betas=(spec.beta1, spec.beta2), eps=spec.eps)


def adapter_key(block: int, module_path: str, part: str) -> str:
    """PEFT's saved name, e.g. base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight."""
    return f"{PEFT_BLOCK_PREFIX}{block}.{module_path}.{part}.weight"


def parse_adapter_key(key: str) -> tuple[int, str, str]:
    """(block, module path, 'lora_A'|'lora_B') of a key `adapter_key` made; ValueError for anything else."""
    if not key.startswith(PEFT_BLOCK_PREFIX) or not key.endswith(".weight"):
        raise ValueError(f"{key!r} is not a LoRA adapter tensor of a Llama block")
    block, rest = key[len(PEFT_BLOCK_PREFIX):-len(".weight")].split(".", 1)
    module_path, _, part = rest.rpartition(".")
    if not block.isdigit() or part not in ("lora_A", "lora_B") or module_path.rsplit(".", 1)[-1] not in LLAMA_LINEARS:
        raise ValueError(f"{key!r} is not a LoRA adapter tensor of a Llama block")
    return int(block), module_path, part


def initial_lora_a(seed: int, key: str, r: int, in_features: int) -> torch.Tensor:
    """A's start for one module: PEFT's own initialisation (kaiming-uniform, a=√5: U(±1/√in)), drawn from a
    generator seeded by the run's seed and the module's key, so every replica draws the same A alone. The
    generator's seed is the formula docs/training.md states (sha256 of "{seed}:{key}", 63 bits of it)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    a = torch.empty(r, in_features, dtype=torch.float32)
    return torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
