"""A client of the coordinator's fine-tuning run RPCs: create, stop, inspect and follow runs.

Every gRPC failure comes back as a `SwarmError` with one readable line: for the errors that describe the
request itself (bad data, unknown or duplicate run, missing token...) that line is the server's own text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from tsotsa.auth import ADMIN_METADATA
from tsotsa.errors import TsotsaError
from tsotsa.rpc import describe_refusal, open_channel
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TsotsaError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise TsotsaError(f"{what} file {path} is a directory") from None
    except OSError as error:
        raise TsotsaError(f"cannot read {what} file {path}: {error.strerror or error}") from None


# The splits a DatasetDict directory given as evaluation data is taken from: the first one it has.
_EVAL_SPLITS = ("validation", "test")


def _load(path: Path, what: str, splits: tuple[str, ...]) -> tuple[str, bytes]:
    """(name for the coordinator's messages, JSONL bytes) of a JSONL file or a `datasets` directory."""
    path = Path(path)
    if not path.is_dir():
        return path.name, _read(path, what)
    from tsotsa.training.datasets_dir import DatasetDirError, jsonl_from_dataset_dir

    try:
        data = jsonl_from_dataset_dir(path, default_splits=splits)
    except DatasetDirError as error:
        raise DatasetDirError(f"{what} {error}") from None
    return path.resolve().name or str(path), data


class RunsClient:
    def __init__(self, address: str, token: str | None = None, admin_token: str | None = None,
                 timeout: float = 60.0) -> None:
        self.address, self.timeout = address, timeout
        self._admin = ((ADMIN_METADATA, admin_token),) if admin_token else None
        self._channel = open_channel(address, token)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RunsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, admin: bool = False):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._admin if admin else None)
        except grpc.RpcError as error:
            raise describe_refusal(self.address, "coordinator", error) from None

    def create(self, name: str, config: pb.RunConfig, train: Path, eval: Path | None) -> pb.RunInfo:
        """Launches run NAME on TRAIN (and EVAL): JSONL files, or `datasets` directories (`save_to_disk`) sent
        as JSONL; everything is read before any call."""
        train_name, train_data = _load(train, "training data", ("train",))
        eval_name, eval_data = _load(eval, "evaluation data", _EVAL_SPLITS) if eval is not None else ("", b"")
        return self._call("CreateRun", pb.CreateRunRequest(name=name, config=config, train_name=train_name,
                                                           train_data=train_data, eval_name=eval_name,
                                                           eval_data=eval_data), admin=True)

    def stop(self, name: str) -> pb.RunInfo:
        return self._call("StopRun", pb.RunRequest(name=name), admin=True)

    def get(self, name: str) -> pb.RunInfo:
        return self._call("GetRun", pb.RunRequest(name=name))

    def list(self) -> list[pb.RunInfo]:
        return list(self._call("ListRuns", pb.ListRunsRequest()).runs)

    def watch(self, name: str) -> Iterator[pb.RunEvent]:
        """The run's events as they happen, until the run ends; leaving the loop early cancels the stream."""
        call = None
        try:
            call = self._stub.WatchRun(pb.RunRequest(name=name))
            yield from call
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and call is not None and call.cancelled():
                return
            raise describe_refusal(self.address, "coordinator", error) from None
        finally:
            if call is not None:
                call.cancel()
