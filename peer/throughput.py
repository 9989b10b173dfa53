"""A peer's throughput: what its record announces, measured once at start and then from the work it serves.

The number is "tokens/s of a one-token decode step through the whole span" (`ServerRecord.throughput`):
routes prefer fast peers by it, block selection and rebalancing (peer/rebalance.py) weigh coverage by it.
A probe at start can be far off on a lab machine, whose owner may start a compile or a notebook an hour
later, so the peer keeps re-measuring it from its own single-session decode passes (batched passes serve
several tokens at once and would not be the same quantity) and announces the smoothed value at every
heartbeat.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from tsotsa.spans import BlockSpan

PROBE_STEPS = 9     # decode steps the start-up probe times (the median is taken: one slow step is noise)
SERVED_WEIGHT = 0.05  # weight of each served pass in the running average (about the last 20 passes count)


def measure_throughput(span: BlockSpan, steps: int = PROBE_STEPS) -> float:
    """Tokens/s of a one-token decode step through the whole span, after a short prefill: the median of
    `steps` timed steps (the first one warms up and is not counted)."""
    hidden = torch.zeros(1, 8, span.config.hidden_size)  # the span moves it to its device and dtype
    mask = torch.ones(1, 8, dtype=torch.long)
    cache = span.new_cache()
    span(hidden, mask, torch.arange(8).unsqueeze(0), cache)
    times = []
    for step in range(steps + 1):
        began = time.perf_counter()
        mask = torch.ones(1, 9 + step, dtype=torch.long)
        span(hidden[:, :1], mask, torch.tensor([[8 + step]]), cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize(span.device)
        if step:
            times.append(time.perf_counter() - began)
    return 1.0 / max(statistics.median(times), 1e-9)


class ServedThroughput:
    """The running estimate: starts at the probe's value, then follows the peer's served decode passes."""

    def __init__(self, initial: float, span_blocks: int, weight: float = SERVED_WEIGHT) -> None:
        self._value, self.span_blocks, self.weight = float(initial), span_blocks, weight
        self.passes = 0  # served passes counted so far
        self._lock = threading.Lock()

    @property
    def value(self) -> float:
        return self._value

    def observe(self, blocks: int, seconds: float) -> None:
        """One served decode pass of one session over `blocks` of the span, which took `seconds`."""
        if blocks <= 0 or seconds <= 0:
            return
        rate = blocks / (seconds * self.span_blocks)  # as if the pass had run over the whole span
        with self._lock:
            self._value += self.weight * (rate - self._value)
            self.passes += 1
