"""Streamed text (tsotsa.api.text.TextStream) against the tokenizer's own decode of the whole sequence: the
pieces add up to it, a stop sequence cuts it where `str.index` says, and no sent piece is taken back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsotsa.api.text import TextStream
from tsotsa.tiny_model import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(512)


def stream_all(tokenizer, ids: list[int], stops: list[str]) -> tuple[str, TextStream]:
    stream = TextStream(tokenizer, stops)
    pieces = [stream.push(token) for token in ids]
    pieces.append(stream.finish())
    return "".join(pieces), stream


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(3, 511), min_size=1, max_size=40))
def test_pieces_add_up_to_the_decoded_text(tokenizer, ids):
    text, _ = stream_all(tokenizer, ids, [])
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(3, 511), min_size=2, max_size=40), start=st.integers(0, 30), length=st.integers(1, 4))
def test_a_stop_sequence_cuts_the_text_before_it(tokenizer, ids, start, length):
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[start:start + length]
    if not stop:
        return
    text, stream = stream_all(tokenizer, ids, [stop])
    assert text == full[:full.index(stop)]
    assert stream.stopped


def test_special_tokens_and_eos_add_no_text(tokenizer):
    ids = tokenizer("hello there").input_ids + [tokenizer.eos_token_id]
    text, stream = stream_all(tokenizer, ids, ["zzz"])
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == "hello there"
    assert not stream.stopped and stream.tokens_in_text == len(ids)


def test_held_text_that_never_becomes_a_stop_is_sent_at_the_end(tokenizer):
    ids = tokenizer("the swarm", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ["swarm pools"])
    sent = "".join(stream.push(token) for token in ids)
    assert "swarm" not in sent  # could still have become the stop sequence
    assert sent + stream.finish() == "the swarm"
