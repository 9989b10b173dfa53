"""Fine-tuning data for the coordinator, checked in full before any training round starts.

A round that dies halfway on a bad row wastes every peer's work, so the whole file is parsed and
tokenized up front, and a bad file fails with one line naming the file and the line number. Which formats
a row may be in is tsotsa.training.formats; how a row becomes tokens and batches, tsotsa.training.batches
(and tsotsa.training.chat for conversations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tsotsa.errors import TsotsaError
from tsotsa.training.batches import Example, tokenize_row
from tsotsa.training.chat import ChatTemplateError, has_chat_template
from tsotsa.training.formats import Fields, RowError, canonical_fields
from tsotsa.training.loss import IGNORE_INDEX

MAX_LINE_BYTES = 1 << 20


class DataError(TsotsaError):
    """The fine-tuning data cannot be used as given."""


@dataclass(frozen=True)
class Row:
    line: int  # 1-based, so that tokenizing can still point at the offending line
    fields: Fields  # {"text"}, {"prompt", "completion"} or {"messages"} (tsotsa.training.formats)


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


def _parse_line(raw: bytes, where: str) -> Fields:
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
    try:
        return canonical_fields(obj)
    except RowError as error:
        raise DataError(f"{where}: {error}") from None


def tokenize(rows: list[Row], tokenizer: PreTrainedTokenizerBase, seq_len: int, name: str) -> list[Example]:
    """Rows too long for the model are refused rather than truncated, which would silently cut the targets."""
    if tokenizer.eos_token_id is None:
        raise DataError("the model's tokenizer has no end-of-sequence token")
    examples = []
    for row in rows:
        where = f"{name} line {row.line}"
        if "messages" in row.fields and not has_chat_template(tokenizer):
            raise DataError(f"{where}: the model has no chat template; chat rows (\"messages\", "
                            "\"conversations\") need one in its tokenizer files (chat_template.jinja, or "
                            "\"chat_template\" in tokenizer_config.json): use prompt/completion rows instead")
        try:
            example = tokenize_row(row.fields, tokenizer)
        except ChatTemplateError as error:
            raise DataError(f"{where}: {error}") from None
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
