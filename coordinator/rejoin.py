"""The coordinator remembers where the swarm's DHT nodes are, so that after a restart it can rejoin them.

The coordinator's DHT node is the peers' bootstrap node, but a restarted coordinator starts with an empty
routing table: the peers still know it, yet nothing makes them call it. So it keeps the DHT addresses the
peers announce in a file beside its database (each time it looks the swarm up, and every few seconds), and
a restarted coordinator bootstraps from them.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tsotsa.client.swarm import Swarm
from tsotsa.records import ServerRecord, multiaddr_problem

logger = logging.getLogger(__name__)
MAX_REMEMBERED = 64


class PeerMemory:
    """The remembered addresses. `save` is called from every thread that looks the swarm up (the run
    drivers, the keep-updated loop): writes are serialized, and one that fails costs a log line, never
    the lookup (a run once failed on two threads replacing the same partial file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: list[str] = []
        self._lock = threading.Lock()

    def load(self) -> list[str]:
        """The remembered DHT addresses that parse (a damaged file costs its bad lines, not the start-up)."""
        try:
            lines = self.path.read_text(errors="replace").split()
        except OSError:
            return []
        return [line for line in lines if multiaddr_problem(line) is None][:MAX_REMEMBERED]

    def save(self, servers: list[ServerRecord]) -> None:
        addresses = sorted({address for server in servers for address in server.dht_addresses})[:MAX_REMEMBERED]
        with self._lock:
            if not addresses or addresses == self._saved:
                return  # an empty swarm says nothing new (keep the last known addresses); an unchanged one neither
            partial = self.path.with_suffix(".partial")
            try:
                partial.write_text("\n".join(addresses) + "\n")
                os.replace(partial, self.path)
            except OSError as error:  # a full disk, a removed directory: retried at the next lookup
                logger.warning("cannot save the swarm's DHT addresses to %s: %s", self.path, error)
                return
            self._saved = addresses

    def keep_updated(self, swarm: "RememberingSwarm", stop: threading.Event, interval: float = 5.0
                     ) -> threading.Thread:
        """Looks the swarm up (which saves its addresses) every `interval` seconds until `stop` is set."""

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    swarm.servers()
                except Exception as error:  # a missed update is retried at the next one
                    logger.warning("cannot remember the swarm's DHT addresses: %s", error)

        thread = threading.Thread(target=loop, name="peer-memory", daemon=True)
        thread.start()
        return thread


class RememberingSwarm(Swarm):
    """The coordinator's view of the swarm: every lookup also updates its memory of the peers."""

    def __init__(self, *args, memory: PeerMemory, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory = memory

    def servers(self) -> list[ServerRecord]:
        found = super().servers()
        self.memory.save(found)
        return found
