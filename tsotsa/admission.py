"""Who may write to the swarm's DHT: the record validators every tsotsa DHT node runs.

hivemind applies `record_validators` to every record a node is asked to store and to every record another
node returns to a lookup, and signs what the node itself stores. Three are used, applied on store in this
order and checked in the reverse one:

1. `hivemind.dht.crypto.RSASignatureValidator` (owner signature): a span record's subkey is
   `[owner:<ssh-rsa public key>]`, the same RSA key as the node's libp2p identity (`dht.key` in its state
   directory), and the value must carry that key's signature over key, subkey, value and expiration. Only
   the owner can write or overwrite the records under its subkey, and the peer id a reader derives from
   the subkey (`tsotsa.records.peer_id_of_owner`) is the node's libp2p peer id: one identity, kept across restarts.
2. `SwarmTokenValidator` (admission), when the swarm has a token: an HMAC over the signed record with a
   key derived from the token, so a process without the token cannot add a record at all.
3. `SpanRecordValidator` (schema): the value, stripped of both, must be a span record that
   `tsotsa.records.ServerRecord.from_dht` accepts (expiration within the swarm-wide lifetime included),
   so a node neither stores nor passes on anything else.

Records are still readable by any node of the DHT: admission is about writing. See docs/security.md.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tsotsa.records import RecordError, ServerRecord

# The key derivation is slow on purpose: DHT records can be read by anyone who reaches the DHT, so a token
# that is a short password must not be recoverable from a record's tag by trying many guesses quickly.
KDF_ITERATIONS = 200_000
KDF_SALT = b"tsotsa/v1 dht admission"


def load_identity(path: str) -> RSAPrivateKey:
    """The node's RSA key from its libp2p identity file (hivemind's format), generated there first if the
    file does not exist yet; the DHT node started with `identity_path=path` has the same key."""
    if not os.path.isfile(path):
        P2P.generate_identity(path)
    with open(path, "rb") as file:
        stored = crypto_pb2.PrivateKey.FromString(file.read())
    if stored.key_type != crypto_pb2.KeyType.RSA:
        raise RecordError(f"the identity {path} is not an RSA key")
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's own unpickling path: wrap an existing key
    key.__setstate__({"_private_key": stored.data})
    return key


def owner_subkey(key: RSAPrivateKey) -> str:
    """The DHT subkey under which the holder of `key` (and only it) stores its span records."""
    return f"[owner:{key.get_public_key().to_bytes().decode()}]"


@functools.lru_cache(maxsize=16)
def admission_key(token: str) -> bytes:
    """The HMAC key of a swarm token (PBKDF2-SHA256; computed once per process and token)."""
    return hashlib.pbkdf2_hmac("sha256", token.encode(), KDF_SALT, KDF_ITERATIONS)


def record_validators(token: str | None, identity: "RSAPrivateKey | None") -> list[RecordValidatorBase]:
    """What a tsotsa DHT node validates with (to pass as `hivemind.DHT(record_validators=...)`); a node with
    no identity (a client) signs nothing and gets a throw-away key."""
    validators = [RSASignatureValidator(identity), SpanRecordValidator()]
    if token:
        validators.append(SwarmTokenValidator(admission_key(token)))
    return validators


class SwarmTokenValidator(RecordValidatorBase):
    """Accepts a record only with a valid `[swarm-mac:...]` tag at the end of its value: an HMAC-SHA256,
    keyed by the token's derived key, over key, subkey, the value before the tag, and expiration."""

    PREFIX = b"[swarm-mac:"

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, record: DHTRecord, value: bytes) -> bytes:
        message = MSGPackSerializer.dumps((record.key, record.subkey, value, record.expiration_time))
        return base64.b64encode(hmac.new(self._key, message, hashlib.sha256).digest())

    def _split(self, value: bytes) -> tuple[bytes, bytes] | None:
        start = value.rfind(self.PREFIX)
        if start < 0 or not value.endswith(b"]"):
            return None
        return value[:start], value[start + len(self.PREFIX):-1]

    def validate(self, record: DHTRecord) -> bool:
        parts = self._split(record.value)
        return parts is not None and hmac.compare_digest(parts[1], self._mac(record, parts[0]))

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + self.PREFIX + self._mac(record, record.value) + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = self._split(record.value)
        return record.value if parts is None else parts[0]

    @property
    def priority(self) -> int:
        return 20  # after the owner signature (10) on store, so checked first on read: cheaper than RSA

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmTokenValidator) and other._key == self._key


class SpanRecordValidator(RecordValidatorBase):
    """Accepts only span records: a value `ServerRecord.from_dht` takes, under an owner subkey. The block
    the key names is not known here (hivemind passes the key's hash), so readers check the span against
    it (`tsotsa.dht.valid_records`)."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey, value = MSGPackSerializer.loads(record.subkey), MSGPackSerializer.loads(record.value)
            ServerRecord.from_dht(subkey, value, record.expiration_time, now=get_dht_time())
        except Exception:  # RecordError, or msgpack's errors for bytes that are not one msgpack object
            return False
        return True

    @property
    def priority(self) -> int:
        return 0  # checked last, on the value stripped of tag and signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SpanRecordValidator)
