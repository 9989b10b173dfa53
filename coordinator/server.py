"""`tsotsa-coordinator up`: the DHT bootstrap node, the coordinator's gRPC server and the fine-tuning runs."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from transformers import AutoTokenizer

from tsotsa.auth import server_interceptors
from tsotsa.checkpoint import HEAD_PREFIXES, Checkpoint
from tsotsa.dht import start_dht
from tsotsa.errors import TsotsaError
from tsotsa.head import ModelHead
from tsotsa.rpc import GRPC_OPTIONS
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.coordinator.rejoin import PeerMemory, RememberingSwarm
from tsotsa.coordinator.runs import RunManager
from tsotsa.coordinator.service import CoordinatorService
from tsotsa.coordinator.store import RunStore
from tsotsa.coordinator.trainer import BaseModel

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 7070
    dht_port: int = 0
    token: str | None = None
    admin_token: str | None = None
    state_dir: Path | None = None
    db: Path | None = None

    @property
    def state_path(self) -> Path:
        default = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tsotsa"
        return self.state_dir or default


def serve_coordinator(options: CoordinatorOptions, announce=print) -> None:
    """Serves until SIGTERM/SIGINT; `announce` receives the one line that says where. Unfinished runs resume."""
    checkpoint = Checkpoint.open(options.model_dir)
    store = RunStore(options.db or options.state_path / "coordinator.sqlite")
    options.state_path.mkdir(parents=True, exist_ok=True)
    memory = PeerMemory(options.state_path / "known-peers.txt")
    dht = start_dht(memory.load(), host=options.host, port=options.dht_port,
                    identity_path=str(options.state_path / "dht.key"), ensure_bootstrap_success=False)
    swarm = RememberingSwarm(dht, checkpoint.model_id, checkpoint.config.num_hidden_layers, token=options.token,
                             memory=memory)
    runs = RunManager(store, options.state_path, base_model(checkpoint), swarm)
    stop = threading.Event()
    try:
        memory.keep_updated(swarm, stop)
        service = CoordinatorService(checkpoint, checkpoint.model_id, dht, runs, options.admin_token)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS,
                             interceptors=server_interceptors(options.token))
        pb_grpc.add_CoordinatorServicer_to_server(service, server)
        bound = server.add_insecure_port(f"{options.host}:{options.port}")
        if bound == 0:
            raise TsotsaError(f"cannot listen on {options.host}:{options.port}")
        server.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        announce(f"coordinator of {checkpoint.model_id} ({checkpoint.config.num_hidden_layers} blocks) "
                 f"at {options.host}:{bound}; DHT {' '.join(service.initial_peers)}")
        for name in runs.resume_unfinished():
            announce(f"resuming run {name}")
        stop.wait()
        server.stop(grace=2).wait()
    finally:
        stop.set()
        runs.shutdown()
        swarm.close()
        dht.shutdown()
        store.close()


def base_model(checkpoint: Checkpoint) -> BaseModel:
    """The coordinator's part of the model for training: the head, in the checkpoint's dtype, on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory)
    head = ModelHead(checkpoint.config, checkpoint.read_prefixes(HEAD_PREFIXES))
    return BaseModel(checkpoint.model_id, checkpoint.config, head, tokenizer, checkpoint.directory)
