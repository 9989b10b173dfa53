"""Serving the HTTP API with uvicorn: standalone (`tsotsa serve`) or on a thread of the coordinator.

Both build the same app around a `SwarmModel` client of the swarm and a `CoordinatorClient` factory (runs
for `/v1/models`, the dashboard and the training metrics): one code path whether the coordinator is this
process or another machine. With TLS settings the server speaks HTTPS with the machine's certificate;
browsers and OpenAI clients are not asked for a client certificate (the swarm token is the key), while a
client that presents one must present one the lab CA signed.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import threading
from dataclasses import dataclass

from tsotsa.client.config import ClientConfig
from tsotsa.client.model import SwarmModel
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.errors import TsotsaError
from tsotsa.tls import TlsSettings

logger = logging.getLogger(__name__)


@dataclass
class HttpOptions:
    coordinator: str                 # HOST:PORT of the coordinator's gRPC server
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None         # the swarm token: every HTTP request must carry it
    tls: TlsSettings | None = None   # HTTPS, and mutual TLS towards the swarm
    served_name: str | None = None   # the base model's name in /v1/models (default: the model id)
    workers: int = 16                # generations at once; more requests wait in the queue
    verify_fraction: float = 0.0     # spot checks of peers (docs/security.md); streamed tokens are then verified
    wait_timeout: float | None = None  # seconds `tsotsa serve` waits for an unreachable coordinator (None: no limit)
    merge_steps: bool = True         # requests' decode steps reach each peer as one message (ClientConfig.link_steps)


class HttpApi:
    """The app and what it owns (swarm client, worker pool); `close()` releases them."""

    def __init__(self, options: HttpOptions, model: SwarmModel | None = None) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        from tsotsa.api.app import create_app
        from tsotsa.api.dashboard import dashboard_router, login_page
        from tsotsa.api.engine import Engine
        from tsotsa.api.openai_routes import openai_router
        from tsotsa.metrics import ServingMetrics, TrainingCollector

        self.options = options
        config = ClientConfig(verify_fraction=options.verify_fraction, verified_only=options.verify_fraction > 0,
                              link_steps=options.merge_steps)
        self.model = model or SwarmModel.from_coordinator(options.coordinator, token=options.token, tls=options.tls,
                                                          config=config)
        self.registry = CollectorRegistry()
        self.engine = Engine(self.model, options.served_name or self.model.model_id, ServingMetrics(self.registry),
                             list_runs=self._list_runs, workers=options.workers)
        self.registry.register(TrainingCollector(self._list_runs))
        self.app = create_app([openai_router(self.engine), dashboard_router(self.engine, self.coordinator_client)],
                              token=options.token, metrics=functools.partial(generate_latest, self.registry),
                              login_page=login_page)

    def coordinator_client(self) -> CoordinatorClient:
        """A new client of the coordinator (the caller closes it, e.g. `with`)."""
        return CoordinatorClient(self.options.coordinator, token=self.options.token, tls=self.options.tls,
                                 timeout=self.model.client_config.coordinator_timeout)

    def _list_runs(self) -> list:
        with self.coordinator_client() as client:
            return client.runs()

    def close(self) -> None:
        self.engine.close()
        self.model.close()


def uvicorn_server(api: HttpApi):
    import uvicorn

    options = api.options
    tls = {}
    if options.tls is not None:
        tls = {"ssl_certfile": str(options.tls.cert_path), "ssl_keyfile": str(options.tls.key_path),
               "ssl_ca_certs": str(options.tls.ca_path), "ssl_cert_reqs": ssl.CERT_OPTIONAL}
    config = uvicorn.Config(api.app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, log_config=None, **tls)
    return uvicorn.Server(config)


def bind(options: HttpOptions) -> socket.socket:
    """The listening socket, bound here so that a port in use is one readable error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as error:
        sock.close()
        raise TsotsaError(f"cannot listen for HTTP on {options.host}:{options.port}: {error.strerror}") from None
    sock.listen(2048)  # connections made before uvicorn runs wait in the backlog instead of being refused
    sock.set_inheritable(True)
    return sock


def _announce(sock: socket.socket, options: HttpOptions, announce) -> None:
    host, port = sock.getsockname()[:2]
    scheme = "https" if options.tls is not None else "http"
    announce(f"HTTP API at {scheme}://{options.host}:{port}/v1 (dashboard {scheme}://{options.host}:{port}/)")


def serve_http(options: HttpOptions, announce=print) -> None:
    """`tsotsa serve`: waits for the coordinator (machines boot in any order; one line per try), then serves
    until SIGTERM/Ctrl-C (uvicorn's own handlers), then closes the swarm client."""
    sock = bind(options)
    try:
        with CoordinatorClient(options.coordinator, token=options.token, tls=options.tls) as client:
            client.wait_for_model_info(options.wait_timeout, announce)
        api = HttpApi(options)
    except BaseException:
        sock.close()
        raise
    try:
        server = uvicorn_server(api)
        _announce(sock, options, announce)
        server.run(sockets=[sock])
    finally:
        api.close()
        sock.close()


class HttpThread:
    """The coordinator's `--http-port`: the API on a daemon thread of the coordinator process."""

    def __init__(self, options: HttpOptions, model: SwarmModel, announce=print) -> None:
        self.sock = bind(options)
        self.api = HttpApi(options, model)
        self.server = uvicorn_server(self.api)
        _announce(self.sock, options, announce)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http-api",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.api.close()
        self.sock.close()
