"""Requests of the HTTP API → `SwarmModel.generate` calls, each on a worker thread, concurrently.

`SwarmModel` is safe for concurrent callers, so every choice of every request is its own `generate` call
(its own swarm session) on a bounded thread pool; a request waits in the pool's queue when all workers are
busy (`tsotsa:num_requests_waiting`). A streaming client that goes away sets the job's `cancelled` event:
`generate` ends at the next token and closes its sessions on the peers at once.

The engine also answers which models exist (the base, and every fine-tuning run whose adapter the swarm
can apply), checks prompts against the model's context, and records the serving metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tsotsa.api.errors import ApiError
from tsotsa.api.text import TextStream
from tsotsa.client.logprobs import Logprobs
from tsotsa.client.model import SwarmModel
from tsotsa.errors import SwarmError, TsotsaError
from tsotsa.metrics import ServingMetrics

logger = logging.getLogger(__name__)

MODELS_CACHE_SECONDS = 5.0  # how long the list of runs from the coordinator is reused


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Job:
    """One choice to generate: a prompt, how to sample, and where its pieces go."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    logprobs: Logprobs | None = None
    on_piece: Callable[[str, int], None] | None = None  # (new text, tokens generated so far)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Choice:
    prompt_ids: list[int]
    token_ids: list[int]   # generated tokens the text came from (up to a stop sequence)
    text: str
    finish_reason: str     # stop | length | abort
    logprobs: Logprobs | None
    generated: int         # every token generated, for usage


class Engine:
    """Owns the swarm client and the worker pool. `base_name`: the model's name in `/v1/models`."""

    def __init__(self, model: SwarmModel, base_name: str, metrics: ServingMetrics,
                 list_runs: Callable[[], list] | None = None, workers: int = 16) -> None:
        if model.tokenizer is None:
            raise TsotsaError("the model has no tokenizer files: the HTTP API needs them")
        self.model, self.tokenizer, self.base_name, self.metrics = model, model.tokenizer, base_name, metrics
        self.context = int(model.config.max_position_embeddings)
        self.vocab = int(model.config.vocab_size)
        self.eos = model.config.eos_token_id
        self._list_runs = list_runs
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="api-generate")
        self._models: tuple[float, list[str]] = (0.0, [])
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ models

    def adapters(self) -> list[str]:
        """Runs with a trained adapter (from the coordinator, cached a few seconds) and adapters peers
        announce; a coordinator that cannot be asked leaves only the announced ones."""
        with self._lock:
            fetched_at, names = self._models
        if time.monotonic() - fetched_at > MODELS_CACHE_SECONDS:
            names = set()
            if self._list_runs is not None:
                try:
                    names = {run.name for run in self._list_runs() if run.rounds_done > 0}
                except TsotsaError as error:
                    logger.warning("could not list the coordinator's runs: %s", error)
            names |= {name for server in self.model.swarm.servers() for name in server.adapters}
            names = sorted(names)
            with self._lock:
                self._models = (time.monotonic(), names)
        return list(names)

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base): BASE, BASE:RUN or RUN; else 404."""
        if model == self.base_name:
            return None
        run = model.removeprefix(f"{self.base_name}:")
        if run in self.adapters():
            return run
        raise ApiError(404, f"The model `{model[:200]}` does not exist: this server has {self.base_name} and its "
                            f"adapters (GET /v1/models)", param="model", code="model_not_found")

    def check_route(self, adapter: str | None) -> None:
        """503 now, before any streaming starts, when no peers cover the model's blocks."""
        try:
            self.model.swarm.route(adapter=adapter or "")
        except SwarmError as error:
            raise ApiError(503, f"the swarm cannot serve this request now: {error}", code="no_route") from None

    # ------------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def check_ids(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """The number of tokens to generate at most; 400 for ids outside the vocabulary or a context overflow."""
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary (0..{self.vocab - 1})", param=param)
        room = self.context - len(ids)
        if max_tokens is None:
            max_tokens = room
        if room < 0 or max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    # ------------------------------------------------------------------ generation

    def submit(self, job: Job):
        """Queues the job on the worker pool; returns its concurrent.futures.Future of a `Choice`."""
        self.metrics.requests_waiting.inc()
        return self._pool.submit(self._run, job)

    def _run(self, job: Job) -> Choice:
        self.metrics.requests_waiting.dec()
        self.metrics.requests_running.inc()
        began = time.perf_counter()
        reason = "error"
        try:
            choice = self._generate(job, began)
            reason = choice.finish_reason
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
            self.metrics.generation_tokens.inc(choice.generated)
            return choice
        finally:
            self.metrics.requests_running.dec()
            self.metrics.request_latency.observe(time.perf_counter() - began)
            self.metrics.request_success.labels(finished_reason=reason).inc()

    def _generate(self, job: Job, began: float) -> Choice:
        stream = TextStream(self.tokenizer, list(job.sampling.stops))
        last = [began]

        def on_tokens(tokens: torch.Tensor) -> bool:
            now = time.perf_counter()
            (self.metrics.inter_token_latency if stream.ids else self.metrics.time_to_first_token).observe(
                now - last[0])
            last[0] = now
            piece = stream.push(int(tokens[0]))
            if job.on_piece is not None:
                job.on_piece(piece, len(stream.ids))
            return stream.stopped or job.cancelled.is_set()

        sampling = job.sampling
        try:
            output = self.model.generate(
                torch.tensor([job.prompt_ids]), max_new_tokens=sampling.max_tokens,
                do_sample=sampling.temperature > 0, temperature=sampling.temperature or 1.0, top_p=sampling.top_p,
                seed=sampling.seed, on_tokens=on_tokens, adapter=job.adapter, logprobs=job.logprobs,
                eos_token_id=-1 if sampling.ignore_eos else None)
        except SwarmError as error:
            raise ApiError(503, f"the swarm could not complete this request: {error}", code="swarm_error") from None
        generated = output[0, len(job.prompt_ids):].tolist()
        tail = stream.finish()
        if tail and job.on_piece is not None:
            job.on_piece(tail, len(stream.ids))
        if stream.stopped or (not sampling.ignore_eos and self.eos is not None and self.eos in generated):
            reason = "stop"
        elif job.cancelled.is_set():
            reason = "abort"
        else:
            reason = "length"
        kept = stream.tokens_in_text if stream.stopped else len(generated)
        if job.logprobs is not None:
            job.logprobs.truncate(kept)
        return Choice(job.prompt_ids, generated[:kept], stream.sent, reason, job.logprobs, len(generated))
