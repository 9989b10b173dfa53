"""A coordinator a client need not trust: what it names is checked before anything touches the disk.

The coordinator here is a real gRPC server in this process whose answers are hostile: a model id that is a
path out of the cache directory, tokenizer "files" with such paths, and a Fetch stream that sends what was
not asked for. Clients must refuse with one readable error and write nothing outside their cache.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from conftest import cli
from tsotsa.checkpoint import Checkpoint
from tsotsa.client.model import SwarmModel
from tsotsa.errors import SwarmError
from tsotsa.rpc import start_server
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc


class HostileCoordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, info: pb.ModelInfo, sent_name: str) -> None:
        self.info, self.sent_name = info, sent_name

    def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.info

    def Fetch(self, request, context):
        data = b"{}"  # a file, whatever was asked for, under the name this coordinator chooses
        yield pb.FetchChunk(name=self.sent_name, offset=0, total_bytes=len(data), data=data, is_file=True,
                            sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
def serve(tiny_model: Path):
    servers = []
    model_id = Checkpoint.open(tiny_model).model_id
    config_json = (tiny_model / "config.json").read_text()

    def start(sent_name: str = "tokenizer.json", **info) -> str:
        message = pb.ModelInfo(model_id=model_id, config_json=config_json, num_blocks=4,
                               tokenizer_files=["tokenizer.json"], torch_dtype="float32")
        for field, value in info.items():
            if isinstance(value, list):
                getattr(message, field)[:] = value
            else:
                setattr(message, field, value)
        servicer = HostileCoordinator(message, sent_name)
        server, port = start_server(lambda s: pb_grpc.add_CoordinatorServicer_to_server(servicer, s),
                                    "127.0.0.1", 0, None, workers=2)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def written_outside(root: Path, cache: Path) -> list[Path]:
    return [path for path in root.rglob("*") if cache not in path.parents and path != cache]


@pytest.mark.parametrize("case, info, sent, message", [
    ("model id is a path", {"model_id": "../../escape"}, "tokenizer.json", "is not a model id"),
    ("absolute model id", {"model_id": "/tmp/escape"}, "tokenizer.json", "is not a model id"),
    ("tokenizer file is a path", {"tokenizer_files": ["../../evil.json"]}, "tokenizer.json",
     "no tokenizer files"),
    ("fetch sends another name", {}, "../../evil.json", "which was not asked for"),
])
def test_a_hostile_coordinator_is_refused_and_nothing_is_written_outside_the_cache(serve, tmp_path: Path, case,
                                                                                   info, sent, message) -> None:
    root = tmp_path / "home"
    cache = root / "a" / "b" / "cache"
    cache.mkdir(parents=True)
    address = serve(sent, **info)
    with pytest.raises(SwarmError, match=message):
        SwarmModel.from_coordinator(address, cache_dir=cache)
    assert written_outside(root, cache) == [root / "a", root / "a" / "b"]  # only what the test made


def test_the_cli_says_so_in_one_line(serve, tmp_path: Path) -> None:
    address = serve(model_id="../../escape")
    result = subprocess.run([*cli("tsotsa"), "generate", "--coordinator", address, "hi"], capture_output=True,
                            text=True, timeout=120, env={"TSOTSA_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: coordinator at {address} serves '../../escape' is not a model id")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path.parent / "escape").exists()


def test_a_peer_refuses_a_coordinator_whose_model_id_is_a_path(serve, tmp_path: Path) -> None:
    address = serve(model_id="../../escape")
    result = subprocess.run([*cli("tsotsa-peer"), "join", "--coordinator", address], capture_output=True,
                            text=True, timeout=120, env={"TSOTSA_CACHE": str(tmp_path / "cache"),
                                                         "XDG_DATA_HOME": str(tmp_path / "data")})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: coordinator at {address} serves '../../escape' is not a model id", \
        result.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "data").exists()
