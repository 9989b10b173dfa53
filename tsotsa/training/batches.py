"""Training rows as token ids and labels, and the batches a run feeds its pipelines, in a seeded order.

These are pure functions of a tokenizer and rows, so the coordinator, the demo and an evaluator outside
the coordinator batch a dataset the same way. Batches are addressed by a global micro-batch index into an
endless, seeded stream of epochs, so that the same index means the same examples on every machine, in
every round, and after a restart. The rules are stated in docs/training.md ("Data").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tsotsa.training.chat import chat_example
from tsotsa.training.formats import Fields
from tsotsa.training.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss is taken


def tokenize_row(fields: Fields, tokenizer: PreTrainedTokenizerBase) -> Example:
    """One row in a canonical shape (tsotsa.training.formats): `{"text"}` or `{"prompt", "completion"}` get
    EOS appended so the model learns to stop; a text row learns every token, a prompt row only its completion
    (tokenized without BOS, as a continuation); a `{"messages"}` row is the chat template's rendering,
    learning its assistant turns (tsotsa.training.chat, which raises ChatTemplateError). The tokenizer must
    have an EOS token."""
    if "messages" in fields:
        return chat_example(fields["messages"], tokenizer)
    eos = tokenizer.eos_token_id
    if "text" in fields:
        input_ids = tokenizer(fields["text"]).input_ids + [eos]
        return Example(input_ids, list(input_ids))
    prompt = tokenizer(fields["prompt"]).input_ids
    completion = tokenizer(fields["completion"], add_special_tokens=False).input_ids + [eos]
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at the position it had alone, so RoPE sees the same positions."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.int64)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids, dtype=torch.int64)
        attention_mask[row, :size] = 1
        labels[row, :size] = torch.tensor(example.labels, dtype=torch.int64)
    return input_ids, attention_mask, labels


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A private generator, so the order depends only on (seed, epoch), never on other users of torch's RNG."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def micro_batches(examples: list[Example], micro_batch: int, seed: int, start: int,
                  count: int) -> list[list[Example]]:
    """Micro-batch i is stream positions [i * micro_batch, (i + 1) * micro_batch) of the epochs laid end to end,
    so any range can be rebuilt from its indices alone, by any machine, after any restart."""
    epoch, skip = divmod(start * micro_batch, len(examples))
    needed = count * micro_batch
    order: list[int] = []
    while len(order) < skip + needed:
        order += epoch_order(len(examples), seed, epoch)
        epoch += 1
    picked = [examples[index] for index in order[skip:skip + needed]]
    return [picked[first:first + micro_batch] for first in range(0, needed, micro_batch)]
