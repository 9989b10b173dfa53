"""Decode steps of several sessions in one pass over the blocks (continuous batching across users).

On one machine a decode step is bound by reading the weights: 16 sessions stepped one after another read
them 16 times, one batched pass reads them once. The runtime thread (tsotsa/runtime.py) hands this module
every queued decode step that shares a batch key — the same blocks and the same adapter (the adapter is
one active choice on the blocks, so different adapters run in per-adapter batches) — and it runs them
with transformers' own decoder layers, unchanged:

KV-cache layout. Every session keeps its own `DynamicCache` ([batch, kv heads, length, head dim] per
layer, lengths differing between sessions). For a pass, the participating sessions' caches are
left-padded to the longest and concatenated along the batch dimension; the 2D attention masks are padded
the same way (padding masked out, so a session attends to exactly what it would alone), the position ids
stay each session's own. The layers append the new token (`DynamicLayer.update`), then each session's
rows are copied back out, without the padding. Per step this copies the participants' cache bytes three
times (in, the layer's own append, out), where stepping alone copies them once (the append): for
short and medium contexts far less than the weights a pass saves reading (a 1024-hidden fp32 block is
50 MB; 16 sessions of 100 tokens hold 13 MB of its KV). Outputs equal stepping alone up to fp32
rounding (the batched matrix products sum in another order), which the tests bound at 1e-5.

Only decode steps (one new token per row, a cache already filled) batch; a prefill runs alone, a chunk
of PREFILL_CHUNK tokens at a time (`prefill_in_chunks`), each chunk its own job on the runtime thread, so
other sessions' decode passes run between the chunks of a long prompt instead of waiting for all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tsotsa.spans import BlockSpan

# (start_block, end_block, adapter): steps that may share a pass
BatchKey = tuple[int, int, str]
PREFILL_CHUNK = 128  # prompt tokens one runtime job computes; decode passes of other sessions run in between

Chunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DecodeStep:
    """One session's decode step, validated: `hidden` [b, 1, hidden], `mask` [b, past + 1] (the session's
    whole 2D mask), `positions` [b, 1]; `cache` the session's, holding `past` tokens for its layers."""

    cache: DynamicCache
    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def past(self) -> int:
        return self.mask.shape[1] - 1


def is_decode_step(hidden: torch.Tensor, cache: DynamicCache, past: int, layer: int) -> bool:
    """A step that may be batched: one new token per row, on a cache that already holds the session's past
    (`layer`: the span's index of the session's first block)."""
    return hidden.shape[1] == 1 and past > 0 and cache.get_seq_length(layer) == past


def run_decode_steps(span: BlockSpan, start: int, end: int, steps: Sequence[DecodeStep]) -> list[torch.Tensor]:
    """Runs every step through global blocks [start, end) in one pass; each session's cache is updated as
    stepping alone would, and its output [b, 1, hidden] (on the span's device) returned, in order."""
    if len(steps) == 1:  # alone: straight on its own cache, no merged copy in or out
        step = steps[0]
        return [span(step.hidden, step.mask, step.positions, step.cache, start, end)]
    first, last = start - span.span.start, end - span.span.start
    longest = max(step.past for step in steps)
    pads = [longest - step.past for step in steps]
    merged = span.new_cache()
    for j in range(first, last):
        layer = merged.layers[j]
        keys = _merge([step.cache.layers[j].keys for step in steps], pads)
        values = _merge([step.cache.layers[j].values for step in steps], pads)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    mask = torch.cat([F.pad(step.mask, (pad, 0)) for step, pad in zip(steps, pads)])
    hidden = torch.cat([step.hidden for step in steps])
    positions = torch.cat([step.positions for step in steps])
    output = span(hidden, mask, positions, merged, start, end)
    outputs, row = [], 0
    for step, pad in zip(steps, pads):
        rows = slice(row, row + step.hidden.shape[0])
        for j in range(first, last):
            source, target = merged.layers[j], step.cache.layers[j]
            target.keys = source.keys[rows, :, pad:].clone()  # a copy: no session keeps the merged tensor alive
            target.values = source.values[rows, :, pad:].clone()
        outputs.append(output[rows])
        row = rows.stop
    return outputs


def _merge(parts: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """The sessions' [b, kv heads, length, head dim] tensors, each left-padded with `pad` zero positions to
    one length, stacked along the batch: one copy of each part (padding then concatenating would be two)."""
    first = parts[0]
    merged = first.new_empty((sum(p.shape[0] for p in parts), first.shape[1], first.shape[2] + pads[0],
                              first.shape[3]))
    row = 0
    for part, pad in zip(parts, pads):
        rows = slice(row, row + part.shape[0])
        if pad:
            merged[rows, :, :pad] = 0
        merged[rows, :, pad:] = part
        row = rows.stop
    return merged


def prefill_in_chunks(run: Chunk, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """A session step of `hidden` [b, n, hidden] as consecutive chunks of at most `chunk` tokens, each through
    `run(hidden, mask, positions)` on the session's cache (which each chunk extends, so a chunk attends to
    the ones before it exactly as one pass would); `mask` [b, past + n], `positions` [b, n]. Returns the
    outputs [b, n, hidden] concatenated."""
    length = hidden.shape[1]
    past = mask.shape[1] - length
    outputs = []
    for begin in range(0, length, chunk):
        end = min(begin + chunk, length)
        outputs.append(run(hidden[:, begin:end], mask[:, :past + end], positions[:, begin:end]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
