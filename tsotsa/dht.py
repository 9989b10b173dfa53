"""The hivemind DHT as every role uses it: start a node, announce a span, find the live peers.

Per served block i a peer stores `key = f"{model_id}.block.{i}"`, `subkey = [owner:<its public key>]`, and
a small dict value (`tsotsa.records.ServerRecord`) that expires unless the peer's heartbeat refreshes it, so
a dead peer disappears from routes and the swarm map without anyone cleaning up. Every node runs the
swarm's record validators (`tsotsa.admission`: owner signature, swarm-token tag, span schema), so it
neither stores nor returns a record that fails them; readers also check each record against the block it
was found under (`valid_records`) and drop the ones that fail.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import hivemind
import psutil
from hivemind.utils import get_dht_time

from tsotsa.admission import load_identity, owner_subkey, record_validators
from tsotsa.errors import SwarmError
from tsotsa.records import MAX_RECORD_LIFETIME, REJECTED, RecordError, ServerRecord, check_multiaddr

DHT_START_TIMEOUT = 45.0
DHT_START_ATTEMPTS = 3
DHT_TIMEOUT = 20.0


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.block.{index}"


class SwarmDHT:
    """A running hivemind DHT node, safe to share between threads.

    hivemind's `DHT` sends every request to its node process over one pipe without a lock, so two threads
    calling it at once can interleave their messages; every call here takes the lock for the send only (the
    waits for replies run in parallel).
    """

    def __init__(self, dht: hivemind.DHT, owner: str | None, timeout: float = DHT_TIMEOUT) -> None:
        self._dht, self.timeout = dht, timeout
        self._lock = threading.Lock()
        self.peer_id: str = dht.peer_id.to_base58()
        self.owner = owner  # the subkey this node's records are stored (and signed) under; None: it stores none

    def _run(self, coroutine: Callable, timeout: float | None = None) -> Any:
        with self._lock:
            future = self._dht.run_coroutine(coroutine, return_future=True)
        return future.result(timeout=timeout or self.timeout)

    def visible_maddrs(self) -> list[str]:
        with self._lock:
            return [str(maddr) for maddr in self._dht.get_visible_maddrs()]

    def announce(self, model_id: str, record: ServerRecord, ttl: float) -> None:
        """Stores the record under every block of its span, valid for `ttl` seconds from now."""
        if not 0 < ttl <= MAX_RECORD_LIFETIME:
            raise ValueError(f"record ttl must be in (0, {MAX_RECORD_LIFETIME:g}] seconds")
        if self.owner is None:
            raise ValueError("a DHT node started without an identity cannot announce records")
        keys = [block_key(model_id, i) for i in range(record.start, record.end)]
        self._run(functools.partial(_store, keys=keys, subkey=self.owner, value=record.as_value(),
                                    expiration=get_dht_time() + ttl))

    def find_servers(self, model_id: str, num_blocks: int) -> dict[str, ServerRecord]:
        """Every live peer serving any block of the model, by peer id; invalid records are dropped."""
        return self.survey(model_id, num_blocks)[0]

    def survey(self, model_id: str, num_blocks: int) -> tuple[dict[str, ServerRecord], int]:
        """`find_servers`, and how many values under the model's keys were dropped as invalid."""
        keys = [block_key(model_id, i) for i in range(num_blocks)]
        found = self._run(functools.partial(_get_many, keys=keys))
        return valid_records(found, keys, num_blocks, get_dht_time())

    def shutdown(self) -> None:
        with self._lock:
            self._dht.shutdown()


def valid_records(found: dict, keys: list[str], num_blocks: int, now: float
                  ) -> tuple[dict[str, ServerRecord], int]:
    """The checked records of a `get_many` answer (per peer id, the one that expires last), and the number
    of values dropped (each also counted in `tsotsa.records.REJECTED`)."""
    servers: dict[str, ServerRecord] = {}
    rejected = 0
    for block, key in enumerate(keys):
        entry = found.get(key)
        if entry is None:
            continue
        items = entry.value.items() if isinstance(entry.value, dict) else None
        if items is None:
            REJECTED.add(f"block key holds a {type(entry.value).__name__}, not a dictionary of records")
            rejected += 1
            continue
        for subkey, item in items:
            try:
                record = ServerRecord.from_dht(subkey, item.value, item.expiration_time, block=block,
                                               num_blocks=num_blocks, now=now)
            except RecordError as error:
                REJECTED.add(str(error))
                rejected += 1
                continue
            known = servers.get(record.peer_id)
            if known is None or known.expires_at < record.expires_at:
                servers[record.peer_id] = record
    return servers, rejected


PARENT_POLL = 1.0  # seconds between two looks of a DHT node's process at whether its parent is still there


class OwnedDHT(hivemind.DHT):
    """hivemind's DHT node, which also ends when the process that started it dies without a clean shutdown.

    The node runs in a forked child with a p2pd grandchild; a peer, client or coordinator killed by
    SIGKILL (the OOM killer, `kill -9`, a crashed desktop session) would leave both running, holding the
    DHT port and memory, until the machine reboots. The child watches its parent and, once the parent is
    gone, kills its own descendants (p2pd) and exits.
    """

    def run(self) -> None:
        parent = os.getppid()
        threading.Thread(target=_exit_with_parent, args=(parent,), name="dht-parent-watch", daemon=True).start()
        super().run()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(1)


def start_dht(initial_peers: list[str], host: str = "127.0.0.1", port: int = 0, client_mode: bool = False,
              identity_path: str | None = None, token: str | None = None, nat_traversal: bool = False,
              timeout: float = DHT_TIMEOUT, start_timeout: float = DHT_START_TIMEOUT,
              attempts: int = DHT_START_ATTEMPTS) -> SwarmDHT:
    """Starts a hivemind DHT node (a forked child with its p2p daemon) bootstrapped from `initial_peers`.

    The node validates every record with the swarm's validators (`tsotsa.admission`; with `token`, records
    must carry the token's tag). `identity_path` keeps the node's key, hence its peer id and the subkey of
    its records, across restarts; a node without one (a client) cannot announce. UPnP port mapping and
    libp2p relays stay off unless `nat_traversal`: on a lab network they only widen who can reach the node.

    hivemind forks the calling process; when that process already runs threads (gRPC's, torch's), the
    child can deadlock at random before it is ready (seen here: stuck spawning p2pd). A child not ready in
    time is killed and forked again.
    """
    identity = load_identity(identity_path) if identity_path else None
    validators = record_validators(token, identity)
    for _ in range(attempts):
        dht = OwnedDHT(
            initial_peers=initial_peers or None,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            client_mode=client_mode,
            identity_path=identity_path,
            record_validators=validators,
            nat_port_map=nat_traversal,
            use_relay=nat_traversal,
            use_auto_relay=nat_traversal,
            start=False,
        )
        dht.run_in_background(await_ready=False)
        try:
            dht.wait_until_ready(timeout=start_timeout)
            return SwarmDHT(dht, owner_subkey(identity) if identity else None, timeout)
        except TimeoutError:
            _kill(dht)
        except BaseException:
            _kill(dht)
            raise
    raise SwarmError(f"the DHT node did not start in {attempts} attempts of {start_timeout:g} s")


def start_bootstrap_dht(remembered: list[str], host: str, port: int, identity_path: str, token: str | None,
                        nat_traversal: bool = False) -> SwarmDHT:
    """The coordinator's node: the swarm's bootstrap node, which remembered peers are only a hint for.

    hivemind's daemon refuses to start when none of its initial peers answers (after a power cut, or when
    another swarm on the machine left those addresses behind), so only the remembered peers whose port
    answers now are given, and a node that still cannot reach them starts alone: peers that come back
    bootstrap from it.
    """
    alive = reachable(remembered)
    if alive:
        try:
            return start_dht(alive, host=host, port=port, identity_path=identity_path, token=token,
                             nat_traversal=nat_traversal)
        except Exception:  # they went away in the meantime: hivemind's daemon error, or a timeout
            pass
    return start_dht([], host=host, port=port, identity_path=identity_path, token=token,
                     nat_traversal=nat_traversal)


def reachable(maddrs: list[str], timeout: float = 1.0) -> list[str]:
    """The multiaddrs whose TCP port accepts a connection now (checked in parallel)."""

    def answers(text: str) -> bool:
        try:
            maddr = check_multiaddr(text)
            host = maddr["ip4"] if "ip4" in maddr else maddr["ip6"]
            with socket.create_connection((host, int(maddr["tcp"])), timeout=timeout):
                return True
        except (OSError, KeyError, ValueError, RecordError):
            return False

    if not maddrs:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(maddrs))) as pool:
        return [maddr for maddr, ok in zip(maddrs, pool.map(answers, maddrs)) if ok]


def _kill(dht: hivemind.DHT) -> None:
    dht.kill()
    dht.join(5)


async def _store(_dht: hivemind.DHT, node, *, keys: list[str], subkey: str, value: dict, expiration: float) -> None:
    await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys), num_workers=8)


async def _get_many(_dht: hivemind.DHT, node, *, keys: list[str]) -> dict:
    # latest: search past the first node holding the key. Peers' records for one block may sit on different
    # nodes, and the first answer can lack a peer (seen: a replica missing, so "no route" during recovery).
    return await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=8)
