"""Shared fixtures: small random-weight checkpoints and swarms of real processes on loopback."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tsotsa.client.model import SwarmModel  # noqa: E402
from tsotsa.local_swarm import LocalSwarm  # noqa: E402
from tsotsa.tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """4 blocks, multi-head attention, one safetensors file."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=4, hidden=64, heads=4, vocab=512, seed=1)


@pytest.fixture(scope="session")
def gqa_sharded_model(tmp_path_factory) -> Path:
    """8 blocks, grouped-query attention (8 heads, 2 KV heads), sharded into many safetensors files."""
    return make_tiny_model(tmp_path_factory.mktemp("gqa") / "model", layers=8, hidden=64, heads=8, kv_heads=2,
                           vocab=512, seed=2, shard_size="150KB")


MODULES = {"tsotsa": "tsotsa", "tsotsa-peer": "tsotsa.peer", "tsotsa-coordinator": "tsotsa.coordinator"}


def cli(name: str) -> list[str]:
    """argv of a tsotsa command: its console script, or `python -m` where the install made none."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", MODULES[name]]


def start_swarm(model_dir: Path, spans: list[str | None], *peer_args: str, cache_dir: Path | None = None,
                local_model: bool = True, admin_token: str | None = None, http: bool = False) -> LocalSwarm:
    """A coordinator (with the HTTP API: `http`) and one peer per span; the caller stops it."""
    swarm = LocalSwarm(model_dir, cache_dir=cache_dir, admin_token=admin_token, http=http)
    try:
        swarm.start_coordinator()
        if spans:
            swarm.add_peers(spans, *peer_args, local_model=local_model)
    except BaseException:
        swarm.stop()
        raise
    return swarm


def connect(swarm: LocalSwarm, tmp_path_factory, **options) -> SwarmModel:
    """A client of `swarm`, with a cache of its own (a fresh machine's view)."""
    return SwarmModel.from_coordinator(swarm.coordinator_address, cache_dir=tmp_path_factory.mktemp("client"),
                                       **options)


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm, tmp_path_factory) -> Iterator[SwarmModel]:
    """A client of the module's `swarm` fixture."""
    with connect(swarm, tmp_path_factory) as swarm_model:
        yield swarm_model


def swarm_fixture(spans: list[str | None], *peer_args: str, http: bool = False):
    """A module-scoped `swarm` fixture: the tiny model served by one peer per span, with a cache of its own
    (and the coordinator's HTTP API with `http`). In a test module: `swarm = swarm_fixture(["0:2", "2:4"])`."""

    @pytest.fixture(scope="module")
    def swarm(tiny_model: Path, tmp_path_factory) -> Iterator[LocalSwarm]:
        swarm = start_swarm(tiny_model, spans, *peer_args, cache_dir=tmp_path_factory.mktemp("cache"), http=http)
        yield swarm
        swarm.stop()

    return swarm


def finish(client, name: str, timeout: float = 300.0, poll: float = 0.5):
    """Waits (bounded) for the fine-tuning run `name` to end (`client`: a CoordinatorClient); it must have
    finished. Returns its RunInfo."""
    deadline = time.monotonic() + timeout
    while (info := client.run(name)).state not in ("finished", "failed", "stopped"):
        assert time.monotonic() < deadline, f"run {name} still {info.state} ({info.message}) after {timeout:g} s"
        time.sleep(poll)
    assert info.state == "finished", info.message
    return info


def run_all(calls: list, work) -> list:
    """Runs work(i, call) for every call in its own thread, all started together; re-raises any failure."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[index] = work(index, calls[index])
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "a generating thread hangs"
    if errors:
        raise errors[0]
    return results
