"""Fine-tuning throughput of the swarm against single-process PEFT on the same weights, data and LoRA.

Builds (or reuses, --model) a random-weight Llama checkpoint and a JSONL of text rows, then measures training
tokens/s of
  * plain PEFT in this process (the baseline every swarm number is divided by): the run's LoRA config with
    A frozen and only lora_B trained, AdamW, the same micro-batches in the same order, and
  * a coordinator-driven run through loopback peers, with 1 replica per span (2 peers: 0:L/2, L/2:L) and
    with 2 replicas per span (4 peers, two pipelines), --replicas,
and prints, per configuration: tok/s, the ratio to the baseline, wire bytes per token and ms per micro-batch.
The last line is one JSON object, for scripts.

Tokens are the non-padding tokens processed (the attention mask's sum, what RoundInfo.tokens counts). A run
has --rounds rounds of --steps optimizer steps of --grad-accum micro-batches of --micro-batch rows. Round 0
holds the warm-up (OpenTraining, the first adapter push, first-call allocations), so the swarm's rate is taken
over rounds 1.. only: their tokens over their time as the coordinator measures it (RoundInfo.tokens /
tokens_per_s: from the round's start to its last unit, without the round's end: gathering, aggregating,
exporting and pushing the adapters). The rate that includes the round ends, timed from the run's events, is
shown too. The baseline trains one warm-up step, then times exactly the micro-batches of rounds 1.. (the
same global micro-batch indices), so both sides process the same tokens. As in bench/inference.py, the
baseline runs --repeats times first and once more after every swarm run and its best run counts: on a shared
machine, load that comes and goes then hits both sides alike. Still, run it on a quiet machine: with
other work on 2 cores, a 2-thread process loses far more than its share (seen: the baseline 4x slower, the
swarm, whose processes take turns, 2x), and a ratio above 1 then measures the load, not the swarm.

Threads: the baseline uses torch's default (all cores); a peer uses cores / replicas (--threads): a pipeline
computes on one peer at a time, so with 1 replica each peer may use every core, and with 2 replicas two
pipelines compute at once; the coordinator (embedding, head, loss) uses torch's default, as in production.

    .venv/bin/python bench/train.py                       # 8 blocks x 1024, fp32 on CPU, 1 and 2 replicas
    .venv/bin/python bench/train.py --layers 4 --hidden 256 --intermediate 688 --vocab 4000 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import sys
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import bench_parser, counts, machine_load, report, run_in_workdir, running_peers, start_swarm
from tsotsa.coordinator.data import load_examples
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.local_swarm import LocalSwarm
from tsotsa.spans import even_spans
from tsotsa.training.batches import collate, micro_batches
from tsotsa.training.export import initial_adapter
from tsotsa.training.lora import LLAMA_LINEARS, LoraSettings, OptimizerSettings
from tsotsa.v1 import tsotsa_pb2 as pb

# Words the rows are drawn from: plain English, so a real Llama tokenizer (--model) gives realistic lengths too.
_WORDS = re.findall(r"[A-Za-z']+[.,]?", """
The swarm pools ordinary lab machines so that together they can serve and fine-tune a large language model.
Every machine hosts a span of transformer blocks and trains the low-rank adapters of its own blocks, while
the coordinator embeds each batch, sends the hidden states through the chain of peers, computes the loss
and sends the gradient back. Students and small labs own many desktops, a few gaming cards and some
laptops, but no single large server. When a peer leaves, its unfinished work goes to another pipeline, so
no sample is lost and none is counted twice. At the end of every round the replicas are averaged exactly,
evaluated and written to a checkpoint that anyone can load with the usual libraries. Once upon a time a
small team set out to make the best software in its field, measured, tested and explained in plain words.
""")


# ------------------------------------------------------------------------------------------- the inputs


def write_rows(path: Path, tokenizer, rows: int, seq_len: int, seed: int = 0) -> Path:
    """`rows` {"text": ...} rows of 3/4 to all of `seq_len` tokens each (with <s> and </s>): padding in a
    micro-batch is realistic, and no row exceeds the run's --seq-len (the coordinator refuses such rows)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        target = rng.randint(max(3, seq_len * 3 // 4), seq_len) - 1  # the coordinator appends </s>
        words: list[str] = []
        while True:
            words.append(rng.choice(_WORDS))
            length = len(tokenizer(" ".join(words)).input_ids)
            if length >= target:
                if length > target and len(words) > 1:
                    words.pop()
                break
        lines.append(json.dumps({"text": " ".join(words)}) + "\n")
    path.write_text("".join(lines))
    return path


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=tuple(args.targets), seed=args.seed)


# -------------------------------------------------------------------------------------------- the runs


@dataclass
class Measurement:
    name: str
    tokens: int = 0
    seconds: float = 0.0         # the best run's
    micro_batches: int = 0
    wall_seconds: float = 0.0    # swarm: including the round ends (gather, aggregate, export, push)
    wire_bytes: int = 0
    peers: int = 0
    pipelines: int = 0
    threads: int = 0
    losses: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)  # tok/s of every repeat

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def wall_tok_s(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def ms_per_micro_batch(self) -> float:
        return 1000.0 * self.seconds / self.micro_batches if self.micro_batches else float("nan")

    @property
    def wire_bytes_per_token(self) -> float:
        return self.wire_bytes / self.tokens if self.tokens else 0.0


class LocalBaseline:
    """Single-process PEFT as tests/finetune_oracle.py trains it (the swarm's exact oracle): the run's adapter
    start (A from the seed, B zero), A frozen, AdamW over the B matrices with the peers' settings, and the
    coordinator's micro-batches (same global indices, so the same rows in the same order)."""

    def __init__(self, model_dir: Path, data: Path, args: argparse.Namespace) -> None:
        from peft import get_peft_model, set_peft_model_state_dict
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.args, self.settings = args, lora_settings(args)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = get_peft_model(base, self.settings.peft_config())
        set_peft_model_state_dict(self.model, initial_adapter(base.config, self.settings))
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(".lora_B." in name)
        self.model.train()
        self.pad_id = self.model.config.pad_token_id or 0
        self.examples = load_examples(data, AutoTokenizer.from_pretrained(model_dir), args.seq_len)
        optimizer = OptimizerSettings(lr=args.lr)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=optimizer.lr,
                                           betas=optimizer.betas, eps=optimizer.eps,
                                           weight_decay=optimizer.weight_decay)
        self.result = Measurement("local (PEFT)", threads=torch.get_num_threads())
        self._step(0)  # warm-up: round 0's first step, as the swarm's round 0 is its warm-up

    def _step(self, step: int) -> tuple[int, float]:
        grad_accum = self.args.grad_accum
        tokens, losses = 0, []
        for index in range(step * grad_accum, (step + 1) * grad_accum):
            batch = micro_batches(self.examples, self.args.micro_batch, self.settings.seed, index, 1)[0]
            input_ids, mask, labels = collate(batch, self.pad_id)
            loss = self.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            (loss / grad_accum).backward()
            losses.append(loss.item())
            tokens += int(mask.sum())
        self.optimizer.step()
        self.optimizer.zero_grad()
        return tokens, sum(losses) / len(losses)

    def run(self) -> float:
        """The steps of the swarm's measured rounds (1..), timed; the best run is kept."""
        first, last = self.args.steps, self.args.rounds * self.args.steps
        tokens, losses = 0, []
        began = time.perf_counter()
        for step in range(first, last):
            step_tokens, loss = self._step(step)
            tokens += step_tokens
            losses.append(loss)
        seconds = time.perf_counter() - began
        rate = tokens / seconds
        self.result.runs.append(rate)
        if rate > self.result.tok_s:
            self.result.tokens, self.result.seconds, self.result.losses = tokens, seconds, losses
            self.result.micro_batches = (last - first) * self.args.grad_accum
        return rate


class StallGuard:
    """Stops the run when no event came for `timeout` seconds (a unit takes seconds): a run that waits for
    pipelines that never form would otherwise hold the benchmark forever."""

    def __init__(self, client: CoordinatorClient, name: str, timeout: float) -> None:
        self.client, self.name, self.timeout = client, name, timeout
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            if time.monotonic() - self._last > self.timeout:
                self.stalled = True
                try:
                    self.client.stop_run(self.name)  # the run ends, so does the watch stream
                except Exception:
                    pass
                return

    def __enter__(self) -> "StallGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run_config(args: argparse.Namespace) -> pb.RunConfig:
    return pb.RunConfig(rounds=args.rounds, steps_per_round=args.steps, micro_batch=args.micro_batch,
                        grad_accum=args.grad_accum, seq_len=args.seq_len, lora_r=args.lora_r,
                        lora_alpha=args.lora_alpha, target_modules=args.targets, lr=args.lr, seed=args.seed)


def measure_swarm(swarm: LocalSwarm, replicas: int, layers: int, data: Path, args: argparse.Namespace,
                  threads: int) -> Measurement:
    """Starts `replicas` peers per span, runs a fine-tuning run through them and stops them again (even when
    the run fails). The coordinator stays: the stopped peers announce `draining`, and pipelines skip them."""
    swarm.threads = threads
    spans = even_spans(layers, args.spans) * replicas
    name = f"bench-{replicas}x-{secrets.token_hex(3)}"
    result = Measurement(f"swarm, {replicas} replica{'s' if replicas > 1 else ''} per span", peers=len(spans),
                         threads=threads)
    with running_peers(swarm, spans) as started:
        with CoordinatorClient(swarm.coordinator_address, admin_token=swarm.admin_token) as client:
            client.create_run(name, run_config(args), data, None)
            round_ends: dict[int, float] = {}
            with StallGuard(client, name, args.stall_timeout) as guard:
                for event in client.watch_run(name):
                    guard.progress()
                    if event.kind == "round":
                        round_ends[event.round] = time.perf_counter()
            info = client.run(name)
        if info.state != "finished" or guard.stalled:
            why = f"no progress for {args.stall_timeout:.0f} s; " if guard.stalled else ""
            raise RuntimeError(f"run {name} ended {info.state}: {why}{info.message}\n" +
                               "\n".join(f"--- {peer.process.name}:\n{peer.process.output()}" for peer in started))
        measured = [r for r in info.rounds if r.round >= 1]
        result.tokens = sum(r.tokens for r in measured)
        result.seconds = sum(r.tokens / r.tokens_per_s for r in measured)
        result.wall_seconds = round_ends[args.rounds - 1] - round_ends[0]
        result.wire_bytes = sum(r.wire_bytes for r in measured)
        result.micro_batches = len(measured) * args.steps * args.grad_accum
        result.pipelines = min(len(r.peers) for r in measured) // args.spans
        result.losses = [r.train_loss for r in measured]
        result.runs = [r.tokens_per_s for r in measured]
        return result


# ------------------------------------------------------------------------------------------- reporting


def table(local: Measurement, swarms: dict[int, Measurement]) -> list[tuple[str, ...]]:
    rows = [("configuration", "peers", "pipes", "threads", "tokens", "s", "tok/s", "vs local", "incl. ends",
             "ms/mbatch", "wire B/tok")]
    rows.append((local.name, "-", "-", str(local.threads), str(local.tokens), f"{local.seconds:.1f}",
                 f"{local.tok_s:.1f}", "1.00", "-", f"{local.ms_per_micro_batch:.0f}", "-"))
    for run in swarms.values():
        rows.append((run.name, str(run.peers), str(run.pipelines), str(run.threads), str(run.tokens),
                     f"{run.seconds:.1f}", f"{run.tok_s:.1f}", f"{run.tok_s / local.tok_s:.2f}",
                     f"{run.wall_tok_s / local.tok_s:.2f}", f"{run.ms_per_micro_batch:.0f}",
                     f"{run.wire_bytes_per_token:.0f}"))
    return rows


def summary(args: argparse.Namespace, config, local: Measurement, swarms: dict[int, Measurement]) -> dict:
    result: dict = {"local_tok_s": round(local.tok_s, 3)}
    for replicas, run in swarms.items():
        result.update({
            f"swarm{replicas}_tok_s": round(run.tok_s, 3),
            f"ratio_{replicas}": round(run.tok_s / local.tok_s, 4),
            f"wire_bytes_per_token_{replicas}": round(run.wire_bytes_per_token, 1),
            f"swarm{replicas}_wall_tok_s": round(run.wall_tok_s, 3),
            f"ratio_wall_{replicas}": round(run.wall_tok_s / local.tok_s, 4),
            f"ms_per_micro_batch_{replicas}": round(run.ms_per_micro_batch, 1),
            f"pipelines_{replicas}": run.pipelines,
            f"peer_threads_{replicas}": run.threads,
        })
    result.update({
        "ms_per_micro_batch_local": round(local.ms_per_micro_batch, 1),
        "tokens_measured": local.tokens,
        "tokens_match": all(run.tokens == local.tokens for run in swarms.values()),
        "local_runs_tok_s": [round(rate, 2) for rate in local.runs],
        **model_summary(config),
        "spans": args.spans, "rounds": args.rounds, "steps_per_round": args.steps,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "seq_len": args.seq_len, "rows": args.rows,
        "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "targets": args.targets, "lr": args.lr,
        "dtype": "float32", "device": "cpu", "client_threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "load_average_end": round(os.getloadavg()[0], 2),
    })
    return result


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint, data and caches", this_process_runs="the baseline")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128, help="the run's --seq-len; rows are 3/4 to all of it")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run; round 0 is the warm-up")
    parser.add_argument("--rows", type=int, default=64, help="rows in the generated training file")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated LoRA target modules")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spans", type=int, default=2, help="spans the blocks are cut into (peers per pipeline)")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replicas per span to run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="baseline runs before the swarm runs (it also runs once after each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per peer (default: cores / replicas: a pipeline computes on one "
                             "peer at a time, and the replicas' pipelines run at once)")
    parser.add_argument("--stall-timeout", type=float, default=180.0,
                        help="seconds without any run event after which a swarm run is stopped and the bench fails")
    args = parser.parse_args(argv)
    args.replica_counts = counts(args.replicas)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.replica_counts or min(args.replica_counts) < 1:
        parser.error("--replicas needs at least one count, each at least 1")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 0 is the warm-up and is not measured)")
    if any(t not in LLAMA_LINEARS for t in args.targets):
        parser.error(f"--targets: choose from {', '.join(LLAMA_LINEARS)}")
    return args


def peer_threads(args: argparse.Namespace, replicas: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // replicas)


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    """Baseline, then every swarm configuration (a baseline run after each); returns (config, local, swarms)."""
    from transformers import AutoTokenizer

    model_dir = build_or_reuse_model(args, workdir, torch.float32)
    data = write_rows(workdir / "train.jsonl", AutoTokenizer.from_pretrained(model_dir), args.rows, args.seq_len,
                      args.seed)
    baseline = LocalBaseline(model_dir, data, args)
    config = baseline.model.config
    measured_steps = (args.rounds - 1) * args.steps
    print(f"{describe_model(model_dir, config)}; cpu float32; LoRA r={args.lora_r} on {','.join(args.targets)}, "
          f"A frozen; {args.rounds} rounds x {args.steps} steps x {args.grad_accum} x {args.micro_batch} rows of "
          f"<= {args.seq_len} tokens, {measured_steps} steps measured; load {machine_load()}", flush=True)
    for _ in range(args.repeats):
        print(f"local: {baseline.run():.1f} tok/s", flush=True)

    swarm = start_swarm(stack, model_dir, workdir, admin_token=secrets.token_hex(8))
    swarms: dict[int, Measurement] = {}
    for replicas in args.replica_counts:
        run = swarms[replicas] = measure_swarm(swarm, replicas, config.num_hidden_layers, data, args,
                                               peer_threads(args, replicas))
        print(f"{run.name}: {run.tok_s:.1f} tok/s over rounds 1..{args.rounds - 1} "
              f"(per round {', '.join(f'{rate:.1f}' for rate in run.runs)}; {run.wall_tok_s:.1f} with the round "
              f"ends)", flush=True)
        print(f"local: {baseline.run():.1f} tok/s", flush=True)
    return config, baseline.result, swarms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls a deprecated transformers property
    config, local, swarms = run_in_workdir(args, run_all)
    report(table(local, swarms),
           f"tokens: non-padding tokens of rounds 1..{args.rounds - 1}, the same micro-batches on both sides "
           f"(match: {all(run.tokens == local.tokens for run in swarms.values())}); 'incl. ends' counts the "
           f"rounds' ends too; ms/mbatch is seconds / micro-batches (replicas' pipelines overlap). Threads: the "
           f"baseline uses {local.threads}; a peer uses cores / replicas (a pipeline computes on one peer at a "
           f"time); the coordinator (head, loss) uses torch's default. Load average at the end {machine_load()} "
           f"(anything else running skews the numbers)",
           summary(args, config, local, swarms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
