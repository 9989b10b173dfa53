"""Log-probabilities of the tokens a `SwarmModel.generate` call produces, and of its prompt's tokens.

The HTTP API's `logprobs` (OpenAI's legacy object) and `echo` need them, and so does scoring (lm-eval's
`local-completions` sends a text with `echo` and `max_tokens` 0 or 1 and sums the prompt tokens' log-probs).
They are the log-softmax of the raw logits of the swarm's forward pass, before any sampling warper (what
vLLM returns by default), so they compare with `transformers`' `log_softmax(model(ids).logits)`.

A `Logprobs` is passed into `generate`, which fills it as it goes (so that a streaming caller can read the
log-probs of a token in its `on_tokens` callback) and truncates it when a spot check rewinds tokens. Only
the chosen token's log-prob and the `top` best are kept, never a whole vocabulary row per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PROMPT_CHUNK = 256  # prompt positions whose vocabulary-wide logits are held at once


@dataclass
class TokenLogprobs:
    """One position's log-probs for every row of the batch."""

    token: torch.Tensor       # [batch] the token id at this position
    chosen: torch.Tensor      # [batch] its log-prob
    top_values: torch.Tensor  # [batch, top] the `top` highest log-probs at this position, best first
    top_ids: torch.Tensor     # [batch, top] their token ids


@dataclass
class Logprobs:
    """What `generate(..., logprobs=...)` fills in. `prompt`: also the prompt tokens' log-probs (`echo`)."""

    top: int = 0
    prompt: bool = False
    prompt_positions: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.. (token 0 has none)
    tokens: list[TokenLogprobs] = field(default_factory=list)            # one per generated token

    def record_prompt(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                      logits_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`hidden` [batch, prompt_length, hidden] of the prompt after the last block: each prompt token is
        scored by the logits of the position before it (`logits_of`: the LM head), a chunk at a time."""
        if not self.prompt:
            return
        self.prompt_positions = []
        for begin in range(0, input_ids.shape[1] - 1, PROMPT_CHUNK):
            end = min(begin + PROMPT_CHUNK, input_ids.shape[1] - 1)
            logits = logits_of(hidden[:, begin:end])
            self.prompt_positions += [self._score(logits[:, index], input_ids[:, begin + index + 1])
                                      for index in range(end - begin)]

    def record_token(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """`logits` [batch, vocab] of the step that chose `tokens` [batch]."""
        self.tokens.append(self._score(logits, tokens))

    def truncate(self, kept: int) -> None:
        """A rewind dropped the tokens from `kept` on."""
        del self.tokens[kept:]

    def _score(self, logits: torch.Tensor, tokens: torch.Tensor) -> TokenLogprobs:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(self.top, dim=-1) if self.top else (logprobs[:, :0], logprobs[:, :0].long())
        tokens = tokens.long()
        return TokenLogprobs(tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1), values, ids)
