"""`SwarmLM`: the swarm as an lm-eval model, registered as `tsotsa`.

It answers lm-eval's three request types the way lm-eval's own `hf` backend answers them for the same
checkpoint in one process, so that a task's metrics through the swarm are comparable with the `hf`
backend's (tests/test_eval_backend.py holds them to 1e-4):

* `loglikelihood` / `loglikelihood_rolling`: lm-eval's `TemplateLM` splits context and continuation into
  tokens (and `lm_eval.utils` cuts a long text into rolling windows) exactly as for `hf`; the token
  sequences are then scored `batch_size` at a time by one stateless `SwarmModel.forward` each (right
  padding with a mask, as `hf` pads right), the continuation's log-softmax summed and compared with the
  argmax for `is_greedy`.
* `generate_until`: `batch_size` requests at a time run as concurrent `SwarmModel.generate` calls (their
  decode steps merged on the wire and batched on the peers), each ended as soon as one of its stop
  strings appears, the text then cut with lm-eval's own post-processing.

The tokenizer, the maximum length, the prefix token and the stop strings come from the same lm-eval
helpers `hf` uses, over the tokenizer and config the coordinator serves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from tqdm import tqdm

from tsotsa.client.model import SwarmModel
from tsotsa.tls import TlsSettings

DEFAULT_BATCH = 8
MAX_GEN_TOKS = 256  # as lm-eval's hf backend


@register_model("tsotsa")
class SwarmLM(TemplateLM):
    """`coordinator`: HOST:PORT of the swarm's coordinator (or a `model` already connected); `adapter`: a
    fine-tuning run whose adapter every peer applies; `token`: the swarm token (default TSOTSA_TOKEN);
    `batch_size`: sequences per Forward and generations at once."""

    def __init__(self, coordinator: str | None = None, adapter: str | None = None, token: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH, max_length: int | None = None,
                 add_bos_token: bool | None = None, model: SwarmModel | None = None, **_ignored: Any) -> None:
        super().__init__()
        if model is None:
            if not coordinator:
                raise ValueError("the tsotsa model needs coordinator=HOST:PORT")
            model = SwarmModel.from_coordinator(str(coordinator), token=token or os.environ.get("TSOTSA_TOKEN"),
                                                tls=TlsSettings.from_env())
            self._owned = True
        else:
            self._owned = False
        if model.tokenizer is None:
            raise ValueError("the swarm's model has no tokenizer files: lm-eval needs text")
        self.model, self.tokenizer, self.adapter = model, model.tokenizer, adapter or None
        # "auto" (lm-eval's own option) means the default here: the swarm has no one device to probe
        self.batch_size = int(batch_size) if str(batch_size or "auto") != "auto" else DEFAULT_BATCH
        self.add_bos_token = add_bos_token
        self.max_length = int(max_length) if max_length else resolve_max_length(model.config, self.tokenizer)

    def close(self) -> None:
        if self._owned:
            self.model.close()

    # ------------------------------------------------------------------ tokens, as lm-eval's hf backend

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per request
        `(key, context tokens, continuation tokens)`, longest first in batches, answered in order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        # closed on the way out of a failure too, so that the error is a line of its own
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Scoring through the swarm") as progress:
            for batch in _chunks(order, self.batch_size):
                rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
                width = max(len(row) for row in rows)
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for j, row in enumerate(rows):
                    ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
                log_probs = F.log_softmax(self.model.forward(ids, mask, adapter=self.adapter), dim=-1)
                for j, index in enumerate(batch):
                    key, _, continuation = requests[index]
                    scored = log_probs[j, len(rows[j]) - len(continuation):len(rows[j])]
                    target = torch.tensor(continuation)
                    answer = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                    answers[index] = answer
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                progress.update(len(batch))
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's rolling windows of `max_length` tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, generated with its own settings and cut at its first stop string;
        `batch_size` generations run at once."""
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Generating through the swarm") as progress:

            def one(request) -> str:
                text = self._generate(*request.args)
                self.cache_hook.add_partial("generate_until", request.args, text)
                progress.update(1)
                return text

            with ThreadPoolExecutor(max_workers=self.batch_size, thread_name_prefix="lm-eval") as pool:
                return list(pool.map(one, requests))

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
        new_tokens = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        limit = self.max_length - new_tokens if self.max_length > new_tokens else self.max_length
        ids = torch.tensor([self._context_tokens(context)[-limit:]])
        produced: list[int] = []

        def on_tokens(tokens: torch.Tensor) -> bool:  # stop once a stop string is in the text (hf's criterion)
            produced.append(int(tokens[0]))
            text = self.tok_decode(produced)
            return any(stop in text for stop in until)

        self.model.generate(ids, max_new_tokens=new_tokens, do_sample=do_sample,
                            temperature=temperature if do_sample else 1.0, top_p=float(kwargs.get("top_p", 1.0)),
                            top_k=int(kwargs.get("top_k", 0) or 0), on_tokens=on_tokens, adapter=self.adapter)
        return postprocess_generated_text(generation=self.tok_decode(produced), stop=until, think_end_token=None)

    def _context_tokens(self, context: str) -> list[int]:
        """A generation's prompt tokens, as the hf backend's `tok_batch_encode` makes them."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(context, **special)["input_ids"]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for first in range(0, len(items), size):
        yield items[first:first + size]
