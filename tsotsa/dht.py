"""Span records in the hivemind DHT: how peers announce themselves and how everyone finds them.

Per served block i a peer stores `key = f"{model_id}.block.{i}"`, `subkey = its peer id`, and a small dict
value (gRPC address, span, state, throughput, ...) that expires unless the peer's heartbeat refreshes
it, so a dead peer disappears from routes and the swarm map without anyone cleaning up.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields

import hivemind
from hivemind.utils import get_dht_time

from tsotsa.errors import SwarmError

STATES = ("joining", "online", "draining")


@dataclass
class ServerRecord:
    peer_id: str
    address: str            # host:port of the peer's gRPC server
    start: int
    end: int
    state: str
    throughput: float       # tokens/s of one decode step through the whole span
    device: str = "cpu"
    dtype: str = "float32"
    quant: str = "none"
    adapters: list[str] = field(default_factory=list)
    dht_addresses: list[str] = field(default_factory=list)  # the peer's DHT multiaddrs: others bootstrap from them
    expires_at: float = 0.0  # filled in when read back from the DHT

    def as_value(self) -> dict:
        value = asdict(self)
        value.pop("expires_at")
        return value


RECORD_FIELDS = {f.name for f in fields(ServerRecord)} - {"expires_at"}


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.block.{index}"


DHT_START_TIMEOUT = 45.0
DHT_START_ATTEMPTS = 3


def start_dht(initial_peers: list[str], host: str = "127.0.0.1", port: int = 0, client_mode: bool = False,
              identity_path: str | None = None, ensure_bootstrap_success: bool = True) -> hivemind.DHT:
    """Starts a hivemind DHT node (a forked child with its p2p daemon) bootstrapped from `initial_peers`.

    hivemind forks the calling process; when that process already runs threads (gRPC's, torch's), the
    child can deadlock at random before it is ready (seen here: stuck spawning p2pd). A child not ready in
    time is killed and forked again. `identity_path` keeps the node's peer id across restarts (the
    coordinator's: peers' routing tables still point at it when it comes back on the same port).
    """
    for _ in range(DHT_START_ATTEMPTS):
        dht = hivemind.DHT(
            initial_peers=initial_peers or None,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            client_mode=client_mode,
            identity_path=identity_path,
            ensure_bootstrap_success=ensure_bootstrap_success,
            start=False,
        )
        dht.run_in_background(await_ready=False)
        try:
            dht.wait_until_ready(timeout=DHT_START_TIMEOUT)
            return dht
        except TimeoutError:
            dht.kill()
            dht.join(5)
    raise SwarmError(f"the DHT node did not start in {DHT_START_ATTEMPTS} attempts of {DHT_START_TIMEOUT:g} s")


DHT_TIMEOUT = 20.0


def announce(dht: hivemind.DHT, model_id: str, record: ServerRecord, ttl: float) -> None:
    """Stores the record under every block of its span, valid for `ttl` seconds from now."""
    keys = [block_key(model_id, i) for i in range(record.start, record.end)]
    store = functools.partial(_store, keys=keys, subkey=record.peer_id, value=record.as_value(),
                              expiration=get_dht_time() + ttl)
    dht.run_coroutine(store, return_future=True).result(timeout=DHT_TIMEOUT)


def find_servers(dht: hivemind.DHT, model_id: str, num_blocks: int) -> dict[str, ServerRecord]:
    """Every live peer serving any block of the model, by peer id."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    found = dht.run_coroutine(functools.partial(_get_many, keys=keys), return_future=True).result(timeout=DHT_TIMEOUT)
    servers: dict[str, ServerRecord] = {}
    for entry in found.values():
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            value = item.value
            if not isinstance(value, dict):
                continue
            try:  # fields a newer version added are dropped: an older reader still uses the record
                record = ServerRecord(**{k: v for k, v in value.items() if k in RECORD_FIELDS},
                                      expires_at=item.expiration_time)
            except TypeError:
                continue  # a record missing fields this version needs: ignore it rather than fail the lookup
            known = servers.get(record.peer_id)
            if known is None or known.expires_at < record.expires_at:
                servers[record.peer_id] = record
    return servers


async def _store(_dht: hivemind.DHT, node, *, keys: list[str], subkey: str, value: dict, expiration: float) -> None:
    await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys), num_workers=8)


async def _get_many(_dht: hivemind.DHT, node, *, keys: list[str]) -> dict:
    # latest: search past the first node holding the key. Peers' records for one block may sit on different
    # nodes, and the first answer can lack a peer (seen: a replica missing, so "no route" during recovery).
    return await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=8)
