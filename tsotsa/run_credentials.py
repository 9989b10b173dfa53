"""Who may train on a peer: credentials the coordinator signs for one run, which peers verify.

A swarm token admits a machine to serve and to query; it must not let that machine replace a served
adapter with its own weights or drive another run's optimizer. So a peer accepts training calls only with a
`SignedRunCredential` for that model and run, signed by the coordinator's Ed25519 key, whose public half
the peer learned from `GetModelInfo` when it joined. Peers never hold the admin token, and a peer that
learns a credential (every call carries it) can use it only for that run, until it expires. The key lives in
the coordinator's state directory, so a restarted coordinator signs with the same one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from tsotsa.records import CLOCK_SKEW_ALLOWANCE
from tsotsa.v1 import tsotsa_pb2 as pb

METADATA_KEY = "x-tsotsa-run-credential-bin"  # "-bin": gRPC carries the value as bytes
CREDENTIAL_LIFETIME = 6 * 3600.0  # seconds; the coordinator signs a fresh one long before it lapses
MAX_CREDENTIAL_BYTES = 4096


class CredentialError(ValueError):
    """Why a training call's credential is refused (the peer answers PERMISSION_DENIED with it)."""


class ForeignSignature(CredentialError):
    """The credential is not signed by the key the verifier knows (perhaps the coordinator has a new one)."""


class RunSigner:
    """The coordinator's signing key, kept in `path` (created, mode 0600, on first use)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
        self._key = key

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key, as `ModelInfo.run_signing_key`."""
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def credential(self, model_id: str, run: str, lifetime: float = CREDENTIAL_LIFETIME) -> bytes:
        """A serialized `SignedRunCredential` for `run`, valid for `lifetime` seconds from now."""
        now = time.time()
        body = pb.RunCredential(model_id=model_id, run=run, issued_at=now, expires_at=now + lifetime)
        data = body.SerializeToString()
        return pb.SignedRunCredential(credential=data, signature=self._key.sign(data)).SerializeToString()


class RunVerifier:
    """A peer's check of training calls against the coordinator's public key."""

    def __init__(self, public_key: bytes) -> None:
        try:
            self._key = Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError:
            raise CredentialError("the coordinator announced no valid run-signing key") from None

    def check(self, presented: bytes | str | None, model_id: str, run: str, now: float | None = None) -> None:
        """Returns if `presented` permits training calls of `run` on `model_id` now; CredentialError if not."""
        if not presented:
            raise CredentialError("training calls are accepted only from the coordinator "
                                  "(this call carries no run credential)")
        if isinstance(presented, str) or len(presented) > MAX_CREDENTIAL_BYTES:
            raise CredentialError("malformed run credential")
        try:
            signed = pb.SignedRunCredential.FromString(presented)
            self._key.verify(signed.signature, signed.credential)
            body = pb.RunCredential.FromString(signed.credential)
        except (DecodeError, InvalidSignature):
            raise ForeignSignature("the run credential is not signed by this swarm's coordinator") from None
        now = time.time() if now is None else now
        if body.model_id != model_id or body.run != run:
            raise CredentialError(f"the run credential is for run {body.run[:80]!r} of {body.model_id[:80]!r}, "
                                  f"not {run[:80]!r} of {model_id[:80]!r}")
        if not body.issued_at - CLOCK_SKEW_ALLOWANCE <= now <= body.expires_at + CLOCK_SKEW_ALLOWANCE:
            raise CredentialError("the run credential has expired (or the clocks disagree by more than "
                                  f"{CLOCK_SKEW_ALLOWANCE:g} s)")
