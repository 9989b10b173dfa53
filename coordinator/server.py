"""`tsotsa-coordinator up`: the DHT bootstrap node, the coordinator's gRPC server and the fine-tuning runs."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from tsotsa.checkpoint import HEAD_PREFIXES, Checkpoint
from tsotsa.dht import start_bootstrap_dht
from tsotsa.head import ModelHead
from tsotsa.rpc import start_server
from tsotsa.run_credentials import RunSigner
from tsotsa.tls import TlsSettings
from tsotsa.state import StateDir, default_state_dir
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.coordinator.rejoin import PeerMemory, RememberingSwarm
from tsotsa.coordinator.runs import RunManager
from tsotsa.coordinator.service import MAX_STREAMS, CoordinatorService
from tsotsa.coordinator.store import RunStore
from tsotsa.coordinator.trainer import BaseModel

if TYPE_CHECKING:
    from tsotsa.api.server import HttpThread

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 7070
    dht_port: int = 0
    token: str | None = None
    admin_token: str | None = None
    state_dir: Path | None = None  # default: one per model id (tsotsa.state.default_state_dir)
    db: Path | None = None
    nat_traversal: bool = False  # UPnP and libp2p relays for the DHT node (tsotsa.dht.start_dht)
    tls: TlsSettings | None = None  # mutual TLS on the gRPC server and on the channels to peers (tsotsa.tls)
    http_port: int | None = None  # the HTTP API (OpenAI routes, dashboard, /metrics) in this process (tsotsa.api)
    http_host: str | None = None  # default: host
    served_name: str | None = None  # the base model's name in /v1/models (default: the model id)


def serve_coordinator(options: CoordinatorOptions, announce=print) -> None:
    """Serves until SIGTERM/SIGINT; `announce` receives the one line that says where. Unfinished runs resume."""
    checkpoint = Checkpoint.open(options.model_dir)
    state = StateDir(options.state_dir or default_state_dir("coordinator", checkpoint.model_id), "coordinator")
    store = RunStore(options.db or state.path / "coordinator.sqlite")
    memory = PeerMemory(state.path / "known-peers.txt")
    dht = start_bootstrap_dht(memory.load(), host=options.host, port=options.dht_port,
                              identity_path=state.identity_path, token=options.token,
                              nat_traversal=options.nat_traversal)
    swarm = RememberingSwarm(dht, checkpoint.model_id, checkpoint.config.num_hidden_layers, token=options.token,
                             memory=memory, tls=options.tls)
    runs = RunManager(store, state.path, base_model(checkpoint), swarm, RunSigner(state.path / "run-signing.key"))
    stop = threading.Event()
    http = None
    try:
        memory.keep_updated(swarm, stop)
        service = CoordinatorService(checkpoint, checkpoint.model_id, dht, runs, options.admin_token)
        server, bound = start_server(lambda server: pb_grpc.add_CoordinatorServicer_to_server(service, server),
                                     options.host, options.port, options.token, workers=MAX_STREAMS + 4,
                                     tls=options.tls)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        announce(f"coordinator of {checkpoint.model_id} ({checkpoint.config.num_hidden_layers} blocks) "
                 f"at {options.host}:{bound}; DHT {' '.join(service.initial_peers)}")
        if options.http_port is not None:
            http = start_http(options, checkpoint, bound, service.initial_peers, announce)
        for name in runs.resume_unfinished():
            announce(f"resuming run {name}")
        stop.wait()
        server.stop(grace=2).wait()
    finally:
        stop.set()
        if http is not None:
            http.stop()
        runs.shutdown()
        swarm.close()
        dht.shutdown()
        store.close()
        state.release()


def start_http(options: CoordinatorOptions, checkpoint: Checkpoint, port: int, initial_peers: list[str],
               announce) -> "HttpThread":
    """The HTTP API on a thread of this process: a swarm client with the head from the local checkpoint,
    asking this coordinator (over its own gRPC port, the same path as `tsotsa serve`) for runs and status."""
    from tsotsa.api.server import HttpOptions, HttpThread
    from tsotsa.client.model import SwarmModel

    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    http_options = HttpOptions(coordinator=f"{host}:{port}", host=options.http_host or options.host,
                               port=options.http_port, token=options.token, tls=options.tls,
                               served_name=options.served_name)
    model = SwarmModel.from_checkpoint(checkpoint.directory, initial_peers, token=options.token, tls=options.tls)
    try:
        return HttpThread(http_options, model, announce)
    except BaseException:
        model.close()
        raise


def base_model(checkpoint: Checkpoint) -> BaseModel:
    """The coordinator's part of the model for training: the head, in the checkpoint's dtype, on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory)
    head = ModelHead(checkpoint.config, checkpoint.read_prefixes(HEAD_PREFIXES))
    return BaseModel(checkpoint.model_id, checkpoint.config, head, tokenizer, checkpoint.directory)
