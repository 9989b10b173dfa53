"""Runs a contiguous span of Llama decoder blocks, with or without a KV cache.

The blocks are transformers' own `LlamaDecoderLayer`, built from the checkpoint's config and loaded with
only this span's tensors; the causal/padding mask comes from transformers' `create_causal_mask` and the
rotary embeddings from `LlamaRotaryEmbedding`, so a span computes what the same layers compute inside
`LlamaForCausalLM` — the exactness of the swarm rests on that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from tsotsa.checkpoint import block_prefix, head_dim

QUANT_MODES = ("none", "nf4", "int8")


def even_spans(layers: int, parts: int) -> list[str]:
    """Contiguous spans covering [0, layers), sizes differing by at most one block (benchmarks' and
    `tsotsa eval compare`'s peers)."""
    if not 1 <= parts <= layers:
        raise ValueError(f"cannot split {layers} blocks into {parts} spans")
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return [f"{bounds[i]}:{bounds[i + 1]}" for i in range(parts)]


@dataclass(frozen=True)
class SpanSpec:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad span {self.start}:{self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def parse_span(text: str) -> SpanSpec:
    try:
        start, end = (int(part) for part in text.split(":"))
        return SpanSpec(start, end)
    except ValueError:
        raise ValueError(f"bad block span {text!r}; expected START:END with 0 <= START < END") from None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `transformers` generate() computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class BlockSpan(nn.Module):
    """Blocks [start, end) of a Llama model; layer j of the span is global block start + j."""

    def __init__(
        self,
        config: LlamaConfig,
        span: SpanSpec,
        tensors: dict[str, torch.Tensor],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quant: str = "none",
    ) -> None:
        super().__init__()
        if span.end > config.num_hidden_layers:
            raise ValueError(f"span {span} is outside the model's {config.num_hidden_layers} blocks")
        if quant not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quant!r}; expected one of {QUANT_MODES}")
        self.span, self.device, self.dtype, self.quant = span, torch.device(device), dtype, quant
        self.config = copy.deepcopy(config)
        self.config.num_hidden_layers = span.length  # the span's cache holds only its own layers
        self.config.layer_types = None
        if getattr(self.config, "_attn_implementation", None) is None:
            self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            layers = [LlamaDecoderLayer(self.config, layer_idx=j) for j in range(span.length)]
        self.layers = nn.ModuleList(layers)
        for j in range(span.length):
            prefix = block_prefix(span.start + j)
            state = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
            self.layers[j].load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        if quant != "none":
            for layer in self.layers:
                quantize_linears(layer, quant, dtype)
        self.to(self.device)
        self.rotary = LlamaRotaryEmbedding(config).to(self.device)
        self.eval()
        self.requires_grad_(False)

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the span's weights as held: parameters, buffers (the rotary tables) and the quantization
        state bitsandbytes keeps beside packed weights (NF4 absmax and code, int8 row scales), which torch
        does not count among the parameters (`tsotsa plan` predicts this figure). Not the LoRA adapters
        served on them: `adapter_bytes`."""
        tensors = [*(p for name, p in self.named_parameters() if ".lora_" not in name), *self.buffers()]
        for module in self.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            while state is not None:  # a nested (double-quantized) state keeps its own absmax and code
                tensors += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
                state = state.state2 if getattr(state, "nested", False) else None
            # int8 row scales: on the weight until the first forward, which moves them to the layer's state
            scales = getattr(weight, "SCB", None)
            if scales is None:
                scales = getattr(getattr(module, "state", None), "SCB", None)
            if isinstance(scales, torch.Tensor):
                tensors.append(scales)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def adapter_bytes(self) -> int:
        """Bytes of the LoRA adapters' tensors (A and B of every run served or training) on the span."""
        return sum(p.numel() * p.element_size() for name, p in self.named_parameters() if ".lora_" in name)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def cache_bytes(self, batch_size: int, max_length: int, blocks: int | None = None) -> int:
        """Bytes of keys and values that `max_length` tokens of `batch_size` sequences take in `blocks` of the
        span's blocks (default: all of them)."""
        per_token = 2 * self.config.num_key_value_heads * head_dim(self.config) * torch.empty((), dtype=self.dtype).element_size()
        return (blocks or self.span.length) * batch_size * max_length * per_token

    @torch.inference_mode()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        """`run_blocks` in inference mode: serving never records autograd."""
        return self.run_blocks(*args, **kwargs)

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Runs global blocks [start, end) (default: the whole span); training calls it with autograd on.

        `attention_mask` is the 2D padding mask of every token seen so far in the session, cached ones
        included ([batch, past + new]); `position_ids` are the new tokens' positions ([batch, new]).
        """
        start = self.span.start if start is None else start
        end = self.span.end if end is None else end
        first, last = start - self.span.start, end - self.span.start
        hidden_states = hidden_states.to(self.device, self.dtype)
        attention_mask = attention_mask.to(self.device)
        position_ids = position_ids.to(self.device)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=first if cache is not None else None,
        )
        position_embeddings = self.rotary(hidden_states, position_ids)
        for layer in self.layers[first:last]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden_states


def quantize_linears(module: nn.Module, quant: str, compute_dtype: torch.dtype) -> None:
    """Swaps every nn.Linear for its bitsandbytes counterpart; the weights quantize when moved to the device."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            weight = child.weight.data
            if quant == "nf4":
                replacement = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=False, device="meta",
                )
                replacement.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, quant_type="nf4", compress_statistics=False
                )
            else:
                replacement = bnb.nn.Linear8bitLt(  # threshold 6.0: LLM.int8() outliers, transformers' default
                    child.in_features, child.out_features, bias=child.bias is not None,
                    has_fp16_weights=False, threshold=6.0, device="meta",
                )
                replacement.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                replacement.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, replacement)
        else:
            quantize_linears(child, quant, compute_dtype)
