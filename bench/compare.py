"""What each reduction costs and buys: `tsotsa eval compare` over every peer format against one process.

Builds (or reuses, --model) the benchmark checkpoint, then runs `tsotsa.evaluation.compare` (the same code
as `tsotsa eval compare`) over `transformers` (the whole model in this machine's one process: the
baseline) and swarms of --peers loopback peers holding fp32, bf16, int8 and NF4 blocks; each variant gets
the same lm-eval tasks and the same latency protocol (warm-up, repeats, median/p99). Prints a table of
each variant's figures with its ratio to `transformers` (memory per block against fp32 peers), writes
compare's own results.md, results.json and plots into --workdir/compare, and last one JSON line.

Random weights make every accuracy near chance: what the table shows is how far each format moves the
metrics and perplexity from fp32 (NF4 and int8 do; fp32 peers must not), and what it costs in latency.

    .venv/bin/python bench/compare.py                     # 8 blocks x 1024, CPU, 2 peers per format
    .venv/bin/python bench/compare.py --layers 4 --hidden 256 --intermediate 688 --variants transformers,fp32,nf4
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, model_summary
from common import bench_parser, machine_load, report, run_in_workdir
from tsotsa.checkpoint import load_config
from tsotsa.evaluation.compare import CompareOptions, compare, parse_variants
from tsotsa.evaluation.latency import LatencyProtocol
from tsotsa.evaluation.report import write_report
from tsotsa.evaluation.run import EvalOptions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "the checkpoint and compare's output", "the LM head and lm-eval")
    parser.add_argument("--variants", default="transformers,fp32,bf16,int8,nf4")
    parser.add_argument("--tasks", default="tsotsa_colors,tsotsa_lab_texts")
    parser.add_argument("--peers", type=int, default=2, help="peers per format, on even spans")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each peer and of transformers")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_workdir(args, run)


def _ratio(value: float | None, base: float | None) -> str:
    return "–" if not value or not base else f"{value / base:.2f}"


def run(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    model_dir = build_or_reuse_model(args, workdir, torch.float32)
    options = CompareOptions(
        variants=parse_variants(args.variants), tasks=EvalOptions(tasks=args.tasks.split(",")),
        output_dir=workdir / "compare", model_dir=model_dir, peers=args.peers, threads=args.threads,
        protocol=LatencyProtocol(new_tokens=args.new_tokens, repeats=args.repeats, concurrency=args.concurrency))
    print(f"machine load before: {machine_load()}", flush=True)
    comparison = compare(options, say=lambda line: print(line, flush=True))
    paths = write_report(comparison, options.output_dir)
    rows = comparison["variants"]
    baseline = next((row for row in rows if row["kind"] == "transformers"), rows[0])
    fp32 = next((row for row in rows if row["kind"] == "fp32"), baseline)
    table = [("variant", "acc", "word ppl", "KiB/block", "x fp32", "RSS/peer MiB", "ms/tok p50", "x hf", "p99",
              "TTFT ms", "tok/s 1", "x hf", f"tok/s {args.concurrency}", "x hf")]
    summary = {"model": model_summary(load_config(model_dir)), "variants": {}}
    for row in rows:
        metrics = row["metrics"]
        acc = next((m["acc"]["value"] for m in metrics.values() if "acc" in m), None)
        ppl = next((m["word_perplexity"]["value"] for m in metrics.values() if "word_perplexity" in m), None)
        latency, base = row["latency"], baseline["latency"]
        table.append((row["variant"], "–" if acc is None else f"{acc:.4f}", "–" if ppl is None else f"{ppl:.4g}",
                      f"{row['bytes_per_block'] / 1024:.0f}", _ratio(row["bytes_per_block"], fp32["bytes_per_block"]),
                      f"{(row['peak_rss_bytes'] or 0) / (1 << 20):.0f}", f"{latency['token_ms']['median']:.2f}",
                      _ratio(latency["token_ms"]["median"], base["token_ms"]["median"]),
                      f"{latency['token_ms']['p99']:.2f}", f"{latency['ttft_ms']['median']:.1f}",
                      f"{latency['tokens_per_s']['median']:.1f}",
                      _ratio(latency["tokens_per_s"]["median"], base["tokens_per_s"]["median"]),
                      f"{latency['throughput_tokens_per_s']['median']:.1f}",
                      _ratio(latency["throughput_tokens_per_s"]["median"], base["throughput_tokens_per_s"]["median"])))
        summary["variants"][row["variant"]] = {
            "acc": acc, "word_perplexity": ppl, "bytes_per_block": row["bytes_per_block"],
            "peak_rss_bytes": row["peak_rss_bytes"], "token_ms_p50": latency["token_ms"]["median"],
            "token_ms_p99": latency["token_ms"]["p99"], "ttft_ms": latency["ttft_ms"]["median"],
            "tokens_per_s": latency["tokens_per_s"]["median"],
            "throughput_tokens_per_s": latency["throughput_tokens_per_s"]["median"]}
    summary["machine"] = {key: comparison["machine"][key] for key in ("cpu", "logical_cores", "torch_threads")}
    summary["files"] = [str(path) for path in paths]
    kept = "" if args.workdir else " (gone with the temp dir: give --workdir to keep them)"
    report(table, f"x hf: ratio to one transformers process (latency: >1 is slower; tok/s: <1 is slower); "
                  f"x fp32: memory per block against fp32 peers. Machine load after: {machine_load()}. "
                  f"compare's tables and plots: {options.output_dir}{kept}", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
