"""Helpers comparing the swarm with `transformers` on the same checkpoint (the oracle)."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from tsotsa.client.model import GenerationStats, SwarmModel

PROMPTS = ["The swarm pools ordinary lab machines", "Once upon"]


def encode_prompts(model: SwarmModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(model.tokenizer(prompts, return_tensors="pt", padding=True))


def max_logit_difference(model: SwarmModel, reference: LlamaForCausalLM, prompts: list[str]) -> float:
    batch = encode_prompts(model, prompts)
    swarm_logits = model.forward(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        expected = reference(**batch).logits
    return (swarm_logits - expected)[batch["attention_mask"].bool()].abs().max().item()


def assert_greedy_matches(model: SwarmModel, reference: LlamaForCausalLM, prompts: list[str], new_tokens: int
                          ) -> GenerationStats:
    """Asserts the swarm's greedy tokens are transformers'; returns the call's statistics."""
    batch = encode_prompts(model, prompts)
    produced, stats = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new_tokens,
                                     return_stats=True)
    expected = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    assert produced.tolist() == expected.tolist()
    return stats
