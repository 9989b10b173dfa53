"""Fine-tuning data for the coordinator, checked in full before any training round starts.

A round that dies halfway on a bad row wastes every peer's work, so the whole file is parsed and
tokenized up front, and a bad file fails with one line naming the file and the line number.

Batches are addressed by a global micro-batch index into an endless, seeded stream of epochs, so that
the same index means the same examples on every machine, in every round, and after a restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tsotsa.errors import TsotsaError

MAX_LINE_BYTES = 1 << 20
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips: prompt tokens and padding


class DataError(TsotsaError):
    """The fine-tuning data cannot be used as given."""


@dataclass(frozen=True)
class Row:
    line: int  # 1-based, so that tokenizing can still point at the offending line
    fields: dict[str, str]  # {"text"} or {"prompt", "completion"}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss is taken


def parse_jsonl(data: bytes, name: str) -> list[Row]:
    """Every line is checked, so that the first bad one is reported rather than silently dropped."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name} line {number}"
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{where}: longer than {MAX_LINE_BYTES >> 20} MiB")
        if not raw.strip():
            continue
        rows.append(Row(number, _parse_line(raw, where)))
    if not rows:
        raise DataError(f"{name}: no examples")
    return rows


def _parse_line(raw: bytes, where: str) -> dict[str, str]:
    try:
        text = raw.decode("utf-8-sig")  # tolerates the BOM some editors put at the start of a file
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # integers over Python's digit limit, nesting too deep
        raise DataError(f"{where}: invalid JSON: {error}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise DataError(f'{where}: has both "text" and "prompt"/"completion"; use one or the other')
        keys = ("text",)
    elif "prompt" in obj or "completion" in obj:
        keys = ("prompt", "completion")
        missing = [key for key in keys if key not in obj]
        if missing:
            raise DataError(f'{where}: "{missing[0]}" is missing')
    else:
        raise DataError(f'{where}: needs "text", or "prompt" and "completion"')
    for key in keys:
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
        try:
            value.encode("utf-8")  # JSON can escape a lone surrogate, which no tokenizer accepts
        except UnicodeEncodeError:
            raise DataError(f'{where}: "{key}" holds an unpaired \\u surrogate escape') from None
    target = keys[-1]  # the text or the completion: what the loss is taken on
    if obj[target] == "":
        raise DataError(f'{where}: "{target}" is empty')
    return {key: obj[key] for key in keys}


def tokenize(rows: list[Row], tokenizer: PreTrainedTokenizerBase, seq_len: int, name: str) -> list[Example]:
    """Rows too long for the model are refused rather than truncated, which would silently cut the targets."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the model's tokenizer has no end-of-sequence token")
    examples = []
    for row in rows:
        if "text" in row.fields:
            input_ids = tokenizer(row.fields["text"]).input_ids + [eos]
            labels = list(input_ids)
        else:
            prompt = tokenizer(row.fields["prompt"]).input_ids
            completion = tokenizer(row.fields["completion"], add_special_tokens=False).input_ids + [eos]
            input_ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        where = f"{name} line {row.line}"
        if len(input_ids) > seq_len:
            raise DataError(f"{where}: {len(input_ids)} tokens exceed --seq-len {seq_len}")
        # The first label is never predicted (nothing precedes it), so a row needs a target after it.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise DataError(f"{where}: nothing to learn (no target token after the first)")
        examples.append(Example(input_ids, labels))
    return examples


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Example]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    return tokenize(parse_jsonl(data, str(path)), tokenizer, seq_len, str(path))


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
