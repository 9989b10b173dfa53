"""The model's ends: token embeddings in, final norm and LM head out. Clients and the coordinator hold
these; the blocks in between live in the swarm."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class ModelHead(nn.Module):
    """Frozen: fine-tuning trains only the blocks' adapters, and gradients flow through the head to them."""

    def __init__(self, config: LlamaConfig, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        super().__init__()
        embed = tensors["model.embed_tokens.weight"]
        self.dtype = embed.dtype
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.weight = nn.Parameter(tensors["model.norm.weight"], requires_grad=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = nn.Parameter(tensors.get("lm_head.weight", embed), requires_grad=False)
        self.to(device)
        self.device = torch.device(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids.to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.device, self.dtype)))
