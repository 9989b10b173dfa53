"""`tsotsa-coordinator up`: the DHT bootstrap node and the coordinator's gRPC server."""

from __future__ import annotations

import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from tsotsa.auth import server_interceptors
from tsotsa.checkpoint import Checkpoint
from tsotsa.dht import start_dht
from tsotsa.errors import TsotsaError
from tsotsa.remote import GRPC_OPTIONS
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.coordinator.service import CoordinatorService


def serve_coordinator(model_dir: Path, host: str, port: int, dht_port: int, announce=print,
                      token: str | None = None) -> None:
    """Serves until SIGTERM/SIGINT; `announce` receives the one line that says where."""
    checkpoint = Checkpoint.open(model_dir)
    dht = start_dht([], host=host, port=dht_port)
    try:
        service = CoordinatorService(checkpoint, checkpoint.model_id, dht)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS,
                             interceptors=server_interceptors(token))
        pb_grpc.add_CoordinatorServicer_to_server(service, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise TsotsaError(f"cannot listen on {host}:{port}")
        server.start()
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        announce(f"coordinator of {checkpoint.model_id} ({checkpoint.config.num_hidden_layers} blocks) "
                 f"at {host}:{bound}; DHT {' '.join(service.initial_peers)}")
        stop.wait()
        server.stop(grace=2).wait()
    finally:
        dht.shutdown()
