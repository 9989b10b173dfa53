"""The peer's one runtime thread, on which all of its computation runs, inference and training alike.

As in hivemind's and Petals' servers: concurrent sessions and training calls take turns on the blocks
instead of oversubscribing the cores, and on a GPU the thread keeps its CUDA and cuBLAS state warm, where
gRPC's pool would spread the work over many threads (two NF4 peers on an H100 decoded at 0.45x of
transformers that way, 0.79x on one runtime thread: docs/bench/).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Runtime:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")

    def run(self, work: Callable[[], T]) -> T:
        """Runs `work` on the runtime thread once the work before it is done; its result or its exception
        comes back to the calling (gRPC handler) thread."""
        return self._executor.submit(work).result()
