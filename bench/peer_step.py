"""What a peer's decode pass costs per token at batch 1-16, without the network: the peer's own step path
(`PeerService._step`: request checks, the codec, the runtime thread, merged KV caches, its blocks) with N
sessions stepping at once from N threads, against `transformers`' `LlamaModel` over the same blocks
decoding a batch of N in one process (both on one torch thread, as bench/load.py's peers run).

It separates what batching across sessions costs on a peer from what the transport and the client add
(bench/load.py measures the whole): where the two columns agree, a swarm's throughput is bounded by the
arithmetic of the blocks at the batch each peer sees, not by the peer's Python.

    .venv/bin/python bench/peer_step.py                 # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import add_decode_arguments, bench_parser, machine_load, parse_decode_args, report, run_in_workdir
from tsotsa.checkpoint import Checkpoint, block_prefix
from tsotsa.codec import encode
from tsotsa.spans import BlockSpan, SpanSpec
from tsotsa.v1 import tsotsa_pb2 as pb

BATCHES = (1, 4, 8, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint", this_process_runs="both sides")
    add_decode_arguments(parser)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the span (bench/load.py's peers: 4)")
    return parse_decode_args(parser, argv)


def peer_ms_per_token(checkpoint: Checkpoint, blocks: int, batch: int, prompt: int, steps: int) -> float:
    """CPU ms per decode token of `batch` sessions stepping at once through a peer's own step path."""
    from tsotsa.peer.service import PeerLimits, PeerService

    tensors = checkpoint.read_prefixes([block_prefix(i) for i in range(blocks)])
    span = BlockSpan(checkpoint.config, SpanSpec(0, blocks), tensors)
    service = PeerService(span, checkpoint.model_id, checkpoint.config.num_hidden_layers,
                          PeerLimits(max_sessions=batch, max_cache_bytes=8 << 30), info=lambda: None,
                          coordinator_only=None, throughput=1.0)
    hidden = checkpoint.config.hidden_size
    sessions = []
    for index in range(batch):
        opened = pb.OpenSession(model_id=checkpoint.model_id, start_block=0, end_block=blocks, batch_size=1,
                                max_length=prompt + steps + 1)
        session = service._open(f"bench-{index}", opened)
        service._step(session, pb.InferenceStep(hidden_states=encode(torch.randn(1, prompt, hidden))))
        sessions.append(session)
    step = pb.InferenceStep(hidden_states=encode(torch.randn(1, 1, hidden)))
    barrier = threading.Barrier(batch + 1)

    def decode(session) -> None:
        barrier.wait()
        for _ in range(steps):
            service._step(session, step)

    threads = [threading.Thread(target=decode, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    began = time.process_time()
    barrier.wait()
    for thread in threads:
        thread.join()
    used = time.process_time() - began
    service.runtime.close()
    return 1000 * used / (batch * steps)


@torch.inference_mode()
def transformers_ms_per_token(model_dir: Path, blocks: int, batch: int, prompt: int, steps: int) -> float:
    """CPU ms per decode token of `transformers`' LlamaModel (its first `blocks` layers) decoding `batch` rows."""
    from transformers import DynamicCache, LlamaModel

    model = LlamaModel.from_pretrained(model_dir).eval()
    model.layers = model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    hidden = model.config.hidden_size
    cache = DynamicCache(config=model.config)
    model(inputs_embeds=torch.randn(batch, prompt, hidden), cache=cache, use_cache=True)
    token = torch.randn(batch, 1, hidden)
    began = time.process_time()
    for _ in range(steps):
        model(inputs_embeds=token, cache=cache, use_cache=True)
    return 1000 * (time.process_time() - began) / (batch * steps)


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    torch.set_num_threads(1)
    model_dir = build_or_reuse_model(args, workdir, torch.float32)
    checkpoint = Checkpoint.open(model_dir)
    print(f"{describe_model(model_dir, checkpoint.config)}; {args.blocks} blocks, cpu float32, 1 torch thread; "
          f"prompt {args.prompt_tokens}, {args.new_tokens} steps; load {machine_load()}", flush=True)
    results = {}
    for batch in BATCHES:
        best_peer = min(peer_ms_per_token(checkpoint, args.blocks, batch, args.prompt_tokens, args.new_tokens)
                        for _ in range(args.repeats))
        best_hf = min(transformers_ms_per_token(model_dir, args.blocks, batch, args.prompt_tokens, args.new_tokens)
                      for _ in range(args.repeats))
        results[batch] = (best_peer, best_hf)
        print(f"batch {batch}: peer {best_peer:.2f} ms/token, transformers {best_hf:.2f}", flush=True)
    return checkpoint.config, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, results = run_in_workdir(args, run_all)
    rows = [("sessions (batch)", "peer CPU ms/token", "transformers ms/token", "ratio")]
    for batch, (peer, hf) in results.items():
        rows.append((str(batch), f"{peer:.2f}", f"{hf:.2f}", f"{hf / peer:.2f}"))
    summary = {
        **{f"peer_ms_per_token_{b}": round(p, 3) for b, (p, _) in results.items()},
        **{f"hf_ms_per_token_{b}": round(h, 3) for b, (_, h) in results.items()},
        **{f"ratio_{b}": round(h / p, 3) for b, (p, h) in results.items()},
        **model_summary(config), "blocks": args.blocks, "prompt_tokens": args.prompt_tokens,
        "steps": args.new_tokens, "repeats": args.repeats,
    }
    report(rows, f"CPU time per generated token (best of {args.repeats}); ratio = transformers / peer (1: the "
                 f"peer's step path costs nothing beyond the blocks); load {machine_load()}", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
