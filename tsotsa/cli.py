"""`tsotsa`: make checkpoints, generate through the swarm, show the swarm map."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from tsotsa.console import CoordinatorAddress, SwarmToken, parse_dtype, run_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tsotsa: Llama inference across a swarm.")


@app.command("make-tiny-model")
def make_tiny_model_command(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    layers: int = typer.Option(4, help="Transformer blocks."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    kv_heads: int = typer.Option(None, help="Key/value heads (GQA when fewer than --heads)."),
    intermediate: int = typer.Option(None, help="MLP size (default 4 x hidden)."),
    vocab: int = typer.Option(512, help="Vocabulary size."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    shard_size: str = typer.Option(None, help="Shard the safetensors files, e.g. 200KB or 2GB."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
) -> None:
    """Write a random-weight Llama in the Hugging Face layout (config, safetensors, tokenizer)."""

    def body() -> None:
        from tsotsa.tiny_model import make_tiny_model

        if kv_heads and heads % kv_heads:
            raise ValueError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
        if hidden % heads:
            raise ValueError(f"--hidden {hidden} is not a multiple of --heads {heads}")
        path = make_tiny_model(out_dir, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                               intermediate=intermediate, vocab=vocab, seed=seed, shard_size=shard_size,
                               dtype=parse_dtype(dtype))
        print(f"wrote a {layers}-block Llama (hidden {hidden}) to {path}")

    run_command(body)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    coordinator: CoordinatorAddress = None,
    model: Path = typer.Option(None, "--model", help="Local checkpoint for the head (with --initial-peers)."),
    initial_peers: str = typer.Option(None, help="DHT multiaddrs, comma-separated (coordinator not needed)."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 for greedy; above 0 samples."),
    top_k: int = typer.Option(0, help="Keep only the k most likely tokens when sampling (0: all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: int = typer.Option(None, help="Seed for sampling."),
    cache_dir: Path = typer.Option(None, help="Where the head and tokenizer are cached (default ~/.cache/tsotsa)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line instead of streaming text."),
    adapter: str = typer.Option(None, help="A fine-tuning run whose adapter the peers apply (the base model "
                                           "when not given)."),
    token: SwarmToken = None,
) -> None:
    """Generate a continuation of PROMPT through the swarm, streaming tokens as they come."""

    def body() -> None:
        from tsotsa.client.model import SwarmModel, require_tokenizer

        peers = [p for p in (initial_peers or "").split(",") if p]
        if model is not None:
            if not peers:
                raise ValueError("--model needs --initial-peers (the DHT to find peers in)")
            swarm_model = SwarmModel.from_checkpoint(model, peers, token=token)
        elif coordinator:
            swarm_model = SwarmModel.from_coordinator(coordinator, initial_peers=peers or None, cache_dir=cache_dir,
                                                      token=token)
        else:
            raise ValueError("give --coordinator HOST:PORT (or --model with --initial-peers)")
        with swarm_model:
            tokenizer = require_tokenizer(swarm_model)
            prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
            produced: list[int] = []
            shown = ""

            def stream(tokens) -> None:
                nonlocal shown
                produced.append(int(tokens[0]))
                if as_json:
                    return
                text = tokenizer.decode(produced, skip_special_tokens=True)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

            if not as_json:
                sys.stdout.write(prompt)
            _, stats = swarm_model.generate(prompt_ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                            temperature=temperature or 1.0, top_k=top_k, top_p=top_p, seed=seed,
                                            on_tokens=stream, adapter=adapter, return_stats=True)
            if as_json:
                print(json.dumps({
                    "prompt_ids": prompt_ids[0].tolist(),
                    "output_ids": produced,
                    "text": tokenizer.decode(produced, skip_special_tokens=True),
                    "tokens_per_s": round(stats.tokens_per_s, 3),
                }))
            else:
                print(flush=True)
                print(f"[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, {stats.hops} hops]",
                      file=sys.stderr)

    run_command(body)


@app.command()
def status(
    coordinator: CoordinatorAddress = ...,
    as_json: bool = typer.Option(False, "--json", help="Print the swarm map as JSON."),
    token: SwarmToken = None,
) -> None:
    """Print the swarm map: every block, the peers serving it, their state and throughput."""

    def body() -> None:
        from tsotsa.coordinator_client import CoordinatorClient
        from tsotsa.swarm_map import print_swarm_map, swarm_map_json

        with CoordinatorClient(coordinator, token=token) as client:
            swarm_map = client.swarm_status()
        if as_json:
            print(json.dumps(swarm_map_json(swarm_map)))
        else:
            print_swarm_map(swarm_map)

    run_command(body)
