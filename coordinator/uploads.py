"""Fine-tuning data streamed to the coordinator in chunks (UploadData), kept on disk until a CreateRun uses it.

A data file inside one CreateRun message is capped by gRPC's 64 MiB message limit, and the whole message
sits in memory twice over; streamed, a file is written chunk by chunk to the state directory and only
checked sizes and digests are registered. Everything about uploads is bounded, since each costs disk: an
upload's size (MAX_UPLOAD_BYTES, declared in its first chunk and enforced on every chunk), how many are
kept or being received at once (MAX_PENDING) and their bytes together (MAX_STORE_BYTES; a new upload
drops the oldest unused complete ones to make room, and is refused only when uploads in progress or in use
fill it), how long an unused upload is kept (UPLOAD_TTL), and how long a stream may sit without a chunk
(IDLE_TIMEOUT, enforced by the service). A stream that fails for any reason (refused, cancelled, the client
gone) leaves no file behind, and uploads do not outlive the coordinator process: its start empties the
directory.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tsotsa.errors import TsotsaError
from tsotsa.v1 import tsotsa_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20         # the most data one DataChunk may carry
MAX_UPLOAD_BYTES = 1 << 30    # one upload
MAX_STORE_BYTES = 4 << 30     # all uploads kept or in progress, together
MAX_PENDING = 8               # uploads kept or in progress at once
UPLOAD_TTL = 3600.0           # seconds an unused complete upload is kept
IDLE_TIMEOUT = 60.0           # seconds an upload stream may go without a chunk before it is cancelled
SWEEP_EVERY = 60.0            # seconds between removals of expired uploads
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")


class UploadRefused(TsotsaError):
    """An upload, or a use of one, refused with the gRPC status the caller should answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Upload:
    upload_id: str
    name: str
    path: Path
    size: int
    sha256: str = ""
    complete: bool = False
    claimed: bool = False
    expires_at: float = 0.0   # monotonic; for complete, unclaimed uploads
    created_at: float = 0.0

    def reply(self, now: float) -> pb.DataUpload:
        return pb.DataUpload(upload_id=self.upload_id, total_bytes=self.size, sha256=self.sha256,
                             expires_in=max(0.0, self.expires_at - now))


class UploadStore:
    """The uploads of one coordinator, in DIRECTORY (emptied at start: uploads do not survive a restart)."""

    def __init__(self, directory: Path, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_store_bytes: int = MAX_STORE_BYTES, max_pending: int = MAX_PENDING,
                 ttl: float = UPLOAD_TTL, sweep_every: float = SWEEP_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.max_upload_bytes, self.max_store_bytes = max_upload_bytes, max_store_bytes
        self.max_pending, self.ttl, self._clock = max_pending, ttl, clock
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.iterdir():  # a previous process's uploads, complete or cut short
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        self._stop = threading.Event()
        threading.Thread(target=self._sweep_until_closed, args=(sweep_every,), name="upload-sweeper",
                         daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ receiving

    def receive(self, chunks: Iterable[pb.DataChunk]) -> pb.DataUpload:
        """Writes the chunks of one upload to disk and registers it once its size and sha256 check out; any
        failure (an UploadRefused, or the stream's own error when the client goes) removes what was written."""
        stream = iter(chunks)
        first = next(stream, None)
        if first is None:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT, "UploadData got no chunks")
        upload = self._reserve(first.name, first.total_bytes)
        final = upload.path.with_suffix(".jsonl")
        try:
            self._write(upload, first, stream)
            upload.path.rename(final)
        except BaseException:
            with self._lock:
                self._uploads.pop(upload.upload_id, None)
            upload.path.unlink(missing_ok=True)
            raise
        with self._lock:
            now = self._clock()
            upload.path, upload.complete, upload.expires_at = final, True, now + self.ttl
            return upload.reply(now)

    def _reserve(self, name: str, size: int) -> Upload:
        label = " ".join(name.split())[:120] or "uploaded data"
        if size > self.max_upload_bytes:
            raise UploadRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{label}: {size} bytes is more than an upload "
                                                                    f"may hold ({self.max_upload_bytes} bytes)")
        with self._lock:
            self._sweep_locked()
            while (len(self._uploads) >= self.max_pending or
                   sum(u.size for u in self._uploads.values()) + size > self.max_store_bytes):
                if not self._drop_oldest_unused():
                    raise UploadRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"{label}: the coordinator is receiving or using {len(self._uploads)} uploads "
                                        f"({sum(u.size for u in self._uploads.values())} bytes), its limit "
                                        f"({self.max_pending} uploads, {self.max_store_bytes} bytes); try again later")
            upload_id = secrets.token_hex(16)
            upload = Upload(upload_id, label, self.directory / f"{upload_id}.part", size,
                            created_at=self._clock())
            self._uploads[upload_id] = upload
            return upload

    def _write(self, upload: Upload, first: pb.DataChunk, rest: Iterable[pb.DataChunk]) -> None:
        digest, received, claimed_sha = hashlib.sha256(), 0, ""
        with open(upload.path, "wb") as out:
            for number, chunk in enumerate(_chained(first, rest)):
                where = f"{upload.name}: chunk {number}"
                if claimed_sha:
                    raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{where} follows the chunk that carried the sha256 (it must be the last)")
                if number and (chunk.name or chunk.total_bytes) and (chunk.name, chunk.total_bytes) != (
                        first.name, first.total_bytes):
                    raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{where} names another file or size (only the first chunk carries them)")
                if len(chunk.data) > CHUNK_BYTES:
                    raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{where} holds {len(chunk.data)} bytes; a chunk holds at most {CHUNK_BYTES}")
                received += len(chunk.data)
                if received > upload.size:
                    raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{where} goes past the {upload.size} bytes the first chunk declared")
                out.write(chunk.data)
                digest.update(chunk.data)
                claimed_sha = chunk.sha256
        if not claimed_sha:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{upload.name}: the upload ended without the sha256 its last chunk must carry "
                                f"({received} of {upload.size} bytes arrived)")
        if received < upload.size:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{upload.name}: truncated: {received} of the {upload.size} bytes declared arrived")
        expected = claimed_sha.lower()
        if not _SHA256.fullmatch(expected):
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{upload.name}: the sha256 {claimed_sha[:80]!r} is not 64 hex digits")
        if digest.hexdigest() != expected:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{upload.name}: sha256 mismatch: the {received} bytes received hash to "
                                f"{digest.hexdigest()}, the upload says {expected}")
        upload.sha256 = expected

    # ------------------------------------------------------------ using

    def claim(self, upload_id: str) -> Upload:
        """The complete upload UPLOAD_ID, held for one CreateRun until `release`; NOT_FOUND otherwise."""
        with self._lock:
            self._sweep_locked()
            upload = self._uploads.get(upload_id) if _ID.fullmatch(upload_id) else None
            if upload is None or not upload.complete or upload.claimed:
                state = "in use by another CreateRun" if upload is not None and upload.claimed else (
                    "still being received" if upload is not None else
                    f"unknown: never made, used by a run already, or expired (unused uploads are kept "
                    f"{self.ttl:g} s)")
                raise UploadRefused(grpc.StatusCode.NOT_FOUND, f"no data upload {upload_id[:80]!r} to use: {state}")
            upload.claimed = True
            return upload

    def release(self, upload_id: str, used: bool) -> None:
        """After the CreateRun that claimed it: a used upload is deleted (the run keeps its own copy); an
        unused one (the run was refused) can be claimed again, for another UPLOAD_TTL."""
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                return
            if used:
                del self._uploads[upload_id]
                upload.path.unlink(missing_ok=True)
            else:
                upload.claimed, upload.expires_at = False, self._clock() + self.ttl

    def pending(self) -> list[Upload]:
        with self._lock:
            return list(self._uploads.values())

    # ------------------------------------------------------------ expiry

    def sweep(self) -> None:
        with self._lock:
            self._sweep_locked()

    def _sweep_locked(self) -> None:
        now = self._clock()
        for upload in [u for u in self._uploads.values() if u.complete and not u.claimed and u.expires_at <= now]:
            logger.info("data upload %s (%s) expired unused; deleted", upload.upload_id, upload.name)
            self._forget(upload)

    def _drop_oldest_unused(self) -> bool:
        unused = [u for u in self._uploads.values() if u.complete and not u.claimed]
        if not unused:
            return False
        oldest = min(unused, key=lambda u: u.created_at)
        logger.warning("data upload %s (%s) dropped unused to make room for a new one", oldest.upload_id,
                       oldest.name)
        self._forget(oldest)
        return True

    def _forget(self, upload: Upload) -> None:
        del self._uploads[upload.upload_id]
        upload.path.unlink(missing_ok=True)

    def _sweep_until_closed(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sweep()


def _chained(first: pb.DataChunk, rest: Iterable[pb.DataChunk]) -> Iterable[pb.DataChunk]:
    yield first
    yield from rest


class IdleWatchdog:
    """Calls `on_idle` (cancelling a stream) once `touch` has not been called for `timeout` seconds, so a client
    that stops sending without hanging up does not hold a stream slot and a half-written file for ever."""

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self.timeout, self._on_idle = timeout, on_idle
        self._last = time.monotonic()
        self._done = threading.Event()
        self.fired = False
        threading.Thread(target=self._watch, name="upload-watchdog", daemon=True).start()

    def touch(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self._last > self.timeout:
                self.fired = True
                self._on_idle()
                return
