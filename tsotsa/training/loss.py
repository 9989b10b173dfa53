"""The causal-LM loss the coordinator trains and evaluates with, and anything else that scores a batch.

It is transformers' own rule (predict token t+1 at t, skip the ignored labels, compute in float32), so a
loss the swarm reports is the loss `LlamaForCausalLM(labels=...)` reports on the same weights and batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips: prompt tokens and padding


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """transformers' causal-LM loss: predict token t+1 at t, skip IGNORE_INDEX labels, in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of the loss over the label tokens, their count): eval losses are token-weighted over a whole set."""
    return causal_lm_loss(logits, labels, reduction="sum").item(), int((labels[:, 1:] != IGNORE_INDEX).sum())
