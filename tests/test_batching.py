"""Decode steps of several sessions in one pass (peer/batching.py, peer/runtime.py), against stepping each
session alone through the same transformers layers: outputs and caches equal within fp32 rounding."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from safetensors.torch import load_file

from tsotsa.checkpoint import load_config
from tsotsa.peer.batching import DecodeStep, is_decode_step, prefill_in_chunks, run_decode_steps
from tsotsa.runtime import RecentCallers, Runtime
from tsotsa.spans import BlockSpan, SpanSpec
from tsotsa.tiny_model import make_tiny_model

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def span(tmp_path_factory) -> BlockSpan:
    """4 blocks with grouped-query attention, the peer serving blocks 1:4."""
    path = make_tiny_model(tmp_path_factory.mktemp("batching") / "model", layers=4, hidden=64, heads=8, kv_heads=2,
                           vocab=512, seed=4)
    return BlockSpan(load_config(path), SpanSpec(1, 4), load_file(path / "model.safetensors"))


def prefilled(span: BlockSpan, start: int, batch: int, length: int, seed: int) -> tuple:
    """A session after its prefill: cache, 2D mask (left padding in its first row), next positions."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, span.config.hidden_size, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 3] = 0  # a client's left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = span.new_cache()
    span(hidden, mask, positions, cache, start, span.span.end)
    return cache, mask, positions[:, -1:] + 1


@pytest.mark.parametrize("start", [1, 2])
def test_batched_decode_equals_each_session_alone(span, start):
    """Five sessions (batch 1-3, caches of 2-17 tokens) over blocks start:4, for four decode steps."""
    shapes = [(1, 5), (2, 17), (3, 2), (1, 11), (2, 9)]
    sessions = [prefilled(span, start, batch, length, seed) for seed, (batch, length) in enumerate(shapes)]
    alone = [(copy.deepcopy(c), m.clone(), p.clone()) for c, m, p in sessions]
    generator = torch.Generator().manual_seed(99)
    for _ in range(4):
        tokens = [torch.randn(m.shape[0], 1, span.config.hidden_size, generator=generator) for _, m, _ in sessions]
        steps = []
        for (cache, mask, positions), token in zip(sessions, tokens):
            assert is_decode_step(token, cache, mask.shape[1], start - 1)
            steps.append(DecodeStep(cache, token, torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)],
                                                            dim=1), positions))
        batched = run_decode_steps(span, start, 4, steps)
        for index, ((cache, mask, positions), token) in enumerate(zip(alone, tokens)):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
            expected = span(token, mask, positions, cache, start, 4)
            assert (batched[index] - expected).abs().max().item() <= TOLERANCE
            for j in range(start - 1, 3):
                together, apart = steps[index].cache.layers[j], cache.layers[j]
                assert together.keys.shape == apart.keys.shape
                assert (together.keys - apart.keys).abs().max().item() <= TOLERANCE
                assert (together.values - apart.values).abs().max().item() <= TOLERANCE
            alone[index] = (cache, mask, positions + 1)
        sessions = [(step.cache, step.mask, positions + 1) for step, (_, _, positions) in zip(steps, sessions)]


def test_a_prefill_or_a_fresh_cache_is_not_a_decode_step(span):
    cache, mask, _ = prefilled(span, 1, 1, 4, 0)
    assert is_decode_step(torch.zeros(1, 1, 64), cache, mask.shape[1], 0)
    assert not is_decode_step(torch.zeros(1, 2, 64), cache, mask.shape[1], 0)  # two new tokens
    assert not is_decode_step(torch.zeros(1, 1, 64), span.new_cache(), 0, 0)  # nothing cached yet


def test_steps_queued_while_the_runtime_works_run_as_one_batch():
    """The runtime is held by a job; steps of two keys queue meanwhile; once free, one pass per key."""
    passes: list[tuple] = []
    runtime = Runtime(lambda key, items: (passes.append((key, list(items))), [f"{key}:{i}" for i in items])[1],
                      max_batch=8)
    release, busy = threading.Event(), threading.Event()
    holder = threading.Thread(target=runtime.run, args=(lambda: (busy.set(), release.wait(30)),))
    holder.start()
    assert busy.wait(30)
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, runtime.step("ab"[i % 2], i)))
               for i in range(6)]
    for thread in threads:
        thread.start()
    while sum(1 for job in list(runtime._queue)) < 6:  # every step queued behind the held job
        threading.Event().wait(0.01)
    release.set()
    for thread in threads + [holder]:
        thread.join(30)
    assert sorted((key, sorted(items)) for key, items in passes) == [("a", [0, 2, 4]), ("b", [1, 3, 5])]
    assert results == {i: f"{'ab'[i % 2]}:{i}" for i in range(6)}


def test_the_window_waits_for_the_sessions_expected_and_a_lone_one_never_waits():
    """Steps that come a moment apart share a pass when the peer expects them (they stepped lately); a key
    with one expected session runs at once, even with a window far longer than the test."""
    passes: list[list] = []
    taken = threading.Event()  # the runtime took the first step and asked how many to expect

    def expected(key: str) -> int:
        taken.set()
        return {"three": 3, "one": 1}[key]

    runtime = Runtime(lambda key, items: (passes.append(list(items)), list(items))[1], max_batch=8, window=60.0,
                      expected=expected)
    first = threading.Thread(target=runtime.step, args=("three", 0))
    first.start()
    assert taken.wait(30) and not passes  # alone, it would have run by now: it waits for two more
    later = [threading.Thread(target=runtime.step, args=("three", i)) for i in (1, 2)]
    for thread in later:
        thread.start()
    for thread in [first, *later]:
        thread.join(30)
    assert [sorted(items) for items in passes] == [[0, 1, 2]]
    assert runtime.step("one", 7) == 7 and passes[-1] == [7]


def test_a_peers_expected_steps_are_its_sessions_that_stepped_lately():
    steppers = RecentCallers(recent=60.0)
    key, other = (0, 2, ""), (0, 2, "run")
    steppers.stepped(key, "a")
    steppers.stepped(key, "b")
    steppers.stepped(other, "c")
    assert (steppers.count(key), steppers.count(other), steppers.count((2, 4, ""))) == (2, 1, 0)
    steppers.forget(key, "a")
    assert steppers.count(key) == 1
    stale = RecentCallers(recent=0.0)
    stale.stepped(key, "a")
    threading.Event().wait(0.01)
    assert stale.count(key) == 0


def test_a_failing_pass_fails_its_steps_and_the_runtime_goes_on():
    def batch(key, items):
        if key == "bad":
            raise ValueError("no")
        return [item * 2 for item in items]

    runtime = Runtime(batch)
    with pytest.raises(ValueError):
        runtime.step("bad", 1)
    assert runtime.step("good", 4) == 8
    assert runtime.run(lambda: "plain") == "plain"


def test_a_long_prefill_in_chunks_equals_one_pass(span):
    """300 prompt tokens as chunks of 128 (other sessions' passes may run in between) against one pass."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 300, span.config.hidden_size, generator=generator)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :40] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    whole_cache, chunked_cache = span.new_cache(), span.new_cache()
    whole = span(hidden, mask, positions, whole_cache)
    chunked = prefill_in_chunks(lambda h, m, p: span(h, m, p, chunked_cache), hidden, mask, positions, chunk=128)
    assert (chunked - whole).abs().max().item() <= TOLERANCE
    for j in range(3):
        assert (chunked_cache.layers[j].keys - whole_cache.layers[j].keys).abs().max().item() <= TOLERANCE
