"""Routes through the swarm: which peers carry the hidden states through which blocks.

A route is a shortest path over block boundaries 0..L: a peer serving [s, e) offers an edge from any
boundary b in [s, e) to any boundary in (b, e], costing one network hop plus its measured time per block.
Fast peers and few hops win; a peer may serve just part of its span.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tsotsa.dht import ServerRecord
from tsotsa.errors import SwarmError

HOP_SECONDS = 0.002  # what one extra network hop costs, against the peers' measured compute time


@dataclass(frozen=True)
class Hop:
    server: ServerRecord
    start: int
    end: int


def plan_route(servers: list[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset()
               ) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end) among online peers not in `exclude`."""
    usable = [s for s in servers if s.state == "online" and s.peer_id not in exclude and s.address]
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, Hop] = {}
    queue = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for server in usable:
            if not server.start <= boundary < server.end:
                continue
            per_block = 1.0 / (max(server.throughput, 1e-6) * (server.end - server.start))
            for stop in range(boundary + 1, min(server.end, end) + 1):
                candidate = cost + HOP_SECONDS + (stop - boundary) * per_block
                if candidate < best.get(stop, float("inf")):
                    best[stop] = candidate
                    came_from[stop] = Hop(server, boundary, stop)
                    heapq.heappush(queue, (candidate, stop))
    if end not in best:
        reached = max((b for b in best), default=start)
        raise SwarmError(f"no route covers block {reached}: no online peer serves it")
    route: list[Hop] = []
    boundary = end
    while boundary != start:
        hop = came_from[boundary]
        route.append(hop)
        boundary = hop.start
    return route[::-1]
