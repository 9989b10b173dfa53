"""tsotsa: pool ordinary lab machines into one swarm that serves and fine-tunes Llama-family models.

What a user imports comes from here: `SwarmModel` (generate and forward through the swarm), `ClientConfig`
(its timeouts and failure rules), `GenerationStats`, and the errors (`TsotsaError` and its kinds). The
model classes are loaded on first use, so that `import tsotsa` (and the command-line tools that only talk
to a server) start without torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from tsotsa.errors import CheckpointError, SwarmError, TsotsaError

try:
    __version__ = version("tsotsa")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from tsotsa.client import ClientConfig, GenerationStats, SwarmModel

_LAZY = {"SwarmModel": "tsotsa.client", "GenerationStats": "tsotsa.client", "ClientConfig": "tsotsa.client"}

__all__ = ["__version__", "SwarmModel", "GenerationStats", "ClientConfig", "TsotsaError", "SwarmError",
           "CheckpointError"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tsotsa' has no attribute {name!r}")
