"""What the HTTP API costs: decode tokens/s and time to first token through the OpenAI-compatible API
against `SwarmModel` called directly on the same swarm, with 1 and 8 concurrent streams, and one
`transformers` process as the baseline (as in bench/inference.py).

One loopback swarm: a coordinator serving the HTTP API (`--http-port`), --peers even spans. The API side
is the official `openai` client streaming `/v1/completions` (token-id prompts, `ignore_eos`, greedy); the
direct side is `SwarmModel.generate` in this process with an `on_tokens` clock. Per stream: time to first
token (request sent → first token received) and decode rate ((tokens - 1) / (last token - first token));
with 8 streams, the aggregate (all tokens / wall time of the batch) and the mean per stream. Each
configuration warms up once and runs --repeats times; the best run counts.

    .venv/bin/python bench/api.py                      # 8 blocks x 1024, fp32 on CPU, 2 peers
    .venv/bin/python bench/api.py --layers 4 --hidden 256 --intermediate 688 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import (add_decode_arguments, bench_parser, machine_load, parse_decode_args, report,
                    run_in_workdir)
from inference import LocalBaseline, load_local_model, make_prompt
from tsotsa.client.model import SwarmModel
from tsotsa.local_swarm import LocalSwarm
from tsotsa.spans import even_spans


@dataclass
class Stream:
    """One generation's timing."""

    ttft: float
    tok_s: float
    tokens: int


@dataclass
class Run:
    """One configuration's best repeat: its streams and its wall time."""

    name: str
    streams: list[Stream] = field(default_factory=list)
    wall: float = 0.0

    @property
    def aggregate(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall if self.wall else 0.0

    @property
    def per_stream(self) -> float:
        return statistics.mean(s.tok_s for s in self.streams)

    @property
    def ttft_ms(self) -> float:
        return 1000 * statistics.median(s.ttft for s in self.streams)


def direct_stream(model: SwarmModel, prompt: torch.Tensor, new_tokens: int) -> Stream:
    times: list[float] = []
    began = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1,
                   on_tokens=lambda tokens: times.append(time.perf_counter()))
    return _stream(began, times)


def api_stream(client, name: str, prompt: torch.Tensor, new_tokens: int) -> Stream:
    """Times each token's arrival. The benchmark model's ids mostly lie past its small tokenizer's vocabulary
    and decode to no text, and the API sends no empty text pieces, so the request asks for `logprobs=0`:
    every token then arrives in a chunk of its own, with its log-prob (one log-softmax per token more than
    the direct side computes, part of the overhead measured)."""
    times: list[float] = []
    began = time.perf_counter()
    chunks = client.completions.create(model=name, prompt=prompt[0].tolist(), max_tokens=new_tokens, temperature=0,
                                       stream=True, logprobs=0, extra_body={"ignore_eos": True})
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            times += [time.perf_counter()] * len(chunk.choices[0].logprobs.tokens)
    return _stream(began, times)


def _stream(began: float, times: list[float]) -> Stream:
    tok_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return Stream(ttft=times[0] - began if times else float("nan"), tok_s=tok_s, tokens=len(times))


def measure(name: str, one, prompts: list[torch.Tensor], repeats: int) -> Run:
    """Warm-up, then `repeats` runs of all `prompts` at once (one thread each); the best aggregate counts."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, prompts[:1]))
        best = Run(name)
        for _ in range(repeats):
            began = time.perf_counter()
            streams = list(pool.map(one, prompts))
            run = Run(name, streams, time.perf_counter() - began)
            if run.aggregate > best.aggregate:
                best = run
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint and caches", this_process_runs="baseline and client")
    add_decode_arguments(parser)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams of the second measurement")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    args = parse_decode_args(parser, argv)
    return args


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    import openai

    model_dir = build_or_reuse_model(args, workdir, torch.float32)
    local_model = load_local_model(model_dir, "cpu", torch.float32, "none")
    config = local_model.config
    prompts = [make_prompt(config.vocab_size, args.prompt_tokens, seed=i) for i in range(args.streams)]
    print(f"{describe_model(model_dir, config)}; cpu float32; {args.peers} peers; prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, best of {args.repeats}; load {machine_load()}", flush=True)
    baseline = LocalBaseline(local_model, prompts[0], args.new_tokens)
    for _ in range(args.repeats):
        baseline.run()
    swarm = stack.enter_context(LocalSwarm(model_dir, cache_dir=workdir / "cache", threads=args.threads, http=True))
    swarm.start_coordinator()
    swarm.add_peers(even_spans(config.num_hidden_layers, args.peers))
    model = stack.enter_context(SwarmModel.from_coordinator(swarm.coordinator_address,
                                                            cache_dir=workdir / "client-cache"))
    client = openai.OpenAI(base_url=f"{swarm.http_url}/v1", api_key="none", max_retries=0, timeout=600)
    name = client.models.list().data[0].id
    runs = {}
    for count in (1, args.streams):
        runs[f"direct_{count}"] = measure(f"SwarmModel, {count} stream(s)",
                                          lambda p: direct_stream(model, p, args.new_tokens), prompts[:count],
                                          args.repeats)
        print(f"direct x{count}: {runs[f'direct_{count}'].aggregate:.2f} tok/s", flush=True)
        runs[f"api_{count}"] = measure(f"HTTP API, {count} stream(s)",
                                       lambda p: api_stream(client, name, p, args.new_tokens), prompts[:count],
                                       args.repeats)
        print(f"api x{count}: {runs[f'api_{count}'].aggregate:.2f} tok/s", flush=True)
        baseline.run()
    return config, baseline.result, runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, local, runs = run_in_workdir(args, run_all)
    rows = [("configuration", "agg tok/s", "per stream", "TTFT ms", "vs direct", "vs local")]
    rows.append(("local (transformers), 1 stream", f"{local.tok_s:.2f}", f"{local.tok_s:.2f}", "-", "-", "1.00"))
    summary: dict = {"local_tok_s": round(local.tok_s, 3)}
    for key, run in runs.items():
        direct = runs[key.replace("api", "direct")]
        rows.append((run.name, f"{run.aggregate:.2f}", f"{run.per_stream:.2f}", f"{run.ttft_ms:.1f}",
                     f"{run.aggregate / direct.aggregate:.2f}", f"{run.aggregate / local.tok_s:.2f}"))
        summary[f"{key}_agg_tok_s"] = round(run.aggregate, 3)
        summary[f"{key}_stream_tok_s"] = round(run.per_stream, 3)
        summary[f"{key}_ttft_ms"] = round(run.ttft_ms, 2)
    for count in (1, args.streams):
        summary[f"api_overhead_{count}"] = round(runs[f"api_{count}"].aggregate / runs[f"direct_{count}"].aggregate, 4)
    summary.update({**model_summary(config), "peers": args.peers, "streams": args.streams,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "peer_threads": args.threads, "load_average_end": round(os.getloadavg()[0], 2)})
    report(rows, "vs direct: the API's aggregate over SwarmModel's on the same swarm and streams (1.00 = no "
                 f"overhead); load average at the end {machine_load()}", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
