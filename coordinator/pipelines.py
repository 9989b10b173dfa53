"""Training pipelines: disjoint chains of peers, each covering every block with whole spans.

A peer trains the adapters of all the blocks it serves, so a pipeline uses each peer's whole span (unlike
inference routes, which may use part of one). Peers serving the same blocks are replicas and land in
different pipelines; the fastest chains are formed first.
"""

from __future__ import annotations

import heapq

from tsotsa.client.routing import HOP_SECONDS
from tsotsa.dht import ServerRecord

Pipeline = list[ServerRecord]


def form_pipelines(servers: list[ServerRecord], num_blocks: int) -> list[Pipeline]:
    """As many disjoint full chains as the online peers allow."""
    free = [s for s in servers if s.state == "online" and s.address]
    pipelines: list[Pipeline] = []
    while (chain := _fastest_chain(free, num_blocks)) is not None:
        pipelines.append(chain)
        used = {s.peer_id for s in chain}
        free = [s for s in free if s.peer_id not in used]
    return pipelines


def uncovered_blocks(servers: list[ServerRecord], num_blocks: int) -> list[int]:
    """Blocks no online peer serves: why no pipeline can form."""
    covered = {b for s in servers if s.state == "online" for b in range(s.start, s.end)}
    return [b for b in range(num_blocks) if b not in covered]


def _fastest_chain(servers: list[ServerRecord], num_blocks: int) -> Pipeline | None:
    best: dict[int, float] = {0: 0.0}
    came_from: dict[int, ServerRecord] = {}
    queue = [(0.0, 0)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == num_blocks:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for server in servers:
            if server.start != boundary:
                continue
            candidate = cost + HOP_SECONDS + 1.0 / max(server.throughput, 1e-6)
            if candidate < best.get(server.end, float("inf")):
                best[server.end] = candidate
                came_from[server.end] = server
                heapq.heappush(queue, (candidate, server.end))
    if num_blocks not in best:
        return None
    chain: Pipeline = []
    boundary = num_blocks
    while boundary:
        server = came_from[boundary]
        chain.append(server)
        boundary = server.start
    return chain[::-1]
