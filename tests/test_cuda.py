"""CUDA peers (fp32, NF4, bf16) against `transformers` on the same GPU. Skipped where torch sees no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

from conftest import connect, start_swarm
from oracle import PROMPTS
from tsotsa.client.model import SwarmModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def batch(gqa_sharded_model: Path) -> dict[str, torch.Tensor]:
    return dict(AutoTokenizer.from_pretrained(gqa_sharded_model)(PROMPTS, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def cuda_swarm(gqa_sharded_model: Path, tmp_path_factory):
    """Starts a swarm of two CUDA peers with the given peer flags; all are stopped with the module."""
    started = []

    def start(*peer_args: str) -> SwarmModel:
        swarm = start_swarm(gqa_sharded_model, ["0:3", "3:8"], "--device", "cuda", *peer_args,
                            cache_dir=tmp_path_factory.mktemp("cache"))
        started.append(swarm)
        return connect(swarm, tmp_path_factory, device="cuda")

    yield start
    for swarm in started:
        swarm.stop()


def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, SwarmModel):
            return model.forward(batch["input_ids"], batch["attention_mask"]).float().cpu()
        return model(**{k: v.cuda() for k, v in batch.items()}).logits.float().cpu()


def max_difference(a: torch.Tensor, b: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    return (a - b)[batch["attention_mask"].bool()].abs().max().item()


def greedy(model, batch: dict[str, torch.Tensor], new_tokens: int = 16) -> list[list[int]]:
    if isinstance(model, SwarmModel):
        return model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new_tokens).tolist()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    return model.generate(**cuda_batch, max_new_tokens=new_tokens, do_sample=False).cpu().tolist()


def test_fp32_cuda_peers_match_transformers(cuda_swarm, gqa_sharded_model: Path, batch) -> None:
    with cuda_swarm("--dtype", "float32") as model:
        reference = LlamaForCausalLM.from_pretrained(gqa_sharded_model).cuda().eval()
        assert max_difference(logits_of(model, batch), logits_of(reference, batch), batch) <= 1e-4
        assert greedy(model, batch) == greedy(reference, batch)


def test_nf4_cuda_peers_match_transformers_bitsandbytes(cuda_swarm, gqa_sharded_model: Path, batch) -> None:
    with cuda_swarm("--quant", "nf4") as model:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        reference = LlamaForCausalLM.from_pretrained(gqa_sharded_model, quantization_config=quantization,
                                                     device_map="cuda")
        assert max_difference(logits_of(model, batch), logits_of(reference, batch), batch) <= 1e-3
        assert greedy(model, batch) == greedy(reference, batch)


def test_bf16_cuda_peers_as_close_to_fp32_as_transformers_bf16(cuda_swarm, gqa_sharded_model: Path, batch) -> None:
    with cuda_swarm("--dtype", "bfloat16") as model:
        full = logits_of(LlamaForCausalLM.from_pretrained(gqa_sharded_model).cuda().eval(), batch)
        bf16 = logits_of(LlamaForCausalLM.from_pretrained(gqa_sharded_model, dtype=torch.bfloat16).cuda().eval(),
                         batch)
        # bf16 rounding depends on kernels: judge the swarm by how far transformers' own bf16 is from fp32.
        budget = max_difference(bf16, full, batch)
        assert max_difference(logits_of(model, batch), full, batch) <= 2 * budget + 1e-3
