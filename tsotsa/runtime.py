"""One worker thread that runs jobs in arrival order and batches queued steps that share a key.

A peer's runtime thread (peer/service.py), on which all of its computation runs, inference and training
alike: as in hivemind's and Petals' servers, concurrent sessions and training calls take turns on the
blocks instead of oversubscribing the cores, and on a GPU the thread keeps its CUDA and cuBLAS state warm,
where gRPC's pool would spread the work over many threads (two NF4 peers on an H100 decoded at 0.45x of
transformers that way, 0.79x on one runtime thread: docs/bench/). A client's LM head (tsotsa.client.model)
uses one too, so that concurrent `generate` calls (the HTTP API's requests) score their tokens in one
matrix product.

Unlike them, it batches across users (continuous batching): steps that share a batch key (on a peer, the
same blocks and adapter) and are queued when the thread becomes free run as one batch (`step`), so one
pass over the weights serves them all: while the thread computes, newcomers queue, and the next pass
takes every compatible one (up to `max_batch`). With a `window` and an `expected(key)` count (`RecentCallers`:
on a peer, its sessions of that key that stepped in the last second), a pass that has fewer steps than expected
waits up to `window` seconds for the others to arrive, so that sessions whose steps come a moment apart
(their clients' round trips differ) still share a pass; a lone session never waits. Callers join and
leave between passes. Other work (`run`: prefill, Forward, training) runs alone, in arrival order with
the steps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
RECENT = 1.0  # seconds: a caller whose last step is this recent is expected at its key's next batch

# Runs one batch of step items of one key on the runtime thread; returns one result per item, in order.
BatchFunction = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass
class _Job:
    future: Future
    work: Callable[[], Any] | None = None  # a plain job
    key: Hashable = None                   # a step: its batch key and item
    item: Any = None


class Runtime:
    """`run(work)`: any work, alone. `step(key, item)`: one item of a batch `batch(key, items)` computes;
    `max_batch` 1 turns batching off (every step alone)."""

    def __init__(self, batch: BatchFunction | None = None, max_batch: int = 32,
                 on_batch: Callable[[int], None] | None = None, name: str = "runtime", window: float = 0.0,
                 expected: Callable[[Hashable], int] | None = None) -> None:
        self._batch, self.max_batch, self._on_batch = batch, max(1, max_batch), on_batch
        self.window, self._expected = window, expected
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Ends the thread once the queued work is done; later calls raise RuntimeError."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on the runtime thread once the work queued before it is done; its result or its
        exception comes back to the calling (gRPC handler) thread."""
        job = _Job(Future(), work=work)
        self._submit(job)
        return job.future.result()

    def step(self, key: Hashable, item: Any) -> Any:
        """Queues one step; returns its result once the batch it ran in is done (or raises its exception)."""
        return self.submit_steps(key, [item])[0].result()

    def submit_steps(self, key: Hashable, items: Sequence[Any]) -> list[Future]:
        """Queues several steps of one key at once (so the next pass finds them all); their futures, in order."""
        if self._batch is None:
            raise RuntimeError("this runtime has no batch function")
        jobs = [_Job(Future(), key=key, item=item) for item in items]
        self._submit(*jobs)
        return [job.future for job in jobs]

    def _submit(self, *jobs: _Job) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("this runtime is closed")
            self._queue.extend(jobs)
            self._ready.notify()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                batch = [job]
                if job.work is None:  # a step: every queued step of its key joins, up to max_batch
                    self._gather(batch)
            if job.work is not None:
                self._finish([job], lambda: [job.work()])
            else:
                self._finish(batch, lambda: self._batch(job.key, [j.item for j in batch]))

    def _gather(self, batch: list[_Job]) -> None:
        """Moves the queued steps of the first one's key into `batch`; while fewer than expected, waits (up
        to the window) for more. Called holding `_ready`, which the wait releases."""
        key = batch[0].key
        target = min(self.max_batch, self._expected(key)) if self.window > 0 and self._expected else 0
        deadline = time.monotonic() + self.window
        while True:
            for other in list(self._queue):
                if len(batch) >= self.max_batch:
                    return
                if other.work is None and other.key == key:
                    batch.append(other)
                    self._queue.remove(other)
            remaining = deadline - time.monotonic()
            if len(batch) >= target or remaining <= 0 or self._closed:
                return
            self._ready.wait(remaining)

    def _finish(self, jobs: list[_Job], compute: Callable[[], Sequence[Any]]) -> None:
        """Sets each job's result (an item's result may itself be an exception: that item fails alone)."""
        try:
            results = compute()
        except BaseException as error:  # the callers get it; the thread goes on
            for j in jobs:
                j.future.set_exception(error)
            return
        if jobs[0].work is None and self._on_batch is not None:
            self._on_batch(len(jobs))
        for j, result in zip(jobs, results):
            if isinstance(result, BaseException):
                j.future.set_exception(result)
            else:
                j.future.set_result(result)


class RecentCallers:
    """Which callers of each batch key stepped lately: how many steps a batch of that key may expect (the
    runtime's window waits for them). A caller is any hashable (a session id, a generate call's token)."""

    def __init__(self, recent: float = RECENT) -> None:
        self.recent = recent
        self._last: dict[Hashable, dict[Hashable, float]] = {}
        self._lock = threading.Lock()

    def stepped(self, key: Hashable, caller: Hashable) -> None:
        with self._lock:
            self._last.setdefault(key, {})[caller] = time.monotonic()

    def forget(self, key: Hashable, caller: Hashable) -> None:
        """The caller is done (a session closed, a generate call returned): no batch waits for it."""
        with self._lock:
            callers = self._last.get(key)
            if callers is not None:
                callers.pop(caller, None)
                if not callers:
                    del self._last[key]

    def count(self, key: Hashable) -> int:
        now = time.monotonic()
        with self._lock:
            callers = self._last.get(key, {})
            for caller in [c for c, t in callers.items() if now - t > self.recent]:
                del callers[caller]
            return len(callers)
