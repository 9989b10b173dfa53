"""A `/metrics` page for Prometheus inside a swarm process (a peer's `--metrics-port`), under the swarm's rules.

prometheus_client renders the page (`make_wsgi_app`); this module only adds what a private swarm needs
around it: with a swarm token, every request must carry `Authorization: Bearer <token>` (401 otherwise,
compared in constant time), and with TLS settings the page is HTTPS under the lab CA, mutual as every other
connection of the swarm (a scraper presents a certificate the lab CA signed: `tsotsa tls issue DIR
prometheus --host ...`). TLS handshakes happen on the request's own thread, so a client that connects and
says nothing holds up no one else.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from tsotsa.errors import TsotsaError

if TYPE_CHECKING:
    from tsotsa.tls import TlsSettings

logger = logging.getLogger(__name__)

# The line a process prints once its page is up (tests and scripts find the port in it).
METRICS_READY = re.compile(r"metrics at (https?)://(\S+):(\d+)/metrics$")
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request (TLS handshake included)


@dataclass
class MetricsServer:
    """A running `/metrics` page; `close()` stops it."""

    url: str
    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def require_token(app: Callable, token: str) -> Callable:
    """The WSGI `app`, answering 401 to any request without `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        presented = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(presented, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="tsotsa"')])
        return [b"missing or wrong swarm token\n"]

    return guarded


def server_context(tls: "TlsSettings") -> ssl.SSLContext:
    """Mutual TLS under the lab CA: this machine's certificate, and only clients whose certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_path), str(tls.key_path))
    context.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_metrics(registry: CollectorRegistry, host: str, port: int, *, token: str | None = None,
                  tls: "TlsSettings | None" = None, announce_host: str | None = None) -> MetricsServer:
    """Serves `registry` at http(s)://host:port/metrics on a daemon thread (port 0 picks a free one).

    `announce_host`: the host named in the returned `url` (default `host`; give it when `host` is 0.0.0.0).
    A port that cannot be bound raises `TsotsaError` (one line)."""
    app = make_wsgi_app(registry)
    if token:
        app = require_token(app, token)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as error:
        raise TsotsaError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    server_class = type("MetricsHTTPServer", (_Server,), {"address_family": family})
    try:
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    except OSError as error:
        raise TsotsaError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    if tls is not None:
        server.socket = server_context(tls).wrap_socket(server.socket, server_side=True,
                                                        do_handshake_on_connect=False)
    bound = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    shown = announce_host or host
    if ":" in shown:
        shown = f"[{shown}]"
    scheme = "https" if tls is not None else "http"
    return MetricsServer(f"{scheme}://{shown}:{bound}/metrics", host, bound, server, thread)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process at exit

    def handle_error(self, request, client_address) -> None:
        """A failed handshake or a client gone mid-request is the client's problem: no traceback on stderr."""
        logger.debug("metrics request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args) -> None:  # one line per scrape would flood the peer's output
        pass
