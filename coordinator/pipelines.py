"""Training pipelines: disjoint chains of peers, each covering every block with whole spans.

A peer trains the adapters of all the blocks it serves, so a pipeline uses each peer's whole span (unlike
inference routes, which may use part of one; both are `cheapest_path` searches over block boundaries).
Peers serving the same blocks are replicas and land in different pipelines; the fastest chains are formed
first.
"""

from __future__ import annotations

from collections.abc import Iterable

from tsotsa.client.routing import HOP_SECONDS, cheapest_path
from tsotsa.records import ServerRecord

Pipeline = list[ServerRecord]


def form_pipelines(servers: list[ServerRecord], num_blocks: int) -> list[Pipeline]:
    """As many disjoint full chains as the online peers allow."""
    free = [s for s in servers if s.serving]
    pipelines: list[Pipeline] = []
    while (chain := _fastest_chain(free, num_blocks)) is not None:
        pipelines.append(chain)
        used = {s.peer_id for s in chain}
        free = [s for s in free if s.peer_id not in used]
    return pipelines


def uncovered_blocks(servers: list[ServerRecord], num_blocks: int) -> list[int]:
    """Blocks no online peer serves: why no pipeline can form."""
    covered = {b for s in servers if s.serving for b in range(s.start, s.end)}
    return [b for b in range(num_blocks) if b not in covered]


def _fastest_chain(servers: list[ServerRecord], num_blocks: int) -> Pipeline | None:
    def edges(boundary: int) -> Iterable[tuple[int, float, ServerRecord]]:
        for server in servers:
            if server.start == boundary and server.end <= num_blocks:
                yield server.end, HOP_SECONDS + 1.0 / max(server.throughput, 1e-6), server

    chain = cheapest_path(0, num_blocks, edges)
    return None if isinstance(chain, int) else chain
