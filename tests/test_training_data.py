"""Fine-tuning data: parsing, tokenizing and batching, with every bad file named by its line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from tsotsa.coordinator.data import MAX_LINE_BYTES, DataError, Row, load_examples, parse_jsonl, tokenize
from tsotsa.errors import TsotsaError
from tsotsa.training.batches import Example, collate, epoch_order, micro_batches
from tsotsa.training.loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def jsonl(*rows: object) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode()


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    return path


def test_parse_keeps_line_numbers_and_only_the_relevant_fields() -> None:
    data = jsonl({"text": "a", "id": 7}) + b"\n\n  \r\n" + jsonl({"prompt": "", "completion": "b", "meta": None})
    assert parse_jsonl(data + b"\n", "d") == [Row(1, {"text": "a"}), Row(4, {"prompt": "", "completion": "b"})]


def test_text_rows_learn_every_token(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path, jsonl({"text": "hello swarm"}, {"text": "second row"}))
    examples = load_examples(path, tokenizer, seq_len=64)
    assert len(examples) == 2
    ids = tokenizer("hello swarm").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert examples[0] == Example(ids + [tokenizer.eos_token_id], ids + [tokenizer.eos_token_id])


def test_prompt_tokens_are_masked_exactly(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path, jsonl({"prompt": "Question: two plus two?", "completion": " four"}))
    [example] = load_examples(path, tokenizer, seq_len=64)
    prompt = tokenizer("Question: two plus two?").input_ids
    completion = tokenizer(" four", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion
    assert len(example.labels) == len(example.input_ids)


@pytest.mark.parametrize(("data", "message"), [
    (jsonl({"text": "a"}, {"text": "b"}) + b'\n{"text": "caf\xe9"}', r"^d line 3: not valid UTF-8"),
    (jsonl({"text": "a"}) + b'\n{"text": "b",}', r"^d line 2: invalid JSON: .*\(column \d+\)"),
    (b'["text"]', r"^d line 1: expected a JSON object, got list"),
    (jsonl({"text": "a"}, {"txt": "b"}), r'^d line 2: needs "text", "prompt" and "completion", "messages", '
                                         r'"conversations", or "instruction" and "output"$'),
    (jsonl({"prompt": "a"}), r'^d line 1: "completion" is missing'),
    (jsonl({"completion": "a"}), r'^d line 1: "prompt" is missing'),
    (jsonl({"text": 3}), r'^d line 1: "text" must be a string, got int'),
    (jsonl({"prompt": None, "completion": "a"}), r'^d line 1: "prompt" must be a string, got NoneType'),
    (jsonl({"text": "a", "prompt": "b", "completion": "c"}), r'^d line 1: has both "text" and "prompt"'),
    (jsonl({"text": ""}), r'^d line 1: "text" is empty'),
    (jsonl({"prompt": "a", "completion": ""}), r'^d line 1: "completion" is empty'),
    (b'{"text": "a\\ud800"}', r'^d line 1: "text" holds an unpaired'),
    (b"\n" + b"[" * 100_000, r"^d line 2: invalid JSON: maximum recursion depth"),
    (b"\n" * 4 + b'{"text": "%s"}' % (b"x" * MAX_LINE_BYTES), r"^d line 5: longer than 1 MiB"),
    (b"", r"^d: no examples$"),
    (b"\n  \n\r\n", r"^d: no examples$"),
])
def test_bad_rows_name_the_file_and_line(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_jsonl(data, "d")


def test_a_utf8_bom_is_tolerated() -> None:
    assert parse_jsonl(b'\xef\xbb\xbf{"text": "a"}', "d") == [Row(1, {"text": "a"})]


def test_rows_longer_than_seq_len_are_refused_with_their_line(tmp_path: Path, tokenizer) -> None:
    long_text = "many words " * 20
    tokens = len(tokenizer(long_text).input_ids) + 1
    path = write(tmp_path, jsonl({"text": "short"}, {"prompt": long_text, "completion": "x"}))
    load_examples(path, tokenizer, seq_len=tokens + 5)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: \d+ tokens exceed --seq-len {tokens - 1}$"):
        load_examples(path, tokenizer, seq_len=tokens - 1)
    [example] = load_examples(write(tmp_path, jsonl({"text": long_text})), tokenizer, seq_len=tokens)
    assert len(example.input_ids) == tokens


def test_rows_with_nothing_to_learn_are_refused() -> None:
    class Empty:  # a tokenizer without BOS, on text its normalizer erases: only EOS is left
        eos_token_id = 2

        def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
            return SimpleNamespace(input_ids=[])

    rows = [Row(1, {"text": "a"}), Row(3, {"prompt": "", "completion": "\u200b"})]
    with pytest.raises(DataError, match=r"^d line 1: nothing to learn"):
        tokenize(rows, Empty(), 16, "d")
    with pytest.raises(DataError, match=r"^d line 3: nothing to learn"):
        tokenize(rows[1:], Empty(), 16, "d")


def test_unreadable_paths_fail_readably(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read: No such file"):
        load_examples(tmp_path / "missing.jsonl", tokenizer, 16)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: cannot read: Is a directory"):
        load_examples(tmp_path, tokenizer, 16)
    assert issubclass(DataError, TsotsaError)


def test_load_examples_reports_the_path(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path, jsonl({"text": "a"}) + b"\n{oops")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: invalid JSON"):
        load_examples(path, tokenizer, 16)


def test_collate_pads_on_the_right() -> None:
    examples = [Example([1, 5, 6], [IGNORE_INDEX, 5, 6]), Example([1, 7, 8, 9, 2], [1, 7, 8, 9, 2])]
    input_ids, attention_mask, labels = collate(examples, pad_id=0)
    assert input_ids.shape == attention_mask.shape == labels.shape == (2, 5)
    assert input_ids.dtype == attention_mask.dtype == labels.dtype == torch.int64
    assert input_ids.tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX], [1, 7, 8, 9, 2]]


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(epoch_order(10, seed=3, epoch=0)) == list(range(10))
    assert epoch_order(10, seed=3, epoch=0) == epoch_order(10, seed=3, epoch=0)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=3, epoch=1)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=4, epoch=0)
    torch.manual_seed(0)
    first = epoch_order(10, seed=3, epoch=2)
    torch.manual_seed(1)
    assert epoch_order(10, seed=3, epoch=2) == first


def numbered(count: int) -> list[Example]:
    return [Example([1, index], [1, index]) for index in range(count)]


def test_micro_batch_ranges_tile_the_stream() -> None:
    examples = numbered(7)
    whole = micro_batches(examples, 2, 11, 0, 5)
    assert whole == micro_batches(examples, 2, 11, 0, 2) + micro_batches(examples, 2, 11, 2, 3)
    assert whole == micro_batches(examples, 2, 11, 0, 5)
    assert [micro_batches(examples, 2, 11, index, 1)[0] for index in range(5)] == whole
    assert all(len(batch) == 2 for batch in whole)
    assert micro_batches(examples, 2, 11, 3, 0) == []


def test_the_stream_is_whole_epochs_end_to_end() -> None:
    examples = numbered(6)
    stream = [example.input_ids[1] for batch in micro_batches(examples, 4, 5, 0, 6) for example in batch]
    assert stream == epoch_order(6, 5, 0) + epoch_order(6, 5, 1) + epoch_order(6, 5, 2) + epoch_order(6, 5, 3)
    for epoch in range(4):
        assert sorted(stream[epoch * 6:(epoch + 1) * 6]) == list(range(6))
    later = [example.input_ids[1] for batch in micro_batches(examples, 4, 5, 4, 2) for example in batch]
    assert later == stream[16:24]
