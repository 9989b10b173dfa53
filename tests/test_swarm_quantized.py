"""NF4 and int8 peers on the CPU against `transformers` + bitsandbytes on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from conftest import connect, start_swarm
from oracle import PROMPTS, encode_prompts, max_logit_difference

QUANTIZATION = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module", params=sorted(QUANTIZATION))
def quantized(request, tiny_model: Path, tmp_path_factory):
    quant = request.param
    swarm = start_swarm(tiny_model, ["0:3", "3:4"], "--quant", quant, cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        with connect(swarm, tmp_path_factory) as swarm_model:
            yield quant, swarm_model
    finally:
        swarm.stop()


def test_logits_and_tokens_match_transformers_bitsandbytes(quantized, tiny_model: Path) -> None:
    quant, model = quantized
    reference = LlamaForCausalLM.from_pretrained(tiny_model, quantization_config=QUANTIZATION[quant],
                                                 device_map="cpu")
    full_precision = LlamaForCausalLM.from_pretrained(tiny_model)
    assert max_logit_difference(model, reference, PROMPTS) <= 1e-4
    # ...and the comparison means something: the quantized model differs measurably from fp32.
    assert max_logit_difference(model, full_precision, PROMPTS) > 1e-4
    batch = encode_prompts(model, PROMPTS[:1])
    produced = model.generate(batch["input_ids"], max_new_tokens=16)
    assert produced.tolist() == reference.generate(batch["input_ids"], max_new_tokens=16, do_sample=False).tolist()
