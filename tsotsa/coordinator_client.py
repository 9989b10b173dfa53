"""The one client of the coordinator's gRPC service: model identity, swarm map, fetching, fine-tuning runs.

Every failure comes back as a `SwarmError` with one readable line (`tsotsa.rpc.describe_refusal`). Kept free
of torch, so that command-line tools that only talk to the coordinator start fast: what turns fetched bytes
into tensors lives beside it, in `tsotsa.remote`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tsotsa.auth import ADMIN_METADATA
from tsotsa.errors import SwarmError, TsotsaError
from tsotsa.rpc import describe_refusal, open_channel, tls_failure
from tsotsa.tls import TlsSettings
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

RPC_TIMEOUT = 30.0
FETCH_TIMEOUT = 600.0
FETCH_BUSY_WAIT = 120.0  # seconds a fetch waits for a free stream on a busy coordinator
ADAPTER_TIMEOUT = 120.0
UPLOAD_TIMEOUT = 3600.0  # seconds one data upload may take (a GiB over a slow link)
UPLOAD_CHUNK_BYTES = 1 << 20  # the most a DataChunk may carry (coordinator/uploads.py)
# Waiting for a coordinator that is not up yet: the pause between tries doubles up to this, and a line
# saying what is awaited is printed at most this often.
WAIT_BACKOFF_MAX = 8.0
_NOT_UP_YET = {grpc.StatusCode.UNAVAILABLE: "not reachable yet",
               grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time"}


@dataclass(frozen=True)
class FetchedTensor:
    """A tensor's bytes as the coordinator sent them (row-major), with its dtype name and shape."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


class CoordinatorClient:
    """Every call of the coordinator's service; each failure is a `SwarmError` with one readable line.
    `admin_token` is sent only with the calls that launch or stop runs; `tls`: mutual TLS (`tsotsa.tls`)."""

    def __init__(self, address: str, token: str | None = None, admin_token: str | None = None,
                 timeout: float = RPC_TIMEOUT, tls: TlsSettings | None = None) -> None:
        self.address, self.timeout, self._tls = address, timeout, tls is not None
        self._admin = ((ADMIN_METADATA, admin_token),) if admin_token else None
        self._channel = open_channel(address, token, tls)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, *, admin: bool = False, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                               metadata=self._admin if admin else None)
        except grpc.RpcError as error:
            raise describe_refusal(self.address, "coordinator", error, self._tls) from None

    # ------------------------------------------------------------ the model

    def model_info(self) -> pb.ModelInfo:
        return self._call("GetModelInfo", pb.ModelInfoRequest())

    def wait_for_model_info(self, wait_timeout: float | None, say: Callable[[str], None]) -> pb.ModelInfo:
        """`model_info`, waiting while the coordinator cannot be reached (machines boot in any order): tries
        again with backoff, saying so on one line each time, until `wait_timeout` seconds (None: no limit)
        have passed; then raises the last error. Refusals (a wrong token, a TLS handshake that failed, ...) are
        raised at once: waiting would not change them."""
        began, pause = time.monotonic(), 1.0
        while True:
            try:
                return self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=min(self.timeout, 10.0))
            except grpc.RpcError as error:
                failure = describe_refusal(self.address, "coordinator", error, self._tls)
                if error.code() not in _NOT_UP_YET or tls_failure(self.address, "coordinator", error, self._tls):
                    raise failure from None
                reason = _NOT_UP_YET[error.code()]
            waited = time.monotonic() - began
            if wait_timeout is not None and waited + pause > wait_timeout:
                raise failure
            say(f"waiting for the coordinator at {self.address}: {reason}; next try in {pause:.0f} s "
                f"({waited:.0f} s so far)")
            time.sleep(pause)
            pause = min(pause * 2, WAIT_BACKOFF_MAX)

    def swarm_status(self) -> pb.SwarmMap:
        return self._call("SwarmStatus", pb.SwarmStatusRequest())

    def report_peer(self, model_id: str, peer_id: str, start: int, end: int, reason: str) -> None:
        """Tells the coordinator a spot check caught `peer_id` answering wrongly on blocks [start, end)."""
        self._call("ReportPeer", pb.PeerReport(model_id=model_id, peer_id=peer_id, start_block=start,
                                               end_block=end, reason=reason))

    def fetch(self, model_id: str, prefixes: list[str], files: list[str]
              ) -> tuple[dict[str, FetchedTensor], dict[str, bytes]]:
        """Downloads tensors and files, checking every item's sha256 and that it is one that was asked for
        (a tensor under one of `prefixes`, a file of `files`). A coordinator serving its maximum of streams
        (a lab booting at once) answers RESOURCE_EXHAUSTED: the fetch waits and starts again, for up to
        FETCH_BUSY_WAIT seconds."""
        deadline = time.monotonic() + FETCH_BUSY_WAIT
        pause = 0.5
        while True:
            try:
                return self._fetch_once(model_id, prefixes, files)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() + pause > deadline:
                    raise describe_refusal(self.address, "coordinator", error, self._tls) from None
            time.sleep(pause)
            pause = min(2 * pause, 8.0)

    def _fetch_once(self, model_id: str, prefixes: list[str], files: list[str]
                    ) -> tuple[dict[str, FetchedTensor], dict[str, bytes]]:
        tensors: dict[str, FetchedTensor] = {}
        blobs: dict[str, bytes] = {}
        request = pb.FetchRequest(model_id=model_id, tensor_prefixes=prefixes, file_names=files)
        current: pb.FetchChunk | None = None
        buffer = bytearray()
        for chunk in self._stub.Fetch(request, timeout=max(self.timeout, FETCH_TIMEOUT)):
            if chunk.offset == 0:
                current, buffer = chunk, bytearray()
                if not (chunk.name in files if chunk.is_file else chunk.name.startswith(tuple(prefixes))):
                    raise SwarmError(f"coordinator at {self.address} sent {chunk.name[:80]!r}, which was not "
                                     "asked for")
            if current is None or chunk.name != current.name or chunk.offset != len(buffer):
                raise SwarmError(f"coordinator at {self.address} sent an out-of-order chunk of {chunk.name}")
            buffer += chunk.data
            if not chunk.sha256:
                continue
            if len(buffer) != current.total_bytes or hashlib.sha256(buffer).hexdigest() != chunk.sha256:
                raise SwarmError(f"checksum mismatch for {chunk.name} from coordinator at {self.address}")
            if current.is_file:
                blobs[current.name] = bytes(buffer)
            else:
                tensors[current.name] = FetchedTensor(bytes(buffer), current.dtype, tuple(current.shape))
            current = None
        return tensors, blobs

    # ------------------------------------------------------------------ runs

    def adapter(self, run: str, start: int = 0, end: int = 0) -> pb.AdapterTensors:
        """A run's latest aggregated adapter, for blocks [start, end) (end 0: all), in PEFT's key names
        (`tsotsa.remote.fetch_adapter` decodes it)."""
        return self._call("GetAdapter", pb.AdapterRequest(run=run, start_block=start, end_block=end),
                          timeout=max(self.timeout, ADAPTER_TIMEOUT))

    def create_run(self, name: str, config: pb.RunConfig, train: Path, eval: Path | None) -> pb.RunInfo:
        """Launches run NAME on TRAIN (and EVAL): JSONL files, or `datasets` directories (`save_to_disk`) sent
        as JSONL. Both are checked (and directories converted) before any call; each is then uploaded in chunks
        (`upload_data`; one upload when both are the same file) and the run created on the uploads."""
        train_name, train_source = _load(train, "training data", ("train",))
        eval_name, eval_source = _load(eval, "evaluation data", _EVAL_SPLITS) if eval is not None else ("", None)
        train_upload = self.upload_data(train_name, train_source).upload_id
        if eval_source is None:
            eval_upload = ""
        elif eval_source == train_source:
            eval_upload = train_upload
        else:
            eval_upload = self.upload_data(eval_name, eval_source).upload_id
        return self._call("CreateRun", pb.CreateRunRequest(name=name, config=config, train_name=train_name,
                                                           train_upload=train_upload, eval_name=eval_name,
                                                           eval_upload=eval_upload), admin=True)

    def upload_data(self, name: str, source: bytes | Path) -> pb.DataUpload:
        """Streams SOURCE (bytes, or a file read a chunk at a time, so memory stays one chunk whatever its size)
        to the coordinator's UploadData: chunks of at most UPLOAD_CHUNK_BYTES, the first with NAME and the
        size, the last with the sha256. Returns the coordinator's receipt, checked to be of these bytes."""
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        digest = hashlib.sha256()
        reply = self._call("UploadData", _data_chunks(name, size, source, digest), admin=True,
                           timeout=max(self.timeout, UPLOAD_TIMEOUT))
        if (reply.total_bytes, reply.sha256) != (size, digest.hexdigest()):
            raise SwarmError(f"coordinator at {self.address} acknowledged an upload of {name} that is not the one "
                             f"sent ({reply.total_bytes} bytes, sha256 {reply.sha256[:16]}...)")
        return reply

    def stop_run(self, name: str) -> pb.RunInfo:
        return self._call("StopRun", pb.RunRequest(name=name), admin=True)

    def run(self, name: str) -> pb.RunInfo:
        return self._call("GetRun", pb.RunRequest(name=name))

    def runs(self) -> list[pb.RunInfo]:
        return list(self._call("ListRuns", pb.ListRunsRequest()).runs)

    def watch_run(self, name: str) -> Iterator[pb.RunEvent]:
        """The run's events as they happen, until the run ends; leaving the loop early cancels the stream."""
        call = None
        try:
            call = self._stub.WatchRun(pb.RunRequest(name=name))
            yield from call
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and call is not None and call.cancelled():
                return
            raise describe_refusal(self.address, "coordinator", error, self._tls) from None
        finally:
            if call is not None:
                call.cancel()


def _data_chunks(name: str, size: int, source: bytes | Path, digest) -> Iterator[pb.DataChunk]:
    """The DataChunks of SIZE bytes of SOURCE, hashing them into DIGEST as they go. A file that shrinks
    while it is read ends the stream early, which the coordinator refuses as truncated."""
    handle = None if isinstance(source, bytes) else open(source, "rb")
    try:
        sent, first = 0, True
        while True:
            want = min(UPLOAD_CHUNK_BYTES, size - sent)
            piece = source[sent:sent + want] if handle is None else handle.read(want)
            if len(piece) < want:
                return
            digest.update(piece)
            sent += len(piece)
            last = sent == size
            yield pb.DataChunk(name=name if first else "", total_bytes=size if first else 0, data=piece,
                               sha256=digest.hexdigest() if last else "")
            if last:
                return
            first = False
    finally:
        if handle is not None:
            handle.close()


def _readable(path: Path, what: str) -> Path:
    """PATH, once it is known to be a file this process can read (so a wrong path fails before any upload)."""
    try:
        with open(path, "rb"):
            return Path(path).resolve()
    except FileNotFoundError:
        raise TsotsaError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise TsotsaError(f"{what} file {path} is a directory") from None
    except OSError as error:
        raise TsotsaError(f"cannot read {what} file {path}: {error.strerror or error}") from None


# The splits a DatasetDict directory given as evaluation data is taken from: the first one it has.
_EVAL_SPLITS = ("validation", "test")


def _load(path: Path, what: str, splits: tuple[str, ...]) -> tuple[str, bytes | Path]:
    """(name for the coordinator's messages, what to upload) of a JSONL file (its resolved path, read only
    while uploading) or a `datasets` directory (converted to JSONL bytes here)."""
    path = Path(path)
    if not path.is_dir():
        return path.name, _readable(path, what)
    from tsotsa.training.datasets_dir import DatasetDirError, jsonl_from_dataset_dir

    try:
        data = jsonl_from_dataset_dir(path, default_splits=splits)
    except DatasetDirError as error:
        raise DatasetDirError(f"{what} {error}") from None
    return path.resolve().name or str(path), data
