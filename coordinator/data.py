"""Fine-tuning data for the coordinator, checked in full before any training round starts.

A round that dies halfway on a bad row wastes every peer's work, so the whole file is parsed and
tokenized up front, and a bad file fails with one line naming the file and the line number. How a row
becomes tokens and batches is tsotsa.training.batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tsotsa.errors import TsotsaError
from tsotsa.training.batches import Example, tokenize_row
from tsotsa.training.loss import IGNORE_INDEX

MAX_LINE_BYTES = 1 << 20


class DataError(TsotsaError):
    """The fine-tuning data cannot be used as given."""


@dataclass(frozen=True)
class Row:
    line: int  # 1-based, so that tokenizing can still point at the offending line
    fields: dict[str, str]  # {"text"} or {"prompt", "completion"}


def parse_jsonl(data: bytes, name: str) -> list[Row]:
    """Every line is checked, so that the first bad one is reported rather than silently dropped."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name[:120]} line {number}"
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
    if tokenizer.eos_token_id is None:
        raise DataError("the model's tokenizer has no end-of-sequence token")
    examples = []
    for row in rows:
        example = tokenize_row(row.fields, tokenizer)
        where = f"{name} line {row.line}"
        if len(example.input_ids) > seq_len:
            raise DataError(f"{where}: {len(example.input_ids)} tokens exceed --seq-len {seq_len}")
        # The first label is never predicted (nothing precedes it), so a row needs a target after it.
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            raise DataError(f"{where}: nothing to learn (no target token after the first)")
        examples.append(example)
    return examples


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Example]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    return tokenize(parse_jsonl(data, str(path)), tokenizer, seq_len, str(path))
