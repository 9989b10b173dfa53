"""Where a coordinator or peer keeps what must survive its restarts (DHT identity, runs), one process each.

The default directory is keyed by role and model id, so two coordinators (or peers) of different models on
one machine never share a DHT identity or a database; two processes given the same directory are refused
with one line, since they would announce the same peer id.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from tsotsa.errors import TsotsaError


def default_state_dir(role: str, model_id: str) -> Path:
    """`$XDG_DATA_HOME/tsotsa/<role>/<model id>` (XDG_DATA_HOME defaults to ~/.local/share)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tsotsa" / role / model_id


class StateDir:
    """A state directory held by this process alone, for as long as it runs (an flock the kernel frees when
    the process dies, so a crashed process never leaves a stale lock behind)."""

    def __init__(self, path: Path, role: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock: IO | None = open(self.path / f"{role}.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise TsotsaError(f"another {role} on this machine uses the state directory {self.path}; "
                              f"give this one its own --state-dir") from None

    @property
    def identity_path(self) -> str:
        """The DHT node's private key: the same peer id after every restart."""
        return str(self.path / "dht.key")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
