"""How a benchmark runs and reports, written once for bench/inference.py and bench/train.py.

Both build a model (bench_model.py), time a single-process baseline against swarms of loopback peers on
even spans, and print progress lines, a table, a note on reading it, and last one JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import torch

from bench_model import add_model_arguments
from tsotsa.console import quiet_libraries
from tsotsa.local_swarm import LocalPeer, LocalSwarm

R = TypeVar("R")


# ---------------------------------------------------------------------------------------------- flags


def bench_parser(doc: str, workdir_holds: str, this_process_runs: str) -> argparse.ArgumentParser:
    """The flags every benchmark has: --workdir, the model's shape and --client-threads; the description is
    the first paragraph of the benchmark's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help=f"where {workdir_holds} go (default: a temp dir)")
    add_model_arguments(parser)
    parser.add_argument("--client-threads", type=int, default=None,
                        help=f"torch threads of this process: {this_process_runs} (default: torch's)")
    return parser


def add_decode_arguments(parser: argparse.ArgumentParser, new_tokens: int = 32) -> None:
    """The flags of a decode measurement: prompt and generated tokens, repeats (`parse_decode_args` checks)."""
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--repeats", type=int, default=3)


def parse_decode_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate needs two tokens)")
    return args


def counts(text: str) -> list[int]:
    """A comma-separated flag of counts (--peers 2,4), empty items skipped."""
    return [int(n) for n in text.split(",") if n.strip()]


# ----------------------------------------------------------------------------------------------- runs


def run_in_workdir(args: argparse.Namespace, run_all: Callable[[argparse.Namespace, Path, ExitStack], R]) -> R:
    """Quiets the libraries, applies --client-threads, and calls `run_all(args, workdir, stack)` in --workdir
    or a temp dir. What `run_all` enters on the stack (the swarm: every process it started) closes before
    the temp dir goes."""
    quiet_libraries()
    if args.client_threads:
        torch.set_num_threads(args.client_threads)
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tsotsa-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        return run_all(args, workdir, stack)


def start_swarm(stack: ExitStack, model_dir: Path, workdir: Path, **options) -> LocalSwarm:
    """A loopback swarm with its coordinator up, closed with `stack`; peers come per configuration."""
    swarm = stack.enter_context(LocalSwarm(model_dir, cache_dir=workdir / "cache", **options))
    swarm.start_coordinator()
    return swarm


@contextmanager
def running_peers(swarm: LocalSwarm, spans: list[str], *peer_args: str) -> Iterator[list[LocalPeer]]:
    """One configuration's peers, serving inside the block and stopped after it, even when it fails. The
    swarm's coordinator stays: stopped peers announce `draining`, and routes and pipelines skip them."""
    started = swarm.add_peers(spans, *peer_args)
    try:
        yield started
    finally:
        for peer in started:
            swarm.stop_peer(peer)


# ------------------------------------------------------------------------------------------ reporting


def machine_load() -> str:
    """The load average and the cores, for the progress lines and the note: other work skews the numbers."""
    return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def print_rows(rows: list[tuple[str, ...]]) -> None:
    """A header row, a rule, then the rows; the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def report(rows: list[tuple[str, ...]], note: str, summary: dict) -> None:
    """The end of a benchmark's output: a blank line, the table, the note, and the JSON line (always last)."""
    print()
    print_rows(rows)
    print(note)
    print(json.dumps(summary))
