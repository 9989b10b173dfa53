"""Routes through the swarm: which peers carry the hidden states through which blocks.

A route is a shortest path over block boundaries 0..L: a peer serving [s, e) offers an edge from any
boundary b in [s, e) to any boundary in (b, e], costing one network hop plus its measured time per block.
Fast peers and few hops win; a peer may serve just part of its span. Training pipelines
(`tsotsa.coordinator.pipelines`) search the same graph with whole spans only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from tsotsa.errors import SwarmError
from tsotsa.records import ServerRecord

HOP_SECONDS = 0.002  # what one extra network hop costs, against the peers' measured compute time
T = TypeVar("T")
# The edges out of a boundary: (the boundary it reaches, its cost, what it stands for).
Edges = Callable[[int], Iterable[tuple[int, float, T]]]


@dataclass(frozen=True)
class Hop:
    server: ServerRecord
    start: int
    end: int


def cheapest_path(start: int, end: int, edges: Edges) -> list[T] | int:
    """Dijkstra from boundary `start` to `end`: the edges' payloads in order, or, when `end` cannot be
    reached, the furthest boundary that can (where coverage stops)."""
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, T]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for stop, step_cost, payload in edges(boundary):
            candidate = cost + step_cost
            if candidate < best.get(stop, float("inf")):
                best[stop] = candidate
                came_from[stop] = (boundary, payload)
                heapq.heappush(queue, (candidate, stop))
    if end not in best:
        return max(best)
    path: list[T] = []
    boundary = end
    while boundary != start:
        boundary, payload = came_from[boundary]
        path.append(payload)
    return path[::-1]


def plan_route(servers: list[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset()
               ) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end) among online peers not in `exclude`."""
    usable = [s for s in servers if s.serving and s.peer_id not in exclude]

    def edges(boundary: int) -> Iterable[tuple[int, float, Hop]]:
        for server in usable:
            if not server.start <= boundary < server.end:
                continue
            per_block = 1.0 / (max(server.throughput, 1e-6) * (server.end - server.start))
            for stop in range(boundary + 1, min(server.end, end) + 1):
                yield stop, HOP_SECONDS + (stop - boundary) * per_block, Hop(server, boundary, stop)

    route = cheapest_path(start, end, edges)
    if isinstance(route, int):
        raise SwarmError(f"no route covers block {route}: no online peer serves it")
    return route
