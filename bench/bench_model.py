"""The model the benchmarks run: its shape flags, the random checkpoint they build, and how they describe it
(how they run and report: common.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tsotsa.tiny_model import make_tiny_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Defaults: an 8-block, hidden-1024 Llama with a real vocabulary (Petals was measured on this shape)."""
    parser.add_argument("--model", type=Path, help="reuse this checkpoint instead of building one")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)


def build_or_reuse_model(args: argparse.Namespace, workdir: Path, dtype: torch.dtype) -> Path:
    """A random-weight checkpoint in the real HF layout, in the dtype both sides of the comparison compute in."""
    if args.model is not None:
        return args.model
    return make_tiny_model(
        workdir / "model", layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, vocab=args.vocab, dtype=dtype,
    )


def describe_model(model_dir: Path, config) -> str:
    """The start of a benchmark's first line."""
    return (f"model {model_dir}: {config.num_hidden_layers} blocks x {config.hidden_size}, "
            f"vocab {config.vocab_size}")


def model_summary(config) -> dict:
    """The model's keys of the JSON line."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
            "vocab": config.vocab_size}
