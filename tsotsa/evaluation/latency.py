"""The latency protocol of `tsotsa eval compare`, the same for the swarm and for one `transformers` process.

What serving papers report, measured the same way for every variant so that the rows compare:

* warm-up: `warmup` runs of each phase first, not counted (first calls pay for allocation, routes, caches);
* one stream: `repeats` greedy generations of exactly `new_tokens` tokens (end-of-sequence ignored, so every
  run does the same work), one after another, prompts taken in turn. Time to first token = from the call
  to the first new token (the prefill and one LM head); latency per token = the gaps between consecutive
  new tokens, pooled over the runs; tokens/s = a run's new tokens over its whole time;
* throughput: `repeats` rounds of `concurrency` requests at once: tokens/s and requests/s of each round's
  wall time. The swarm gets them as separate concurrent requests (as users send them); one `transformers`
  process gets them as one left-padded batch (what a single machine does best);
* every figure is summarized as mean, median, p99, min, max over its samples.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Protocol

from tsotsa.errors import TsotsaError

DEFAULT_PROMPTS = ("The swarm pools ordinary lab machines", "the color of snow is",
                   "Every lab machine runs a peer that hosts a span of blocks,", "Once upon a time")
LIBRARIES = ("tsotsa", "torch", "transformers", "peft", "bitsandbytes", "lm_eval", "hivemind", "grpcio")


@dataclass(frozen=True)
class LatencyProtocol:
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 5
    concurrency: int = 4
    prompts: tuple[str, ...] = DEFAULT_PROMPTS

    def __post_init__(self) -> None:
        for name in ("new_tokens", "repeats", "concurrency"):
            if getattr(self, name) < 1:
                raise TsotsaError(f"the latency protocol's {name} must be at least 1")
        if self.warmup < 0:
            raise TsotsaError("the latency protocol's warmup must be 0 or more")
        if not self.prompts:
            raise TsotsaError("the latency protocol needs at least one prompt")

    def as_dict(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts)}


class Generator(Protocol):
    """What the protocol times: one backend's greedy generation of token ids."""

    def stream(self, ids: list[int], new_tokens: int, on_token: Callable[[], None]) -> None:
        """Generates `new_tokens` tokens after `ids`, calling `on_token` as each one is known."""

    def concurrent(self, prompts: list[list[int]], new_tokens: int) -> int:
        """Generates `new_tokens` after each prompt, all at once; returns the tokens generated in all."""


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """mean, median, p99 (linear interpolation, as numpy's default), min, max and count of `values`."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples to summarize")
    rank = 0.99 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    p99 = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99,
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def measure(generator: Generator, tokenizer, protocol: LatencyProtocol, label: str) -> dict[str, dict]:
    """The protocol's figures for `generator` over the protocol's prompts as `tokenizer` encodes them, with a
    progress bar ("latency (LABEL)") on stderr."""
    from tqdm import tqdm

    prompts = [tokenizer(text)["input_ids"] for text in protocol.prompts]
    with tqdm(total=2 * (protocol.warmup + protocol.repeats), desc=f"latency ({label})") as bar:
        return _timed(generator, prompts, protocol, lambda: bar.update(1))


def _timed(generator: Generator, prompts: list[list[int]], protocol: LatencyProtocol,
           progress: Callable[[], None]) -> dict[str, dict]:
    new = protocol.new_tokens

    def batch(round_: int) -> list[list[int]]:
        return [prompts[(round_ + j) % len(prompts)] for j in range(protocol.concurrency)]

    for round_ in range(protocol.warmup):
        generator.stream(prompts[round_ % len(prompts)], new, lambda: None)
        progress()
        generator.concurrent(batch(round_), new)
        progress()
    first_token, gaps, stream_rates = [], [], []
    for round_ in range(protocol.repeats):
        stamps: list[float] = []
        began = time.perf_counter()
        generator.stream(prompts[round_ % len(prompts)], new, lambda: stamps.append(time.perf_counter()))
        if not stamps:
            raise TsotsaError("a timed generation produced no token")
        first_token.append((stamps[0] - began) * 1e3)
        gaps += [(later - earlier) * 1e3 for earlier, later in zip(stamps, stamps[1:])]
        stream_rates.append(len(stamps) / (stamps[-1] - began))
        progress()
    token_rates, request_rates = [], []
    for round_ in range(protocol.repeats):
        requests = batch(round_)
        began = time.perf_counter()
        tokens = generator.concurrent(requests, new)
        wall = time.perf_counter() - began
        token_rates.append(tokens / wall)
        request_rates.append(len(requests) / wall)
        progress()
    return {"ttft_ms": summary(first_token), "token_ms": summary(gaps or [0.0]),
            "tokens_per_s": summary(stream_rates), "throughput_tokens_per_s": summary(token_rates),
            "requests_per_s": summary(request_rates)}


class SwarmGenerator:
    """The protocol's generator over a `SwarmModel` (and optionally a run's adapter)."""

    def __init__(self, model, adapter: str | None) -> None:
        self.model, self.adapter = model, adapter

    def stream(self, ids: list[int], new_tokens: int, on_token: Callable[[], None]) -> None:
        import torch

        def seen(_tokens) -> bool:
            on_token()
            return False

        self.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, eos_token_id=-1, on_tokens=seen,
                            adapter=self.adapter)

    def concurrent(self, prompts: list[list[int]], new_tokens: int) -> int:
        counts = [0] * len(prompts)
        errors: list[BaseException] = []

        def one(index: int) -> None:
            def seen() -> None:
                counts[index] += 1

            try:
                self.stream(prompts[index], new_tokens, seen)
            except BaseException as error:  # re-raised in the caller's thread
                errors.append(error)

        threads = [threading.Thread(target=one, args=(i,), name=f"latency-{i}") for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return sum(counts)


class TransformersGenerator:
    """The protocol's generator over one process's `transformers` (or PEFT) causal LM."""

    def __init__(self, model, pad_token_id: int) -> None:
        self.model, self.pad = model, pad_token_id

    def stream(self, ids: list[int], new_tokens: int, on_token: Callable[[], None]) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Timestamps(BaseStreamer):
            prompt_seen = False

            def put(self, value) -> None:  # first the prompt, then each new token
                if self.prompt_seen:
                    on_token()
                self.prompt_seen = True

            def end(self) -> None:
                pass

        with torch.inference_mode():
            self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=self.pad, streamer=Timestamps())

    def concurrent(self, prompts: list[list[int]], new_tokens: int) -> int:
        import torch

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding, as batched generation needs
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad)
        return (out.shape[1] - width) * len(prompts)


def describe_machine() -> dict:
    """The machine and software the figures were measured on, as a paper's setup section states it."""
    import psutil
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": _cpu_model(), "physical_cores": psutil.cpu_count(logical=False), "logical_cores": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "gpus": gpus, "torch_threads": torch.get_num_threads(),
            "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
            "libraries": {name: _version(name) for name in LIBRARIES}}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    names = {"lm_eval": "lm-eval"}
    try:
        return metadata.version(names.get(distribution, distribution))
    except metadata.PackageNotFoundError:
        return None


def peak_rss(pid: int) -> int | None:
    """The process's peak resident memory in bytes (Linux's VmHWM), or None where the system does not say."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
