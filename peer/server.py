"""`tsotsa-peer join`: load a span, serve it over gRPC, announce it in the DHT, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from transformers import LlamaConfig

from tsotsa.checkpoint import Checkpoint, block_prefix, config_from_json, tensor_nbytes
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.dht import SwarmDHT, start_dht
from tsotsa.errors import CheckpointError, TsotsaError
from tsotsa.metrics_server import MetricsServer, serve_metrics
from tsotsa.records import MAX_RECORD_LIFETIME, ServerRecord, ServerState
from tsotsa.remote import cached_checkpoint, default_cache_dir, fetch_adapter, served_model_id
from tsotsa.rpc import start_server
from tsotsa.tls import TlsSettings
from tsotsa.state import StateDir, default_state_dir
from tsotsa.spans import BlockSpan, SpanSpec
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.training.lora import lora_from_spec
from tsotsa.peer.adapters import Adapters
from tsotsa.peer.display import PeerDisplay
from tsotsa.peer.selection import blocks_that_fit, choose_span, confirmed_servers
from tsotsa.peer.roles import CoordinatorOnly
from tsotsa.peer.service import PeerLimits, PeerService

logger = logging.getLogger(__name__)


@dataclass
class PeerOptions:
    coordinator: str
    model_dir: Path | None = None
    blocks: SpanSpec | None = None
    num_blocks: int | None = None
    device: str = "cpu"
    quant: str = "none"
    dtype: torch.dtype = torch.float32
    host: str = "127.0.0.1"
    port: int = 0
    dht_port: int = 0
    announce_host: str | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    limits: PeerLimits = field(default_factory=PeerLimits)
    heartbeat: float = 5.0
    record_ttl: float = 15.0
    drain_timeout: float = 60.0
    threads: int | None = None
    token: str | None = None
    adapters: list[str] = field(default_factory=list)  # runs whose adapters this peer serves from the start
    state_dir: Path | None = None  # DHT identity; default: one per model id (tsotsa.state.default_state_dir)
    wait_timeout: float | None = None  # seconds to wait for an unreachable coordinator (None: no limit)
    nat_traversal: bool = False  # UPnP and libp2p relays for the DHT node (tsotsa.dht.start_dht)
    tls: TlsSettings | None = None  # mutual TLS on the gRPC server and every channel it opens (tsotsa.tls)
    metrics_port: int | None = None  # Prometheus /metrics in this process (0: a free port; None: off)
    metrics_host: str | None = None  # where /metrics listens (default: host)


def measure_throughput(span: BlockSpan, steps: int = 4) -> float:
    """Tokens/s of a one-token decode step through the whole span, after a short prefill."""
    hidden = torch.zeros(1, 8, span.config.hidden_size)
    mask = torch.ones(1, 8, dtype=torch.long)
    cache = span.new_cache()
    span(hidden, mask, torch.arange(8).unsqueeze(0), cache)
    began = 0.0
    for step in range(steps + 1):  # the first decode step warms up and is not counted
        if step == 1:
            began = time.perf_counter()
        mask = torch.ones(1, 9 + step, dtype=torch.long)
        span(hidden[:, :1], mask, torch.tensor([[8 + step]]), cache)
    if span.device.type == "cuda":
        torch.cuda.synchronize(span.device)
    return steps / max(time.perf_counter() - began, 1e-9)


def load_span(options: PeerOptions, info: pb.ModelInfo, config: LlamaConfig, client: CoordinatorClient,
              spec: SpanSpec, display: PeerDisplay | None = None) -> tuple[BlockSpan, Checkpoint]:
    """Reads only the span's tensors: from --model when given, else from the coordinator into the cache.
    Block by block, so that `display` can show the progress of a load that takes minutes."""
    display = display or PeerDisplay(print, live=False)
    blocks = range(spec.start, spec.end)
    if options.model_dir is not None:
        source = Checkpoint.open(options.model_dir)
        if source.model_id != info.model_id:
            raise CheckpointError(f"{options.model_dir} holds model {source.model_id}, "
                                  f"but the coordinator serves {info.model_id}")
    else:
        with display.blocks(f"fetching blocks {spec} from the coordinator", len(blocks)) as progress:
            for index in blocks:  # a block already in the cache is not fetched again
                cache = cached_checkpoint(client, info, options.cache_dir, blocks=range(index, index + 1))
                progress.advance(sum(tensor_nbytes(*cache.specs[name])
                                     for name in cache.names_with_prefix([block_prefix(index)])))
        source = cache
    tensors = {}
    with display.blocks(f"loading blocks {spec}", len(blocks)) as progress:
        for index in blocks:
            block = source.read_prefixes([block_prefix(index)])
            tensors.update(block)
            progress.advance(sum(tensor.nbytes for tensor in block.values()))
    span = BlockSpan(config, spec, tensors, device=options.device, dtype=options.dtype, quant=options.quant)
    return span, source


def load_adapter(adapters: Adapters, client: CoordinatorClient, run: str, spec: SpanSpec) -> None:
    """A fine-tuning run's latest adapter for this span, from the coordinator, served under the run's name."""
    lora, tensors = fetch_adapter(client, run, spec.start, spec.end)
    try:
        adapters.attach(run, lora_from_spec(lora))
        adapters.load(run, tensors)
    except ValueError as error:
        raise TsotsaError(f"adapter of run {run!r} does not fit this peer: {error}") from None


def serve_peer(options: PeerOptions, say: Callable[[str], None] = print, display: PeerDisplay | None = None) -> None:
    """`say` prints the peer's announcement lines; `display` shows loading progress and a live status (default:
    plain lines through `say`, rarely)."""
    display = display or PeerDisplay(say, live=False)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.host in ("0.0.0.0", "::") and not options.announce_host:
        raise TsotsaError(f"--host {options.host} listens everywhere: give --announce-host, the address "
                          "other machines reach this one at")
    if not 0 < options.record_ttl <= MAX_RECORD_LIFETIME:
        raise TsotsaError(f"the record ttl must be in (0, {MAX_RECORD_LIFETIME:g}] seconds")
    registry = CollectorRegistry()  # what /metrics serves; the service's metrics join it once the span is loaded
    metrics_server = _start_metrics(options, registry, say)  # first: a port in use fails before minutes of loading
    try:
        with CoordinatorClient(options.coordinator, token=options.token, tls=options.tls) as client:
            info = client.wait_for_model_info(options.wait_timeout, say)
            state = StateDir(options.state_dir or default_state_dir("peer", served_model_id(client, info)), "peer")
            try:
                _serve(options, info, client, state, say, display, registry)
            finally:
                state.release()
    finally:
        display.close()
        if metrics_server is not None:
            metrics_server.close()


def _serve(options: PeerOptions, info: pb.ModelInfo, client: CoordinatorClient, state: StateDir,
           say: Callable[[str], None], display: PeerDisplay, registry: CollectorRegistry) -> None:
    """Joins the DHT, picks and loads the span, serves it until SIGTERM, then drains and leaves."""
    config = config_from_json(info.config_json)
    num_blocks = config.num_hidden_layers
    if options.blocks is not None and options.blocks.end > num_blocks:
        raise TsotsaError(f"blocks {options.blocks} are outside the model's {num_blocks} blocks")
    dht = start_dht(list(info.dht_initial_peers), host=options.host, port=options.dht_port,
                    identity_path=state.identity_path, token=options.token, nat_traversal=options.nat_traversal)
    try:
        peer_id = dht.peer_id
        spec = options.blocks
        if spec is None:
            length = options.num_blocks or blocks_that_fit(config, options.quant, options.dtype, options.device,
                                                            options.limits.max_cache_bytes)
            servers = dht.find_servers(info.model_id, num_blocks)
            servers.pop(peer_id, None)  # this machine's own record from before a restart
            spec = choose_span(confirmed_servers(list(servers.values()), info.model_id, options.token,
                                                 tls=options.tls), num_blocks, length)
        record = ServerRecord(peer_id=peer_id, address="", start=spec.start, end=spec.end,
                              state=ServerState.JOINING, throughput=0.0, device=options.device,
                              dtype=str(options.dtype).removeprefix("torch."), quant=options.quant)
        dht.announce(info.model_id, record, options.record_ttl)
        span, source = load_span(options, info, config, client, spec, display)
        record.throughput = measure_throughput(span)

        service: PeerService | None = None

        def peer_info() -> pb.PeerInfo:
            metrics = service.metrics
            return pb.PeerInfo(
                model_id=info.model_id, peer_id=peer_id, start_block=spec.start, end_block=spec.end,
                state=record.state.value, device=options.device, dtype=record.dtype, quant=options.quant,
                throughput=record.throughput, open_sessions=service.sessions.open_count,
                max_sessions=options.limits.max_sessions, cache_bytes_used=service.sessions.reserved_bytes,
                cache_bytes_limit=options.limits.max_cache_bytes, checkpoint_bytes_read=source.bytes_read,
                parameter_bytes_held=span.parameter_bytes, checkpoint_bytes_total=info.total_bytes,
                rss_bytes=metrics.rss_bytes(), uptime_seconds=metrics.uptime_seconds(),
                adapters=metrics.adapter_names(), tokens_served=metrics.tokens_served(),
                steps_served=metrics.steps_served(),
            )

        coordinator_only = CoordinatorOnly(info.model_id, info.run_signing_key,
                                           fetch_key=lambda: client.model_info().run_signing_key)
        service = PeerService(span, info.model_id, num_blocks, options.limits, peer_info, coordinator_only, registry)
        for run in options.adapters:
            load_adapter(service.adapters, client, run, spec)
        workers = options.limits.max_sessions + 8
        server, port = start_server(lambda server: pb_grpc.add_PeerServicer_to_server(service, server),
                                    options.host, options.port, options.token, workers=workers,
                                    max_concurrent_rpcs=workers, tls=options.tls)
        record.address = f"{options.announce_host or options.host}:{port}"
        record.dht_addresses = dht.visible_maddrs()
        record.state = ServerState.ONLINE
        dht.announce(info.model_id, record, options.record_ttl)

        stop, wake = threading.Event(), threading.Event()  # wake: a signal, or adapters to announce now

        def on_signal(*_) -> None:
            stop.set()
            wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        service.adapters.on_change = wake.set
        say(f"serving blocks {spec} of {info.model_id} at {record.address} as {peer_id} "
            f"({record.throughput:.1f} tok/s, {options.quant}, {record.dtype}, {options.device}); "
            f"DHT {' '.join(record.dht_addresses)}")
        while True:
            wake.wait(options.heartbeat)
            wake.clear()
            if stop.is_set():
                break
            service.sessions.reap()  # idle sessions give their KV cache back even when no one else opens one
            record.adapters = service.adapters.names
            _announce_or_warn(dht, info.model_id, record, options.record_ttl, "heartbeat")
            display.serving(str(spec), service.sessions.open_count, options.limits.max_sessions,
                            service.metrics.tokens_served())

        # Drain: say so in the DHT (routes skip us), refuse new sessions, let open ones finish. A missed
        # announcement costs nothing here: clients that still pick this peer are refused and go elsewhere.
        service.accepting = False
        record.state = ServerState.DRAINING
        _announce_or_warn(dht, info.model_id, record, options.record_ttl, "draining announcement")
        deadline = time.monotonic() + options.drain_timeout
        while service.sessions.open_count and time.monotonic() < deadline:
            time.sleep(0.1)
        server.stop(grace=1).wait()
        display.close()
        say(f"left the swarm ({service.sessions.open_count} sessions still open at exit)")
    finally:
        dht.shutdown()


def _start_metrics(options: PeerOptions, registry: CollectorRegistry, say: Callable[[str], None]
                   ) -> MetricsServer | None:
    """The peer's /metrics page (--metrics-port), under its swarm token and TLS; announced on its own line."""
    if options.metrics_port is None:
        return None
    host = options.metrics_host or options.host
    wildcard = host in ("0.0.0.0", "::", "")
    server = serve_metrics(registry, host, options.metrics_port, token=options.token, tls=options.tls,
                           announce_host=(options.announce_host or options.host) if wildcard else None)
    say(f"metrics at {server.url}")
    return server


def _announce_or_warn(dht: SwarmDHT, model_id: str, record: ServerRecord, ttl: float, what: str) -> None:
    """Announces the record; a failure (the DHT slow or unreachable) is logged, never raised: a missed
    heartbeat is retried at the next one."""
    try:
        dht.announce(model_id, record, ttl)
    except Exception as error:
        logger.warning("%s failed: %s", what, error or type(error).__name__)
