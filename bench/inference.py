"""Decode throughput of the swarm against one `transformers` process on the same weights.

Builds (or reuses, --model) a random-weight Llama checkpoint, then measures greedy decode tokens/s of
  * `LlamaForCausalLM.generate` in this process (the baseline every swarm number is divided by), and
  * `SwarmModel.generate` through N loopback peers (N from --peers, contiguous even spans),
and prints, per configuration: tok/s, the ratio to the baseline, wire bytes per generated token and the
latency one hop adds. The last line is one JSON object, for scripts.

Decode rate = (new tokens - 1) / (time of the last token - time of the first token): the prefill (the
prompt's forward and the first token) is excluded for both sides, the same definition as the
`GenerationStats.tokens_per_s` that `SwarmModel.generate(..., return_stats=True)` reports. Each
configuration runs once to warm up, then --repeats times, and the best run counts (the least disturbed by the rest of the machine). The baseline
runs --repeats times first and once more after every swarm run: on a shared machine, load that comes and
goes then hits both sides alike (without this, one busy minute made the baseline look 3x slower).

    .venv/bin/python bench/inference.py                      # 8 blocks x 1024, fp32 on CPU, 2 and 4 peers
    .venv/bin/python bench/inference.py --layers 4 --hidden 256 --intermediate 688 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import (add_decode_arguments, bench_parser, counts, machine_load, parse_decode_args, report,
                    run_in_workdir, running_peers, start_swarm)
from tsotsa.client.model import SwarmModel
from tsotsa.client.session import StepInputs
from tsotsa.codec import encode
from tsotsa.console import DTYPE_NAMES, parse_dtype
from tsotsa.local_swarm import LocalSwarm
from tsotsa.spans import QUANT_MODES, even_spans
from tsotsa.v1 import tsotsa_pb2 as pb

# Per message on an established stream: gRPC's 5-byte length prefix and HTTP/2's 9-byte DATA frame
# header. Flow-control frames (WINDOW_UPDATE, PING) are occasional and not counted.
GRPC_FRAMING_BYTES = 5 + 9
FIRST_REGULAR_TOKEN = 3  # ids 0..2 are <unk>, <s>, </s> in tiny_model's tokenizer


# ------------------------------------------------------------------------------------------- measuring


class TokenClock:
    """Timestamps every new token as it is chosen.

    It is both a `transformers` streamer (put/end; its first put is the prompt, which is skipped) and
    `SwarmModel.generate`'s `on_tokens` callback, so both sides are timed at the same point of their loop.
    """

    def __init__(self, skip_first: bool) -> None:
        self._skip = skip_first
        self.times: list[float] = []

    def put(self, tokens: torch.Tensor) -> None:
        now = time.perf_counter()
        if self._skip:
            self._skip = False
            return
        self.times.append(now)

    __call__ = put

    def end(self) -> None:
        pass

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, over the time since the first one: the prefill is left out."""
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


@dataclass
class Measurement:
    """The best of several runs of one configuration."""

    name: str
    tok_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    stable: bool = True        # every repeat produced the same tokens
    hops: int = 0
    reported_tok_s: float = 0.0  # SwarmModel's own GenerationStats, as a cross-check

    def add(self, tok_s: float, tokens: list[int]) -> None:
        if self.tokens and tokens != self.tokens:
            self.stable = False
        self.tokens = self.tokens or tokens
        self.tok_s = max(self.tok_s, tok_s)

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.tok_s if self.tok_s else float("inf")


# ------------------------------------------------------------------------------------------- the model


def make_prompt(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random regular token ids [1, length]: a random model makes no use of real text anyway."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_REGULAR_TOKEN, vocab, (1, length), generator=generator)


def load_local_model(model_dir: Path, device: str, dtype: torch.dtype, quant: str):
    """`LlamaForCausalLM` with the peers' settings; quantized blocks go through the peers' own quantizer
    (tsotsa.spans), so both sides hold bit-identical weights and greedy tokens stay comparable."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if quant != "none":
        from tsotsa.spans import quantize_linears

        for layer in model.model.layers:
            quantize_linears(layer, quant, dtype)
    return model.to(device).eval()


# -------------------------------------------------------------------------------------------- the runs


class LocalBaseline:
    """Single-process `generate`, runnable one repeat at a time so its runs can be interleaved with the
    swarm's: on a shared machine background load then hits both sides alike instead of favouring one.
    min_new_tokens keeps EOS from cutting a run short."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int) -> None:
        self.model = model
        self.prompt_length = prompt.shape[1]
        self.device = str(next(model.parameters()).device)  # the swarm's client head runs there too
        self.input_ids = prompt.to(self.device)
        self.kwargs = dict(attention_mask=torch.ones_like(self.input_ids), do_sample=False, pad_token_id=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        self.result = Measurement("local (transformers)")
        self._generate(max_new_tokens=4, min_new_tokens=4)  # warm-up

    @torch.inference_mode()
    def _generate(self, **overrides) -> torch.Tensor:
        return self.model.generate(self.input_ids, **{**self.kwargs, **overrides})

    def run(self) -> float:
        clock = TokenClock(skip_first=True)
        output = self._generate(streamer=clock)
        self.result.add(clock.decode_tokens_per_s, output[0, self.prompt_length:].tolist())
        return clock.decode_tokens_per_s


def measure_swarm(swarm: LocalSwarm, peers: int, layers: int, peer_args: list[str], prompt: torch.Tensor,
                  new_tokens: int, repeats: int, cache_dir: Path, wire_dtype: torch.dtype,
                  local: LocalBaseline) -> Measurement:
    """Starts `peers` peers, generates through them, and stops them again (even when generation fails).
    A local run follows every swarm run (see LocalBaseline).

    A fresh client per configuration, so its DHT view and channels hold only this configuration's peers
    (the previous ones announced `draining` when stopped, and routes skip draining peers).
    eos_token_id=-1 plays the role of min_new_tokens: every run yields exactly `new_tokens` tokens.
    """
    with running_peers(swarm, even_spans(layers, peers), *peer_args), \
            SwarmModel.from_coordinator(swarm.coordinator_address, cache_dir=cache_dir,
                                        wire_dtype=wire_dtype, device=local.device) as model:
        return timed_runs(model, f"swarm, {peers} peers", prompt, new_tokens, repeats, local)[0]


def timed_runs(model: SwarmModel, name: str, prompt: torch.Tensor, new_tokens: int, repeats: int,
               local: LocalBaseline) -> tuple[Measurement, int]:
    """A warm-up generation (channels, streams, caches), then `repeats` timed ones, a local run after each;
    the measurement and the spot checks the swarm's client made."""
    model.generate(prompt, max_new_tokens=4, eos_token_id=-1)
    result, checks = Measurement(name), 0
    for _ in range(repeats):
        clock = TokenClock(skip_first=False)
        output, stats = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1, on_tokens=clock,
                                       return_stats=True)
        result.add(clock.decode_tokens_per_s, output[0, prompt.shape[1]:].tolist())
        result.hops, checks = stats.hops, checks + stats.checks
        result.reported_tok_s = max(result.reported_tok_s, stats.tokens_per_s)
        local.run()
    return result, checks


# ----------------------------------------------------------------------------------- derived figures


def wire_bytes_per_hop(hidden_size: int, wire_dtype: torch.dtype, cache_length: int) -> int:
    """Bytes one decode step moves over one hop, both directions, built with the client's own message code
    (`StepInputs.to_message`, what `InferenceSession.step` sends) and the peer's reply layout, so a change
    of wire dtype, codec or fields in the core shows up here without editing this file."""
    hidden = torch.zeros(1, 1, hidden_size)
    positions = torch.tensor([[cache_length - 1]])
    session_id = uuid.uuid4().hex
    request = pb.InferenceRequest(session_id=session_id,
                                  step=StepInputs(hidden, None, positions).to_message(wire_dtype))
    reply = pb.InferenceResponse(session_id=session_id, hidden_states=encode(hidden, wire_dtype),
                                 cache_length=cache_length)
    return request.ByteSize() + reply.ByteSize() + 2 * GRPC_FRAMING_BYTES


def hop_latency_ms(local: Measurement, swarm: Measurement) -> float:
    """What one hop adds to a token, in ms.

    The swarm computes exactly what the baseline computes (the same blocks, the same head, on the same
    cores), so the extra time per token is what the hops add: serialization, gRPC round trips, thread and
    process wake-ups, and contention with the swarm's idle processes. Dividing by the hops gives the cost
    of one hop. It is an end-to-end figure, not a ping: it includes everything a real hop costs here.
    """
    if not swarm.hops or not swarm.tok_s or not local.tok_s:
        return float("nan")
    return (swarm.ms_per_token - local.ms_per_token) / swarm.hops


# ------------------------------------------------------------------------------------------- reporting


def table(local: Measurement, swarms: dict[int, Measurement], wire: dict[int, int],
          latency: dict[int, float]) -> list[tuple[str, ...]]:
    rows = [("configuration", "tok/s", "ms/tok", "vs local", "wire B/tok", "hop ms", "tokens")]
    rows.append((local.name, f"{local.tok_s:.2f}", f"{local.ms_per_token:.1f}", "1.00", "-", "-", "reference"))
    for peers, run in swarms.items():
        same = "match" if run.tokens == local.tokens else "DIFFER"
        rows.append((f"{run.name} ({run.hops} hops)", f"{run.tok_s:.2f}", f"{run.ms_per_token:.1f}",
                     f"{run.tok_s / local.tok_s:.2f}", str(wire[peers]), f"{latency[peers]:.2f}", same))
    return rows


def summary(args: argparse.Namespace, config, local: Measurement, swarms: dict[int, Measurement],
            wire: dict[int, int], latency: dict[int, float]) -> dict:
    """The JSON line: unsuffixed wire/latency keys describe the first --peers configuration."""
    first = next(iter(swarms))
    result: dict = {"local_tok_s": round(local.tok_s, 3)}
    for peers, run in swarms.items():
        result[f"swarm{peers}_tok_s"] = round(run.tok_s, 3)
        result[f"ratio_{peers}"] = round(run.tok_s / local.tok_s, 4)
        result[f"wire_bytes_per_token_{peers}"] = wire[peers]
        result[f"hop_latency_ms_{peers}"] = round(latency[peers], 3)
        result[f"tokens_match_{peers}"] = run.tokens == local.tokens
    result.update({
        "wire_bytes_per_token": wire[first],
        "hop_latency_ms": round(latency[first], 3),
        "tokens_match": all(run.tokens == local.tokens for run in swarms.values()),
        "repeats_stable": local.stable and all(run.stable for run in swarms.values()),
        **model_summary(config),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "device": args.device, "dtype": args.dtype, "quant": args.quant,
        "peer_threads": args.threads, "client_threads": torch.get_num_threads(),
        "load_average_end": round(os.getloadavg()[0], 2),
    })
    return result


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint and caches", this_process_runs="baseline and client")
    add_decode_arguments(parser, new_tokens=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], for the baseline and the peers")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    parser.add_argument("--quant", choices=QUANT_MODES, default="none")
    parser.add_argument("--peers", default="2,4", help="comma-separated peer counts to run")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per peer (a pipeline computes on one peer at a time)")
    args = parse_decode_args(parser, argv)
    args.peer_counts = counts(args.peers)
    if not args.peer_counts:
        parser.error("--peers needs at least one peer count")
    return args


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    """Baseline, then every swarm configuration; returns (config, local result, swarm results by peers)."""
    dtype = parse_dtype(args.dtype)
    model_dir = build_or_reuse_model(args, workdir, parse_dtype(args.dtype))
    local_model = load_local_model(model_dir, args.device, dtype, args.quant)
    config = local_model.config
    prompt = make_prompt(config.vocab_size, args.prompt_tokens)
    print(f"{describe_model(model_dir, config)}; {args.device} {args.dtype} quant={args.quant}; prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, best of {args.repeats}; load {machine_load()}",
          flush=True)
    baseline = LocalBaseline(local_model, prompt, args.new_tokens)
    for _ in range(args.repeats):
        baseline.run()
    print(f"local: {baseline.result.tok_s:.2f} tok/s", flush=True)

    swarm = start_swarm(stack, model_dir, workdir, threads=args.threads)
    peer_args = ["--device", args.device, "--dtype", args.dtype, "--quant", args.quant]
    swarms: dict[int, Measurement] = {}
    for peers in args.peer_counts:
        run = swarms[peers] = measure_swarm(swarm, peers, config.num_hidden_layers, peer_args, prompt,
                                            args.new_tokens, args.repeats, workdir / "client-cache", dtype,
                                            baseline)
        print(f"{run.name}: {run.tok_s:.2f} tok/s (SwarmModel reports {run.reported_tok_s:.2f}); "
              f"local so far {baseline.result.tok_s:.2f}", flush=True)
    return config, baseline.result, swarms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, local, swarms = run_in_workdir(args, run_all)
    cache_length = args.prompt_tokens + args.new_tokens
    per_hop = wire_bytes_per_hop(config.hidden_size, parse_dtype(args.dtype), cache_length)
    wire = {peers: run.hops * per_hop for peers, run in swarms.items()}
    latency = {peers: hop_latency_ms(local, run) for peers, run in swarms.items()}
    report(table(local, swarms, wire, latency),
           f"tokens match: {all(run.tokens == local.tokens for run in swarms.values())}; "
           f"load average at the end {machine_load()} (anything else running skews the numbers)",
           summary(args, config, local, swarms, wire, latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
