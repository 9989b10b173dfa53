"""NF4 peers on the CPU against `transformers` + bitsandbytes NF4 on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from conftest import start_swarm
from oracle import PROMPTS, encode_prompts, max_logit_difference
from tsotsa.client.model import SwarmModel


@pytest.fixture(scope="module")
def model(tiny_model: Path, tmp_path_factory):
    swarm = start_swarm(tiny_model, ["0:3", "3:4"], "--quant", "nf4", cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        with SwarmModel.from_coordinator(swarm.coordinator_address,
                                         cache_dir=tmp_path_factory.mktemp("client")) as swarm_model:
            yield swarm_model
    finally:
        swarm.stop()


def test_nf4_logits_close_to_transformers_bitsandbytes(model: SwarmModel, tiny_model: Path) -> None:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(tiny_model, quantization_config=quantization, device_map="cpu")
    full_precision = LlamaForCausalLM.from_pretrained(tiny_model)
    assert max_logit_difference(model, reference, PROMPTS) <= 1e-4
    # ...and the comparison means something: NF4 is measurably different from fp32 on these weights.
    assert max_logit_difference(model, full_precision, PROMPTS) > 1e-3
    batch = encode_prompts(model, PROMPTS[:1])
    produced = model.generate(batch["input_ids"], max_new_tokens=16)
    assert produced.tolist() == reference.generate(batch["input_ids"], max_new_tokens=16, do_sample=False).tolist()
