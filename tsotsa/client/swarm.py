"""The client's view of the swarm: live peers from the DHT, gRPC channels to them, routes, banned peers.

Shared by every thread of one `SwarmModel`: channels and bans are guarded here, the DHT handle guards
itself (`tsotsa.dht.SwarmDHT`), and the watchdog has its own lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from tsotsa.client.config import ClientConfig
from tsotsa.client.link import PeerLink
from tsotsa.client.routing import Hop, plan_route
from tsotsa.client.watchdog import Watchdog
from tsotsa.dht import SwarmDHT
from tsotsa.errors import SwarmError
from tsotsa.records import ServerRecord
from tsotsa.rpc import open_channel
from tsotsa.tls import TlsSettings
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

ROUTE_RETRY_SECONDS = 1.0


class Swarm:
    """The live peers of one model as this client sees them, the channels to them and the bans; safe for
    several threads at once."""

    def __init__(self, dht: SwarmDHT, model_id: str, num_blocks: int, token: str | None = None,
                 config: ClientConfig | None = None, tls: TlsSettings | None = None) -> None:
        self.dht, self.model_id, self.num_blocks, self._token = dht, model_id, num_blocks, token
        self.tls = tls  # every channel to a peer is mutual TLS with it (`tsotsa.tls`)
        self.config = config or ClientConfig()
        self.watchdog = Watchdog()
        self._channels: dict[str, grpc.Channel] = {}
        self._links: dict[str, PeerLink] = {}
        self._banned: dict[str, float] = {}  # peer id -> monotonic time its ban ends
        self._lock = threading.Lock()
        # Told of every peer a spot check caught (the peer and why); SwarmModel reports them to the coordinator.
        self.on_liar: Callable[[ServerRecord, str], None] | None = None

    @property
    def step_timeout(self) -> float:
        return self.config.step_timeout

    def servers(self) -> list[ServerRecord]:
        return list(self.dht.find_servers(self.model_id, self.num_blocks).values())

    def route(self, start: int = 0, end: int | None = None, exclude: frozenset[str] = frozenset(),
              adapter: str = "", wait: float = 0.0) -> list[Hop]:
        """The best route over [start, end) avoiding `exclude` and banned peers; with `adapter`, only through
        peers that have it loaded. While none exists, looks again for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            servers = [s for s in self.servers() if not adapter or adapter in s.adapters]
            try:
                return plan_route(servers, start, self.num_blocks if end is None else end, exclude | self.banned())
            except SwarmError as error:
                if time.monotonic() + ROUTE_RETRY_SECONDS > deadline:
                    raise SwarmError(f"{error} with adapter {adapter!r}") if adapter else error from None
            time.sleep(ROUTE_RETRY_SECONDS)

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        """Leaves the peer out of this client's routes for `seconds` (default `config.ban_seconds`); a
        longer ban already in place stays."""
        until = time.monotonic() + (self.config.ban_seconds if seconds is None else seconds)
        with self._lock:
            self._banned[peer_id] = max(until, self._banned.get(peer_id, 0.0))

    def caught(self, server: ServerRecord, reason: str) -> None:
        """A peer answered wrongly (`tsotsa.client.verify`): out of routes for `config.liar_ban_seconds`,
        and reported."""
        self.ban(server.peer_id, self.config.liar_ban_seconds)
        if self.on_liar is not None:
            self.on_liar(server, reason)

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            for peer_id in [p for p, until in self._banned.items() if until <= now]:
                del self._banned[peer_id]
            return frozenset(self._banned)

    def stub(self, address: str) -> pb_grpc.PeerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = open_channel(address, self._token, self.tls)
            return pb_grpc.PeerStub(channel)

    def link(self, address: str) -> PeerLink | None:
        """This client's link to the peer at `address` (`tsotsa.client.link`); None with `config.link_steps` off."""
        if not self.config.link_steps:
            return None
        with self._lock:
            link = self._links.get(address)
            if link is None:
                link = self._links[address] = PeerLink(self, address)
            return link

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self.watchdog.stop()
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
