"""The span record: what a peer announces in the DHT, and the one place that checks such a record on read.

The DHT takes values from anyone, so a reader trusts nothing it finds there: every field is checked when
the record is read (`ServerRecord.from_dht`), and a record that fails is dropped and counted, never raised
into a lookup, a route, block selection, pipeline forming, `tsotsa status` or a coordinator restart. The
peer's identity is the DHT subkey that holds the record (its libp2p peer id, from a key it keeps across
restarts), not a field of the value, so a value cannot claim to be another peer: the subkey is
`[owner:<RSA public key>]`, hivemind's owner-signed form (`tsotsa.admission`), and the peer id is derived
from that key.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

# No record may claim to be valid further ahead than this (seconds): a peer's record ttl is at most this,
# and a reader refuses expirations past now + MAX_RECORD_LIFETIME + CLOCK_SKEW_ALLOWANCE. Otherwise one bad
# write would pin a dead or forged peer in every route for as long as the writer liked.
MAX_RECORD_LIFETIME = 60.0
# How far apart two machines' clocks may be (hivemind expirations are wall-clock times of the writer).
CLOCK_SKEW_ALLOWANCE = 30.0
MAX_TEXT = 256        # device, dtype, quant, address, one multiaddr
MAX_LIST = 64         # adapters, dht_addresses
OWNER_PATTERN = re.compile(r"\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,1024})\]")


class ServerState(str, Enum):
    """A peer's state as its record announces it."""

    JOINING = "joining"    # announced before loading, so that concurrent joiners see the span as taken
    ONLINE = "online"      # serving: routes and pipelines use it
    DRAINING = "draining"  # SIGTERM received: finishes its open sessions, takes no new ones

    def __str__(self) -> str:
        return self.value


class RecordError(ValueError):
    """A DHT value that is not a valid span record: dropped by readers (and counted)."""


@dataclass
class ServerRecord:
    """One peer's announcement of its span. Read back with `from_dht`, every field holds what its type
    and comment say (a reader may rely on it); built by a peer for `as_value`, it is not checked."""

    peer_id: str            # the DHT subkey that holds the record, not part of the stored value
    address: str            # host:port of the peer's gRPC server; empty only while joining
    start: int
    end: int
    state: ServerState
    throughput: float       # tokens/s of one decode step through the whole span
    device: str = "cpu"
    dtype: str = "float32"
    quant: str = "none"
    adapters: list[str] = field(default_factory=list)
    dht_addresses: list[str] = field(default_factory=list)  # the peer's DHT multiaddrs: others bootstrap from them
    expires_at: float = 0.0  # filled in when read back from the DHT

    def as_value(self) -> dict[str, Any]:
        """The value stored in the DHT (plain types only: identity and expiration live outside it)."""
        return {"address": self.address, "start": self.start, "end": self.end, "state": self.state.value,
                "throughput": float(self.throughput), "device": self.device, "dtype": self.dtype,
                "quant": self.quant, "adapters": list(self.adapters), "dht_addresses": list(self.dht_addresses)}

    @property
    def serving(self) -> bool:
        """Online with an address: what routes and pipelines may use."""
        return self.state == ServerState.ONLINE and bool(self.address)

    @classmethod
    def from_dht(cls, subkey: Any, value: Any, expiration: float, *, now: float, block: int | None = None,
                 num_blocks: int | None = None) -> "ServerRecord":
        """The record stored under block `block`'s key at `subkey`, checked field by field; RecordError if not.

        Without `block` and `num_blocks` (a DHT node's validator sees only the key's hash) the span is
        checked only for being a span. Fields a newer version added are ignored, so an older reader still
        uses the record.
        """
        if not isinstance(subkey, str):
            raise RecordError("subkey is not an [owner:...] public key")
        peer_id = peer_id_of_owner(subkey)
        if not isinstance(value, dict):
            raise RecordError(f"value is a {type(value).__name__}, not a dict")
        if not (isinstance(expiration, (int, float)) and math.isfinite(expiration)):
            raise RecordError("expiration is not a finite number")
        if expiration > now + MAX_RECORD_LIFETIME + CLOCK_SKEW_ALLOWANCE:
            raise RecordError(f"expires {expiration - now:.0f} s ahead, past the swarm's maximum record lifetime "
                              f"({MAX_RECORD_LIFETIME:g} s + {CLOCK_SKEW_ALLOWANCE:g} s of clock skew)")
        start, end = _integer(value, "start"), _integer(value, "end")
        if not 0 <= start < end:
            raise RecordError(f"span {start}:{end} is not a span of blocks")
        if num_blocks is not None and end > num_blocks:
            raise RecordError(f"span {start}:{end} is not inside the model's {num_blocks} blocks")
        if block is not None and not start <= block < end:
            raise RecordError(f"span {start}:{end} stored under block {block}")
        try:
            state = ServerState(_text(value, "state"))
        except ValueError:
            raise RecordError(f"unknown state {value['state']!r}") from None
        throughput = value.get("throughput")
        if isinstance(throughput, bool) or not isinstance(throughput, (int, float)) \
                or not math.isfinite(throughput) or throughput < 0:
            raise RecordError("throughput is not a finite number >= 0")
        address = _text(value, "address")
        if address or state is not ServerState.JOINING:
            _check_host_port(address)
        dht_addresses = _texts(value, "dht_addresses")
        for maddr in dht_addresses:
            problem = multiaddr_problem(maddr)
            if problem:
                raise RecordError(problem)
            if not maddr.endswith(f"/p2p/{peer_id}"):
                raise RecordError(f"dht address {maddr[:80]!r} is not the writer's ({peer_id})")
        return cls(peer_id=peer_id, address=address, start=start, end=end, state=state,
                   throughput=float(throughput), device=_text(value, "device", "cpu"),
                   dtype=_text(value, "dtype", "float32"), quant=_text(value, "quant", "none"),
                   adapters=_texts(value, "adapters"), dht_addresses=dht_addresses, expires_at=float(expiration))


def check_multiaddr(text: str) -> "Multiaddr":
    """A DHT multiaddr others can bootstrap from: it parses and names the node's peer id (/p2p/...)."""
    from hivemind.p2p import PeerID  # here: hivemind loads torch, and `tsotsa status` needs only the enum
    from hivemind.utils.multiaddr import Multiaddr

    try:
        maddr = Multiaddr(text)
        PeerID.from_base58(maddr["p2p"])
    except Exception as error:  # the multiaddr library raises several types, KeyError for a missing /p2p
        raise RecordError(f"bad multiaddr {text[:80]!r}: {error}") from None
    return maddr


@functools.lru_cache(maxsize=4096)
def multiaddr_problem(text: str) -> str | None:
    """Why `text` is no valid multiaddr, or None; cached: the same peers' addresses come back at every
    lookup, and parsing one takes ~0.1 ms."""
    try:
        check_multiaddr(text)
    except RecordError as error:
        return str(error)
    return None


class RejectedRecords:
    """How many DHT values readers dropped, by reason; each reason is logged once per process."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str) -> None:
        kind = reason.split(":", 1)[0][:80]
        with self._lock:
            first = kind not in self._counts
            self._counts[kind] += 1
        if first:
            logger.warning("ignoring an invalid span record in the DHT: %s", reason)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


REJECTED = RejectedRecords()


@functools.lru_cache(maxsize=4096)
def peer_id_of_owner(subkey: str) -> str:
    """The libp2p peer id (base58) of the RSA key an `[owner:ssh-rsa ...]` subkey names: the same id the
    key's holder has as a DHT node (libp2p: the sha2-256 multihash of the key's protobuf encoding).
    RecordError if the subkey is not exactly that. Cached: the same subkeys come back at every lookup."""
    import base58
    import multihash
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.proto import crypto_pb2

    match = OWNER_PATTERN.fullmatch(subkey)
    if match is None:
        raise RecordError("subkey is not an [owner:ssh-rsa ...] public key")
    try:
        public_key = serialization.load_ssh_public_key(match.group(1).encode())
    except (ValueError, TypeError, IndexError):
        raise RecordError("subkey holds no valid public key") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise RecordError("subkey holds no RSA public key")
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256")).decode()


def _integer(value: dict, name: str) -> int:
    item = value.get(name)
    if isinstance(item, bool) or not isinstance(item, int):
        raise RecordError(f"{name} is not an integer")
    return item


def _text(value: dict, name: str, default: str | None = None) -> str:
    item = value.get(name, default)
    if not isinstance(item, str) or len(item) > MAX_TEXT:
        raise RecordError(f"{name} is not a string of at most {MAX_TEXT} characters")
    return item


def _texts(value: dict, name: str) -> list[str]:
    items = value.get(name, [])
    if not isinstance(items, list) or len(items) > MAX_LIST \
            or not all(isinstance(item, str) and len(item) <= MAX_TEXT for item in items):
        raise RecordError(f"{name} is not a list of at most {MAX_LIST} strings")
    return list(items)


def _check_host_port(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecordError(f"address {address[:80]!r} is not host:port")
