"""`SwarmModel`: a Llama whose transformer blocks live in the swarm; embeddings and LM head stay local.

`generate()` follows `transformers` conventions (greedy or sampling with temperature/top-k/top-p through
transformers' own logits warpers, left padding, eos, max_new_tokens) so that, on the same weights, the
swarm produces the tokens `LlamaForCausalLM.generate` produces.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch
from transformers import AutoTokenizer, LlamaConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tsotsa.checkpoint import HEAD_PREFIXES, TOKENIZER_FILES, Checkpoint
from tsotsa.client.config import ClientConfig
from tsotsa.client.logprobs import Logprobs
from tsotsa.client.session import Failures, InferenceSession, Rewind
from tsotsa.client.swarm import Swarm
from tsotsa.codec import decode, encode
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.dht import SwarmDHT, start_dht
from tsotsa.errors import SwarmError
from tsotsa.head import ModelHead
from tsotsa.records import ServerRecord
from tsotsa.remote import cached_checkpoint, default_cache_dir
from tsotsa.rpc import describe_rpc_error
from tsotsa.runtime import Runtime
from tsotsa.spans import position_ids_from_mask
from tsotsa.tls import TlsSettings
from tsotsa.v1 import tsotsa_pb2 as pb

HEAD_BATCH = 64  # rows the LM-head thread scores in one product at most

TokenCallback = Callable[[torch.Tensor], "bool | None"]  # True: end the generation after these tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationStats:
    """What one `generate` call measured (its own, whatever other threads generate at the same time)."""

    new_tokens: int
    seconds: float
    tokens_per_s: float  # decode rate: tokens after the first, over the time after the first
    hops: int            # peers on the route at the end of the call
    checks: int = 0      # spot checks of hops made (`ClientConfig.verify_fraction`, `verified_only`)
    rewound_tokens: int = 0  # tokens dropped and generated again because a peer was caught answering wrongly


class SwarmModel:
    """A Llama whose transformer blocks run in the swarm, with the embeddings and LM head on this machine.

    A caller may rely on: `generate` producing the tokens `LlamaForCausalLM.generate` produces on the same
    weights (greedy, or sampling with transformers' warpers and a seed); `forward` giving its logits; peer
    failures being recovered without changing either (up to `client_config.max_failures` a call); and several
    threads calling `generate`/`forward` on one instance at once, each getting its own result and statistics.
    `close()` (or `with`) stops the DHT node and channels. `tls` (`TlsSettings.load(cert, key, ca)`, or
    `TlsSettings.from_env()`): every connection, to the coordinator and to peers, is mutual TLS.
    """

    def __init__(self, config: LlamaConfig, model_id: str, head: dict[str, torch.Tensor], dht: SwarmDHT,
                 tokenizer=None, wire_dtype: torch.dtype | None = None, device: str = "cpu",
                 token: str | None = None, client_config: ClientConfig | None = None,
                 tls: TlsSettings | None = None) -> None:
        self.config, self.model_id, self.tokenizer, self.dht = config, model_id, tokenizer, dht
        self.device = torch.device(device)
        client_config = client_config or ClientConfig()
        self.swarm = Swarm(dht, model_id, config.num_hidden_layers, token=token, config=client_config, tls=tls)
        self.head = ModelHead(config, head, device)
        # concurrent generate calls (the HTTP API's requests) score their next tokens in one matrix product
        self._head_thread = Runtime(self._logits_of_rows, max_batch=HEAD_BATCH, name="lm-head")
        self.dtype = self.head.dtype
        self.wire_dtype = wire_dtype or client_config.wire_dtype or self.dtype

    # ----------------------------------------------------------- construction

    @classmethod
    def from_coordinator(cls, address: str, *, cache_dir: Path | None = None, initial_peers: list[str] | None = None,
                         wire_dtype: torch.dtype | None = None, device: str = "cpu", token: str | None = None,
                         config: ClientConfig | None = None, tls: TlsSettings | None = None) -> "SwarmModel":
        """Fetches the head and tokenizer once (cached on disk) and joins the DHT as a client."""
        config = config or ClientConfig()
        with CoordinatorClient(address, token=token, timeout=config.coordinator_timeout, tls=tls) as client:
            info = client.model_info()
            checkpoint = cached_checkpoint(client, info, cache_dir or default_cache_dir(), head=True)
        model = cls._from_checkpoint(checkpoint, info.model_id, list(initial_peers or info.dht_initial_peers),
                                     wire_dtype, device, token, config, tls)
        model.swarm.on_liar = functools.partial(report_to_coordinator, address, token, tls, info.model_id,
                                                config.coordinator_timeout)
        return model

    @classmethod
    def from_checkpoint(cls, model_dir: Path | str, initial_peers: list[str], *,
                        wire_dtype: torch.dtype | None = None, device: str = "cpu", token: str | None = None,
                        config: ClientConfig | None = None, tls: TlsSettings | None = None) -> "SwarmModel":
        """Uses a local copy of the checkpoint for the head: works while the coordinator is down."""
        checkpoint = Checkpoint.open(model_dir)
        return cls._from_checkpoint(checkpoint, checkpoint.model_id, initial_peers, wire_dtype, device, token,
                                    config or ClientConfig(), tls)

    @classmethod
    def _from_checkpoint(cls, checkpoint: Checkpoint, model_id: str, initial_peers: list[str],
                         wire_dtype: torch.dtype | None, device: str, token: str | None, config: ClientConfig,
                         tls: TlsSettings | None = None) -> "SwarmModel":
        head = checkpoint.read_prefixes(HEAD_PREFIXES)
        has_tokenizer = any((checkpoint.directory / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory) if has_tokenizer else None
        dht = start_dht(initial_peers, client_mode=True, token=token, timeout=config.dht_timeout,
                        start_timeout=config.dht_start_timeout, attempts=config.dht_start_attempts)
        return cls(checkpoint.config, model_id, head, dht, tokenizer, wire_dtype, device, token, config, tls)

    @property
    def client_config(self) -> ClientConfig:
        return self.swarm.config

    def configure(self, **changes) -> None:
        """Changes some of the client settings (`ClientConfig` fields) for the calls that start after this."""
        self.swarm.config = replace(self.swarm.config, **changes)

    def close(self) -> None:
        self._head_thread.close()
        self.swarm.close()
        self.dht.shutdown()

    def __enter__(self) -> "SwarmModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- compute

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `hidden` [..., hidden]. One position per row ([batch, hidden], a decode step) goes
        through the LM-head thread, which runs the rows of every thread waiting at that moment as one batch."""
        if hidden.ndim == 2:
            return self._head_thread.step(None, hidden)
        return self.head.logits(hidden)

    @torch.inference_mode()
    def _logits_of_rows(self, key: None, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        logits = self.head.logits(torch.cat(rows) if len(rows) > 1 else rows[0])
        return list(logits.split([len(r) for r in rows]))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed(input_ids)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, adapter: str | None = None
                ) -> torch.Tensor:
        """Logits [batch, length, vocab] through stateless Forward calls along one route (with a run's adapter)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.embed(input_ids)
        positions = position_ids_from_mask(mask)
        failures = Failures(self.swarm)
        block = 0
        while block < self.config.num_hidden_layers:
            hop = failures.route(block, self.config.num_hidden_layers, adapter or "")[0]
            request = pb.ForwardRequest(model_id=self.model_id, start_block=hop.start, end_block=hop.end,
                                        hidden_states=encode(hidden, self.wire_dtype), attention_mask=encode(mask),
                                        position_ids=encode(positions), adapter=adapter or "")
            try:
                reply = self.swarm.stub(hop.server.address).Forward(request, timeout=self.swarm.step_timeout)
            except grpc.RpcError as error:
                failure = describe_rpc_error(hop.server.address, "peer", error, self.swarm.tls is not None)
                failures.note(hop.server.peer_id, error.code(), str(failure))
                continue
            hidden = decode(reply.hidden_states, what="hidden_states", ndim=3)
            block = hop.end
        return self.logits(hidden)

    def inference_session(self, batch_size: int, max_length: int, adapter: str | None = None) -> InferenceSession:
        return InferenceSession(self.swarm, batch_size, max_length, self.wire_dtype, adapter or "")

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        on_tokens: TokenCallback | None = None,
        adapter: str | None = None,
        return_stats: bool = False,
        logprobs: Logprobs | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, GenerationStats]:
        """Returns prompt + new tokens [batch, prompt_length + generated], padded like transformers, and with
        `return_stats` this call's `GenerationStats` too. `adapter`: a fine-tuning run's name, applied by every
        peer of the route. `on_tokens(tokens)` gets each step's new tokens [batch] as they come and may return
        True to end the generation there (a stop sequence, a client gone). `logprobs`: filled with the
        log-probs of the new tokens (and of the prompt's, with `logprobs.prompt`) before `on_tokens` sees them."""
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        batch, prompt_length = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        warpers = self._warpers(do_sample, temperature, top_k, top_p)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        unfinished = torch.ones(batch, dtype=torch.bool)
        stopped = False  # on_tokens asked to end here
        prompt_scored = False  # logprobs of the prompt recorded from the current prefill's output
        verified_only = self.swarm.config.verified_only
        began = time.perf_counter()
        first_token_at = None
        produced = delivered = rewound = 0  # tokens sampled, handed to on_tokens, dropped by rewinds
        generator_states: list[torch.Tensor | None] = []  # before sampling each token: a rewind restores it
        positions = position_ids_from_mask(mask)
        pending = (self.embed(input_ids), mask, positions)  # the session step still to make, if any
        with self.inference_session(batch, prompt_length + max_new_tokens, adapter) as session:
            while True:
                finished = produced == max_new_tokens or not unfinished.any() or stopped
                try:
                    if pending is not None:
                        hidden = session.step(*pending)
                        pending = None
                    if finished and verified_only:
                        session.verify_all()
                except Rewind as rewind:  # tokens from step `rewind.step` on were built on a wrong answer
                    kept = rewind.step
                    rewound += produced - kept
                    produced, pending, hidden = kept, None, rewind.hidden
                    input_ids, mask = input_ids[:, :prompt_length + kept], mask[:, :prompt_length + kept]
                    positions = position_ids_from_mask(mask)[:, -1:] if kept else position_ids_from_mask(mask)
                    unfinished = torch.ones(batch, dtype=torch.bool)
                    if eos is not None:
                        unfinished = ~(input_ids[:, prompt_length:] == eos).any(dim=1)
                    if generator is not None:
                        generator.set_state(generator_states[kept])
                    del generator_states[kept:]
                    if logprobs is not None:
                        logprobs.truncate(kept)
                    prompt_scored = prompt_scored and kept > 0
                    continue
                if logprobs is not None and not prompt_scored:  # hidden is the prefill's: the whole prompt
                    logprobs.record_prompt(hidden, input_ids[:, :prompt_length], self.logits)
                    prompt_scored = True
                if verified_only and on_tokens is not None:
                    for index in range(delivered, min(produced, session.verified_steps)):
                        stopped = bool(on_tokens(input_ids[:, prompt_length + index])) or stopped
                    delivered = max(delivered, min(produced, session.verified_steps))
                if finished:
                    break
                if stopped:  # verified_only: asked to stop at a checked token; check the rest, then end
                    continue
                generator_states.append(generator.get_state() if generator is not None else None)
                logits = self.logits(hidden[:, -1]).float().cpu()
                scores = warpers(input_ids, logits)
                if do_sample:
                    probs = torch.softmax(scores, dim=-1)
                    next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                produced += 1
                first_token_at = first_token_at or time.perf_counter()
                if logprobs is not None:
                    logprobs.record_token(logits, next_tokens)
                if on_tokens is not None and not verified_only:
                    stopped = bool(on_tokens(next_tokens))
                if eos is not None:
                    unfinished &= next_tokens != eos
                if produced < max_new_tokens and unfinished.any() and not stopped:
                    positions = positions[:, -1:] + 1
                    pending = (self.embed(next_tokens[:, None]), None, positions)
            route, checks = session.route, session.checks
        generated = input_ids.shape[1] - prompt_length
        elapsed = time.perf_counter() - began
        decode_time = time.perf_counter() - (first_token_at or began)
        stats = GenerationStats(
            new_tokens=generated, seconds=elapsed,
            tokens_per_s=(generated - 1) / decode_time if generated > 1 and decode_time > 0 else 0.0,
            hops=len(route), checks=checks, rewound_tokens=rewound,
        )
        return (input_ids, stats) if return_stats else input_ids

    @staticmethod
    def _warpers(do_sample: bool, temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
        """transformers' own warpers, in generate()'s order, so sampling matches it draw for draw."""
        warpers = LogitsProcessorList()
        if not do_sample:
            return warpers
        if temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p))
        return warpers


def report_to_coordinator(address: str, token: str | None, tls: TlsSettings | None, model_id: str,
                          timeout: float, server: ServerRecord, reason: str) -> None:
    """Tells the coordinator (for `tsotsa status`) about a peer a spot check caught; a coordinator that
    cannot be reached only costs a log line: the peer is banned here in any case."""
    try:
        with CoordinatorClient(address, token=token, timeout=timeout, tls=tls) as client:
            client.report_peer(model_id, server.peer_id, server.start, server.end, reason)
    except SwarmError as error:
        logger.warning("could not report peer %s to the coordinator: %s", server.peer_id, error)


def require_tokenizer(model: SwarmModel):
    if model.tokenizer is None:
        raise SwarmError("the model has no tokenizer files; pass token ids instead of text")
    return model.tokenizer
