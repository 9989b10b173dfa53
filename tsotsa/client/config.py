"""How a client talks to the swarm: timeouts, failures it survives, bans, the wire dtype, DHT start-up.

One frozen value, passed to `SwarmModel` (and from it to `Swarm`, sessions and the DHT node), so every
knob has one documented home; change one with `dataclasses.replace(config, step_timeout=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tsotsa.coordinator_client import RPC_TIMEOUT
from tsotsa.dht import DHT_START_ATTEMPTS, DHT_START_TIMEOUT, DHT_TIMEOUT

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ClientConfig:
    step_timeout: float = 300.0
    """Seconds a peer may take to answer one step (or one Forward) before it counts as failed."""
    max_failures: int = 8
    """Peer failures one generate or forward call survives (each bans the peer and replays elsewhere)."""
    ban_seconds: float = 15.0
    """How long a failed peer stays out of every route of this client (a dead peer's record expires by then)."""
    route_wait: float = 10.0
    """After a failure, how long to keep looking for a route while none covers the blocks: a replica that
    just joined may not be visible in this client's DHT view yet."""
    wire_dtype: "torch.dtype | None" = None
    """dtype of hidden states on the wire; None: the checkpoint's (exact against transformers)."""
    dht_timeout: float = DHT_TIMEOUT
    """Seconds one DHT lookup may take."""
    dht_start_timeout: float = DHT_START_TIMEOUT
    """Seconds the client's DHT node may take to start, per attempt."""
    dht_start_attempts: int = DHT_START_ATTEMPTS
    coordinator_timeout: float = RPC_TIMEOUT
    """Seconds one call to the coordinator may take (fetches of tensors get longer)."""
    verify_fraction: float = 0.0
    """Chance, per hop and step, that the hop's work so far is recomputed on another peer serving the same
    blocks and compared (`tsotsa.client.verify`); 0: never. docs/security.md says what a fraction buys."""
    verified_only: bool = False
    """Hand out (`on_tokens`) and return only tokens every hop's answers were checked for: every hop is
    checked at the end of a generation, and a generation fails if a hop has no replica to check it with."""
    liar_ban_seconds: float = 3600.0
    """How long a peer caught answering wrongly stays out of every route of this client."""
    link_steps: bool = True
    """Send the decode steps of this client's concurrent sessions on each peer as one message on one
    stream (`tsotsa.client.link`); off: every session steps on its own stream."""
    link_window: float = 0.001
    """Seconds a link's message may wait for the client's other sessions that stepped there lately."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], not {self.verify_fraction}")
