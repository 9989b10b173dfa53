"""A lab's load on one swarm: 1, 4, 8 and 16 concurrent streams through the HTTP API, each for a fixed time,
against one `transformers` process generating the same prompts batched 1, 4, 8 and 16 (what one machine
holding the whole model does), the swarm with peer batching switched off (`--max-batch 1`) and without
its batching window (`--batch-window-ms 0`), the API without merging its requests' decode steps into one
message per peer (a `tsotsa serve --no-merge-steps` beside the coordinator's API, at 1 and 16 streams),
then churn under 8 streams (a replica killed and restarted, a new peer joining) with every output checked.

One loopback swarm, the model of bench/inference.py (8 blocks x 1024, fp32): --spans even spans, each
served by two replicas (so churn always leaves one), the HTTP API in the coordinator. Each stream is a
thread of this process with its own official `openai` client, sending greedy `/v1/completions` streams
(token-id prompts, `ignore_eos`, `logprobs=0` so that every token arrives as its own chunk and can be
timed and checked) one after another until the phase ends. Per phase: aggregate generated tokens/s (all
tokens / phase time), per-request tokens/s (decode rate), time to first token and inter-token latency
p50/p99, requests ok/failed. A request's output is checked by its tokens' log-probs against the first
answer to the same prompt in the undisturbed phases (a different greedy token has a different log-prob;
1e-3 allows for batching's rounding). Peers' RSS at the start and the end.

    .venv/bin/python bench/load.py                              # about 6 minutes on 2 cores
    .venv/bin/python bench/load.py --layers 4 --hidden 256 --intermediate 688 --phase-seconds 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from bench_model import build_or_reuse_model, describe_model, model_summary
from common import (add_decode_arguments, bench_parser, machine_load, parse_decode_args, report,
                    run_in_workdir)
from inference import load_local_model, make_prompt
from tsotsa.local_swarm import HTTP_READY, LocalSwarm, ManagedProcess
from tsotsa.spans import even_spans

STREAMS = (1, 4, 8, 16)
# the swarm as served (every phase), and at 16 streams with peer batching off and without its window
VARIANTS = {"batched": (), "unbatched": ("--max-batch", "1"), "no_window": ("--batch-window-ms", "0")}
CHURN_STREAMS = 8
SAME_LOGPROB = 1e-3


@dataclass
class Request:
    prompt: int
    ttft: float
    gaps: list[float]
    logprobs: list[float]

    @property
    def tok_s(self) -> float:
        return len(self.gaps) / sum(self.gaps) if self.gaps and sum(self.gaps) > 0 else 0.0


@dataclass
class Phase:
    name: str
    streams: int
    seconds: float = 0.0
    done: list[Request] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    wrong: int = 0
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)  # by role: api, peers, load generator

    @property
    def tokens(self) -> int:
        return sum(len(r.logprobs) for r in self.done)

    @property
    def agg_tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    def row(self) -> tuple[str, ...]:
        ttfts = [r.ttft for r in self.done]
        gaps = [g for r in self.done for g in r.gaps]
        per_request = statistics.mean(r.tok_s for r in self.done) if self.done else 0.0
        return (self.name, f"{self.agg_tok_s:.2f}", f"{per_request:.2f}",
                f"{1000 * self.percentile(ttfts, 0.5):.0f}", f"{1000 * self.percentile(ttfts, 0.99):.0f}",
                f"{1000 * self.percentile(gaps, 0.5):.1f}", f"{1000 * self.percentile(gaps, 0.99):.1f}",
                f"{len(self.done)}/{len(self.failed)}")


class Load:
    """Streams requests through the HTTP API from `streams` threads until `seconds` pass."""

    def __init__(self, url: str, prompts: list[torch.Tensor], new_tokens: int) -> None:
        import openai

        self.url, self.prompts, self.new_tokens = url, prompts, new_tokens
        self.model = openai.OpenAI(base_url=url, api_key="none", max_retries=0).models.list().data[0].id
        self.reference: dict[int, list[float]] = {}

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=300)

    def run(self, name: str, streams: int, seconds: float, during=None,
            roles: dict[str, list[int]] | None = None) -> Phase:
        """`roles`: processes by role (their DHT children included) whose CPU time per generated token the
        phase records."""
        phase = Phase(name, streams)
        cpu_before = {role: cpu_seconds(pids) for role, pids in (roles or {}).items()}
        lock, stop = threading.Lock(), threading.Event()

        def stream(index: int) -> None:
            client, count = self.client(), 0
            while not stop.is_set():
                prompt = (index + streams * count) % len(self.prompts)
                count += 1
                try:
                    request = self.one(client, prompt)
                except Exception as error:  # a failed request: counted, the stream goes on
                    with lock:
                        phase.failed.append(f"{type(error).__name__}: {error}"[:200])
                    continue
                with lock:
                    phase.done.append(request)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.perf_counter() - began)))
        stop.set()
        for thread in threads:
            thread.join(600)
        phase.seconds = time.perf_counter() - began
        for role, before in cpu_before.items():
            phase.cpu_ms_per_token[role] = 1000 * (cpu_seconds(roles[role]) - before) / max(1, phase.tokens)
        for request in phase.done:  # the first answer to a prompt is its reference
            expected = self.reference.setdefault(request.prompt, request.logprobs)
            if len(expected) != len(request.logprobs) or any(
                    abs(a - b) > SAME_LOGPROB for a, b in zip(expected, request.logprobs)):
                phase.wrong += 1
        return phase

    def one(self, client, prompt: int) -> Request:
        began = time.perf_counter()
        times, logprobs = [], []
        chunks = client.completions.create(model=self.model, prompt=self.prompts[prompt][0].tolist(),
                                           max_tokens=self.new_tokens, temperature=0, stream=True, logprobs=0,
                                           extra_body={"ignore_eos": True})
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                now = time.perf_counter()
                for value in chunk.choices[0].logprobs.token_logprobs:
                    times.append(now)
                    logprobs.append(value)
        if len(logprobs) != self.new_tokens:
            raise RuntimeError(f"{len(logprobs)} of {self.new_tokens} tokens")
        return Request(prompt, times[0] - began, [b - a for a, b in zip(times, times[1:])], logprobs)


def hf_batched(model, prompts: list[torch.Tensor], batch: int, new_tokens: int, repeats: int) -> float:
    """Tokens/s of `transformers` generating `batch` prompts at once (best of `repeats`, prefill included)."""
    input_ids = torch.cat(prompts[:batch])
    best = 0.0
    for _ in range(repeats):
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, pad_token_id=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        best = max(best, batch * new_tokens / (time.perf_counter() - began))
    return best


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their descendants so far (this process alone: its
    children are the swarm's processes, counted in their own roles)."""
    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for one in [process, *([] if pid == os.getpid() else process.children(recursive=True))]:
                times = one.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def roles_of(swarm: LocalSwarm) -> dict[str, list[int]]:
    """The swarm's processes by role: the coordinator holds the HTTP API; this process is the load generator."""
    return {"api": [swarm.coordinator.pid], "peers": [peer.process.pid for peer in swarm.peers],
            "load generator": [os.getpid()]}


def rss(swarm: LocalSwarm) -> int:
    return sum(psutil.Process(peer.process.pid).memory_info().rss for peer in swarm.peers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, workdir_holds="the checkpoint and caches", this_process_runs="baseline and streams")
    add_decode_arguments(parser)
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="how long each load phase runs")
    parser.add_argument("--spans", type=int, default=2, help="spans, each served by two replicas")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    return parse_decode_args(parser, argv)


def run_all(args: argparse.Namespace, workdir: Path, stack: ExitStack):
    model_dir = build_or_reuse_model(args, workdir, torch.float32)
    local = load_local_model(model_dir, "cpu", torch.float32, "none")
    config = local.config
    prompts = [make_prompt(config.vocab_size, args.prompt_tokens, seed=i) for i in range(max(STREAMS))]
    print(f"{describe_model(model_dir, config)}; cpu float32; {args.spans} spans x 2 replicas; prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens; {args.phase_seconds:g} s per phase; "
          f"load {machine_load()}", flush=True)
    hf = {batch: hf_batched(local, prompts, batch, args.new_tokens, args.repeats) for batch in STREAMS}
    print("transformers batched: " + ", ".join(f"{b}: {v:.1f} tok/s" for b, v in hf.items()), flush=True)
    del local
    spans = even_spans(config.num_hidden_layers, args.spans)
    phases: dict[str, Phase] = {}
    memory: dict[str, int] = {}
    for variant, peer_args in VARIANTS.items():
        with LocalSwarm(model_dir, cache_dir=workdir / "cache", threads=args.threads, http=True) as swarm:
            swarm.start_coordinator()
            swarm.add_peers(spans * 2, *peer_args)
            load = Load(f"{swarm.http_url}/v1", prompts, args.new_tokens)
            load.run("warm-up", 2, 5.0)
            if variant == "batched":
                memory["start"] = rss(swarm)
                for streams in STREAMS:
                    phases[f"batched_{streams}"] = phase = load.run(f"swarm, {streams} streams", streams,
                                                                    args.phase_seconds, roles=roles_of(swarm))
                    cpu = ", ".join(f"{role} {ms:.1f}" for role, ms in phase.cpu_ms_per_token.items())
                    print(f"{phase.name}: {phase.agg_tok_s:.1f} tok/s, {len(phase.done)} ok, {len(phase.failed)} "
                          f"failed, {phase.wrong} wrong; CPU ms per token: {cpu}", flush=True)
                memory["after_load"] = rss(swarm)  # the same peer processes as at the start
                for streams in (1, 16):
                    phases[f"unmerged_{streams}"] = phase = unmerged(swarm, load, streams, args.phase_seconds)
                    print(f"{phase.name}: {phase.agg_tok_s:.1f} tok/s, {len(phase.done)} ok, {len(phase.failed)} "
                          f"failed, {phase.wrong} wrong", flush=True)
                phases["churn"] = phase = load.run(f"churn, {CHURN_STREAMS} streams", CHURN_STREAMS,
                                                   2 * args.phase_seconds, lambda: churn(swarm, spans, args))
                print(f"{phase.name}: {len(phase.done)} ok, {len(phase.failed)} failed, {phase.wrong} wrong",
                      flush=True)
                memory["end"] = rss(swarm)
            else:
                phases[f"{variant}_16"] = phase = load.run(f"swarm, 16 streams, {' '.join(peer_args)}", 16,
                                                           args.phase_seconds)
                print(f"{phase.name}: {phase.agg_tok_s:.1f} tok/s", flush=True)
    return config, hf, phases, memory


def unmerged(swarm: LocalSwarm, load: Load, streams: int, seconds: float) -> Phase:
    """A phase through a `tsotsa serve --no-merge-steps` of the same swarm: every request's session steps
    on its own streams (the coordinator's API, merging, stays idle meanwhile)."""
    env = {**swarm._env(), "TSOTSA_CACHE": str(swarm.cache_dir / "serve")} if swarm.cache_dir else swarm._env()
    server = ManagedProcess("serve", [sys.executable, "-m", "tsotsa", "serve", "--coordinator",
                                      swarm.coordinator_address, "--port", "0", "--no-merge-steps"], env)
    try:
        other = Load(f"{server.wait_for(HTTP_READY).group(1)}/v1", load.prompts, load.new_tokens)
        other.reference = load.reference  # outputs checked against the same first answers
        other.run("warm-up", 2, 5.0)
        roles = {**roles_of(swarm), "api": [server.pid]}
        return other.run(f"swarm, {streams} streams, API --no-merge-steps", streams, seconds, roles=roles)
    finally:
        server.terminate()


def churn(swarm: LocalSwarm, spans: list[str], args: argparse.Namespace) -> None:
    """While the streams run: SIGKILL one replica of the first span and start it again; a new peer joins
    the last span; a replica of the last span leaves with SIGTERM (one replica per span at all times)."""
    time.sleep(args.phase_seconds / 4)
    first = next(p for p in swarm.peers if f"{p.start}:{p.end}" == spans[0])
    swarm.kill_peer(first)
    swarm.add_peers([spans[0]])
    swarm.add_peers([spans[-1]])
    leaving = next(p for p in swarm.peers if f"{p.start}:{p.end}" == spans[-1])
    swarm.stop_peer(leaving)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, hf, phases, memory = run_in_workdir(args, run_all)
    rows = [("configuration", "agg tok/s", "per request", "TTFT p50", "p99", "ITL p50", "p99", "ok/failed")]
    for batch, value in hf.items():
        rows.append((f"transformers, batch {batch}", f"{value:.2f}", "-", "-", "-", "-", "-", "-"))
    rows += [phase.row() for phase in phases.values()]
    one, sixteen = phases["batched_1"], phases["batched_16"]
    churn = phases["churn"]
    summary = {
        **{f"agg_tok_s_{n}": round(phases[f"batched_{n}"].agg_tok_s, 3) for n in STREAMS},
        "speedup_16": round(sixteen.agg_tok_s / one.agg_tok_s, 3) if one.agg_tok_s else None,
        **{f"hf_batch{n}_tok_s": round(hf[n], 3) for n in STREAMS},
        "ratio_16": round(sixteen.agg_tok_s / hf[16], 4),
        "unbatched_agg_tok_s_16": round(phases["unbatched_16"].agg_tok_s, 3),
        "batching_gain_16": round(sixteen.agg_tok_s / phases["unbatched_16"].agg_tok_s, 3)
        if phases["unbatched_16"].agg_tok_s else None,
        "no_window_agg_tok_s_16": round(phases["no_window_16"].agg_tok_s, 3),
        **{f"unmerged_agg_tok_s_{n}": round(phases[f"unmerged_{n}"].agg_tok_s, 3) for n in (1, 16)},
        "merge_gain_16": round(sixteen.agg_tok_s / phases["unmerged_16"].agg_tok_s, 3)
        if phases["unmerged_16"].agg_tok_s else None,
        "window_gain_16": round(sixteen.agg_tok_s / phases["no_window_16"].agg_tok_s, 3)
        if phases["no_window_16"].agg_tok_s else None,
        **{f"cpu_ms_per_token_{n}_{role.split()[0]}": round(ms, 2) for n in (1, 16)
           for role, ms in phases[f"batched_{n}"].cpu_ms_per_token.items()},
        **{f"unmerged_cpu_ms_per_token_16_{role.split()[0]}": round(ms, 2)
           for role, ms in phases["unmerged_16"].cpu_ms_per_token.items()},
        "churn_ok": len(churn.done), "churn_failed": len(churn.failed), "churn_wrong": churn.wrong,
        "wrong_outputs": sum(p.wrong for p in phases.values()),
        "failed_requests": sum(len(p.failed) for p in phases.values()),
        "peer_rss_start_mib": round(memory["start"] / 2 ** 20, 1),
        "peer_rss_after_load_mib": round(memory["after_load"] / 2 ** 20, 1),
        "peer_rss_end_mib": round(memory["end"] / 2 ** 20, 1),
        **model_summary(config), "spans": args.spans, "replicas": 2, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "phase_seconds": args.phase_seconds, "peer_threads": args.threads,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    failures = sorted({reason for phase in phases.values() for reason in phase.failed})[:5]
    note = (f"ms for latencies; outputs checked by their tokens' log-probs; peers' RSS {summary['peer_rss_start_mib']}"
            f" MiB after warm-up, {summary['peer_rss_after_load_mib']} after the load phases (the same processes), "
            f"{summary['peer_rss_end_mib']} after churn (which replaced two of them); "
            f"load average at the end {machine_load()}" + (f"\nfailures: {failures}" if failures else ""))
    report(rows, note, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
