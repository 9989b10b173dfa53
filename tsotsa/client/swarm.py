"""The client's view of the swarm: live peers from the DHT, gRPC channels to them, routes through them."""

from __future__ import annotations

import threading

import grpc
import hivemind

from tsotsa.client.routing import Hop, plan_route
from tsotsa.client.watchdog import Watchdog
from tsotsa.dht import ServerRecord, find_servers
from tsotsa.errors import SwarmError
from tsotsa.rpc import open_channel
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc


class Swarm:
    def __init__(self, dht: hivemind.DHT, model_id: str, num_blocks: int, step_timeout: float = 300.0,
                 token: str | None = None) -> None:
        self.dht, self.model_id, self.num_blocks, self._token = dht, model_id, num_blocks, token
        self.step_timeout = step_timeout  # seconds a peer may take to answer one step before it is replaced
        self.watchdog = Watchdog()
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def servers(self) -> list[ServerRecord]:
        return list(find_servers(self.dht, self.model_id, self.num_blocks).values())

    def route(self, start: int = 0, end: int | None = None, exclude: frozenset[str] = frozenset(),
              adapter: str = "") -> list[Hop]:
        """The best route over [start, end); with `adapter`, only through peers that have it loaded."""
        servers = [s for s in self.servers() if not adapter or adapter in s.adapters]
        try:
            return plan_route(servers, start, self.num_blocks if end is None else end, exclude)
        except SwarmError as error:
            raise SwarmError(f"{error} with adapter {adapter!r}") if adapter else error from None

    def stub(self, address: str) -> pb_grpc.PeerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = open_channel(address, self._token)
            return pb_grpc.PeerStub(channel)

    def close(self) -> None:
        self.watchdog.stop()
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
