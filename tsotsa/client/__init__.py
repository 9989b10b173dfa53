"""The swarm's client side: `SwarmModel` and how it routes, keeps sessions and recovers from failures."""

from tsotsa.client.config import ClientConfig
from tsotsa.client.model import GenerationStats, SwarmModel

__all__ = ["SwarmModel", "GenerationStats", "ClientConfig"]
