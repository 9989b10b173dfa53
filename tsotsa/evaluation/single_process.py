"""The `transformers` variant of `tsotsa eval compare`: the whole checkpoint in one process, what the swarm's
rows are compared with.

It runs as a child process of its own (`python -m tsotsa.evaluation.single_process SPEC OUT`) so that its
peak resident memory is that of one machine holding the whole model, not of the comparing process, and
its memory is returned when it ends. The tasks go through lm-eval's own `hf` backend (over the model as
loaded here, with PEFT's adapter for the adapter variants), the latency protocol through `transformers`'
`generate`.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def run(spec: dict) -> dict:
    """spec: model_dir, variants ([{name, adapter_dir or None}], the base first if it is one), device, dtype,
    threads, batch_size, tasks (EvalOptions' fields), protocol (LatencyProtocol's fields). The base model is
    loaded once; each adapter is loaded onto it in turn (as the swarm's peers serve them side by side)."""
    import logging

    from tsotsa.console import parse_dtype, quiet_libraries

    quiet_libraries()  # before bitsandbytes is imported (by peft, lm-eval): it warns at import
    import torch
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tsotsa.evaluation.latency import LatencyProtocol, TransformersGenerator, measure
    from tsotsa.evaluation.run import EvalOptions, evaluate

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str": it is on purpose here
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    options = EvalOptions(**{**spec["tasks"], "include_paths": [Path(p) for p in spec["tasks"]["include_paths"]]})
    protocol = LatencyProtocol(**{**spec["protocol"], "prompts": tuple(spec["protocol"]["prompts"])})
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=parse_dtype(spec["dtype"])).to(spec["device"])
    model.eval()
    layer = model.model.layers[0]
    block_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())  # before any adapter joins it
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = []
    for variant in spec["variants"]:
        adapter = variant.get("adapter_dir")
        if adapter and not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, adapter, adapter_name=variant["name"])
        elif adapter:
            model.load_adapter(adapter, adapter_name=variant["name"])
        if adapter:
            model.set_adapter(variant["name"])
            model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec["batch_size"])
        results = evaluate(lm, options)
        latency = measure(TransformersGenerator(model, pad), tokenizer, protocol, variant["name"])
        rows.append({"name": variant["name"], "results": results["results"], "latency": latency})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"variants": rows, "bytes_per_block": block_bytes, "num_blocks": model.config.num_hidden_layers,
            "peak_rss_bytes": peak, "dtype": spec["dtype"], "device": spec["device"]}


def main() -> int:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        result = run(json.loads(spec_path.read_text()))
    except Exception as error:  # the parent prints it as one line
        out_path.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return 1
    out_path.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
