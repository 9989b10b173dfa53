"""What the trust mechanisms cost in decode tokens/s: admission (swarm token: DHT record validators and
token checks), TLS, and spot checks at a verify fraction of 5% and 20%, each against the same swarm
without them and against one `transformers` process (the baseline of bench/inference.py).

Every configuration is its own loopback swarm with the same layout: --peers spans, each served by two
replicas (spot checks need a second peer of the same blocks; the open swarm has them too, so the
replicas cost nothing extra in the comparison). Measurement as bench/inference.py: warm-up, then
--repeats runs, best counts, a baseline run after every swarm run.

    .venv/bin/python bench/security.py                       # 8 blocks x 1024, fp32 on CPU, 2 spans x 2
    .venv/bin/python bench/security.py --layers 4 --hidden 256 --intermediate 688 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import (add_decode_arguments, bench_parser, machine_load, parse_decode_args, report,
                    run_in_workdir, running_peers)
from inference import LocalBaseline, Measurement, load_local_model, make_prompt, timed_runs
from tsotsa.client.config import ClientConfig
from tsotsa.client.model import SwarmModel
from tsotsa.local_swarm import LocalSwarm
from tsotsa.spans import even_spans
from tsotsa.tls import TlsSettings, init_ca, issue

TOKEN = "bench-security-token"


@dataclass(frozen=True)
class Variant:
    name: str
    token: bool = False
    tls: bool = False
    verify_fraction: float = 0.0


VARIANTS = [Variant("open"), Variant("token (admission)", token=True), Variant("TLS", tls=True),
            Variant("token + TLS", token=True, tls=True), Variant("verify 5%", verify_fraction=0.05),
            Variant("verify 20%", verify_fraction=0.2)]


def lab_tls(workdir: Path) -> TlsSettings:
    """A lab CA and one certificate for this machine (every process of the swarm uses it)."""
    directory = workdir / "tls"
    if not (directory / "ca.crt").is_file():
        init_ca(directory)
        issue(directory, "bench", ["127.0.0.1", "localhost"])
    return TlsSettings.load(directory / "bench.crt", directory / "bench.key", directory / "ca.crt")


def measure(variant: Variant, args: argparse.Namespace, model_dir: Path, workdir: Path, layers: int,
            prompt: torch.Tensor, local: LocalBaseline) -> tuple[Measurement, int]:
    """One variant's swarm, started and stopped here; its measurement and the spot checks it made."""
    tls = lab_tls(workdir) if variant.tls else None
    token = TOKEN if variant.token else None
    spans = even_spans(layers, args.peers) * 2
    config = ClientConfig(verify_fraction=variant.verify_fraction)
    with LocalSwarm(model_dir, cache_dir=workdir / "cache", threads=args.threads, token=token, tls=tls) as swarm:
        swarm.start_coordinator()
        with running_peers(swarm, spans, "--dtype", args.dtype), \
                SwarmModel.from_coordinator(swarm.coordinator_address, cache_dir=workdir / "client-cache",
                                            token=token, tls=tls, config=config) as model:
            return timed_runs(model, variant.name, prompt, args.new_tokens, args.repeats, local)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint, caches and TLS files",
                          this_process_runs="baseline and client")
    add_decode_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--peers", type=int, default=2, help="spans (each served by two replicas)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    args = parse_decode_args(parser, argv)
    return args


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    from tsotsa.console import parse_dtype

    dtype = parse_dtype(args.dtype)
    model_dir = build_or_reuse_model(args, workdir, dtype)
    local_model = load_local_model(model_dir, "cpu", dtype, "none")
    config = local_model.config
    prompt = make_prompt(config.vocab_size, args.prompt_tokens)
    print(f"{describe_model(model_dir, config)}; cpu {args.dtype}; {args.peers} spans x 2 replicas; prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, best of {args.repeats}; load {machine_load()}",
          flush=True)
    baseline = LocalBaseline(local_model, prompt, args.new_tokens)
    for _ in range(args.repeats):
        baseline.run()
    results = {}
    for variant in VARIANTS:
        results[variant] = measure(variant, args, model_dir, workdir, config.num_hidden_layers, prompt, baseline)
        print(f"{variant.name}: {results[variant][0].tok_s:.2f} tok/s ({results[variant][1]} checks); "
              f"local so far {baseline.result.tok_s:.2f}", flush=True)
    return config, baseline.result, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, local, results = run_in_workdir(args, run_all)
    open_run = results[VARIANTS[0]][0]
    rows = [("configuration", "tok/s", "vs open", "vs local", "checks", "tokens")]
    rows.append(("local (transformers)", f"{local.tok_s:.2f}", "-", "1.00", "-", "reference"))
    summary: dict = {"local_tok_s": round(local.tok_s, 3)}
    for variant, (run, checks) in results.items():
        same = "match" if run.tokens == local.tokens else "DIFFER"
        rows.append((f"{variant.name} ({run.hops} hops)", f"{run.tok_s:.2f}", f"{run.tok_s / open_run.tok_s:.2f}",
                     f"{run.tok_s / local.tok_s:.2f}", str(checks), same))
        key = variant.name.split(" (")[0].replace(" + ", "_").replace(" ", "_").replace("%", "pct").lower()
        summary[f"{key}_tok_s"] = round(run.tok_s, 3)
        summary[f"{key}_vs_open"] = round(run.tok_s / open_run.tok_s, 4)
        summary[f"{key}_checks"] = checks
    summary.update({
        "tokens_match": all(run.tokens == local.tokens for run, _ in results.values()),
        **model_summary(config), "spans": args.peers, "replicas": 2, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "dtype": args.dtype,
        "peer_threads": args.threads, "load_average_end": round(os.getloadavg()[0], 2),
    })
    report(rows, f"load average at the end {machine_load()} (anything else running skews the numbers)", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
