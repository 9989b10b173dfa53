"""`tsotsa-peer join`: load a span, serve it over gRPC, announce it in the DHT, drain on SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import random
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
from tsotsa.peer.rebalance import RebalancePolicy, gives_way_to, plan_move
from tsotsa.peer.selection import (SESSION_TOKENS, blocks_that_fit, choose_span, confirmed_servers,
                                   default_cache_bytes, default_max_sessions, free_memory)
from tsotsa.peer.throughput import measure_throughput
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
    rebalance: RebalancePolicy | None = None  # move to where the swarm needs blocks more (None: stay)


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
    """Joins the DHT, picks and loads the span, serves it until SIGTERM (moving when rebalancing says so),
    then drains and leaves."""
    config = config_from_json(info.config_json)
    if options.blocks is not None and options.blocks.end > config.num_hidden_layers:
        raise TsotsaError(f"blocks {options.blocks} are outside the model's {config.num_hidden_layers} blocks")
    dht = start_dht(list(info.dht_initial_peers), host=options.host, port=options.dht_port,
                    identity_path=state.identity_path, token=options.token, nat_traversal=options.nat_traversal)
    try:
        peer = _ServingPeer(options, info, config, client, dht, say, display, registry)
        spec = options.blocks
        if spec is None:
            length = options.num_blocks or blocks_that_fit(config, options.quant, options.dtype, options.device,
                                                            peer.limits.max_cache_bytes)
            spec = choose_span(peer.others(), peer.num_blocks, length)
        peer.serve(spec)

        stop, wake = threading.Event(), threading.Event()  # wake: a signal, or adapters to announce now

        def on_signal(*_) -> None:
            stop.set()
            wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        peer.on_adapters_changed = wake.set
        rng = random.Random()
        policy = options.rebalance
        next_look = time.monotonic() + policy.next_wait(rng, settling=True) if policy else float("inf")
        while True:
            wake.wait(max(0.05, min(options.heartbeat, next_look - time.monotonic())))
            wake.clear()
            if stop.is_set():
                break
            peer.heartbeat()
            if time.monotonic() >= next_look:
                moved = peer.rebalance(policy, stop)
                next_look = time.monotonic() + policy.next_wait(rng, settling=moved)
        peer.leave()
    finally:
        dht.shutdown()


class _ServingPeer:
    """One peer process's serving life under one peer id: its span, service, gRPC server and DHT record,
    from joining to leaving, moves to other blocks included (the service, its metrics and the port stay)."""

    def __init__(self, options: PeerOptions, info: pb.ModelInfo, config: LlamaConfig, client: CoordinatorClient,
                 dht: SwarmDHT, say: Callable[[str], None], display: PeerDisplay, registry: CollectorRegistry) -> None:
        self.options, self.info, self.config, self.client, self.dht = options, info, config, client, dht
        self.say, self.display, self.registry = say, display, registry
        self.num_blocks = config.num_hidden_layers
        self.limits = options.limits  # resolved: the budget now (it sets how many blocks fit), the cap once loaded
        if self.limits.max_cache_bytes is None:
            budget = default_cache_bytes(free_memory(options.device))
            self.limits = dataclasses.replace(self.limits, max_cache_bytes=budget)
        self.record: ServerRecord | None = None
        self.service: PeerService | None = None
        self.server = None
        self.port = options.port
        self.source: Checkpoint | None = None
        self.on_adapters_changed: Callable[[], None] = lambda: None

    @property
    def spec(self) -> SpanSpec:
        return SpanSpec(self.record.start, self.record.end)

    def others(self, records: list[ServerRecord] | None = None) -> list[ServerRecord]:
        """The other peers' records (`records`, else the DHT's now) whose peer answers as its record says;
        never this process's own, also from before a restart."""
        if records is None:
            records = list(self.dht.find_servers(self.info.model_id, self.num_blocks).values())
        records = [record for record in records if record.peer_id != self.dht.peer_id]
        return confirmed_servers(records, self.info.model_id, self.options.token, tls=self.options.tls)

    def serve(self, spec: SpanSpec, adapters: list[str] | None = None) -> None:
        """Announces `spec` as joining, loads it, serves it over gRPC (on the port it had, after a move) and
        announces it online with its measured throughput. `adapters`: the runs served before a move, each
        fetched anew for the new blocks if the coordinator has it (default: --adapters, which must load)."""
        options = self.options
        self.record = ServerRecord(peer_id=self.dht.peer_id, address="", start=spec.start, end=spec.end,
                                   state=ServerState.JOINING, throughput=0.0, device=options.device,
                                   dtype=str(options.dtype).removeprefix("torch."), quant=options.quant)
        self.dht.announce(self.info.model_id, self.record, options.record_ttl)
        span, self.source = load_span(options, self.info, self.config, self.client, spec, self.display)
        throughput = measure_throughput(span)
        if self.limits.max_sessions is None:
            session = span.cache_bytes(1, min(SESSION_TOKENS, self.config.max_position_embeddings))
            self.limits = dataclasses.replace(self.limits, max_sessions=default_max_sessions(
                self.limits.max_cache_bytes, session))
        if self.service is None:
            coordinator_only = CoordinatorOnly(self.info.model_id, self.info.run_signing_key,
                                               fetch_key=lambda: self.client.model_info().run_signing_key)
            self.service = PeerService(span, self.info.model_id, self.num_blocks, self.limits, self._peer_info,
                                       coordinator_only, self.registry, throughput=throughput)
        else:
            self.service.replace_span(span, throughput)
        for run in options.adapters if adapters is None else adapters:
            try:
                load_adapter(self.service.adapters, self.client, run, spec)
            except Exception as error:
                if adapters is None:
                    raise  # asked for on the command line: the peer does not start without it
                logger.warning("adapter %s not served on blocks %s: %s", run, spec, error or type(error).__name__)
        self.service.adapters.on_change = lambda: self.on_adapters_changed()
        workers = self.limits.max_sessions + self.limits.max_links + 8
        self.server, self.port = start_server(lambda server: pb_grpc.add_PeerServicer_to_server(self.service, server),
                                              options.host, self.port, options.token, workers=workers,
                                              max_concurrent_rpcs=workers, tls=options.tls)
        record = self.record
        record.throughput = self.service.throughput.value
        record.adapters = self.service.adapters.names
        record.address = f"{options.announce_host or options.host}:{self.port}"
        record.dht_addresses = self.dht.visible_maddrs()
        record.state = ServerState.ONLINE
        self.dht.announce(self.info.model_id, record, options.record_ttl)
        self.say(f"serving blocks {spec} of {self.info.model_id} at {record.address} as {record.peer_id} "
                 f"({record.throughput:.1f} tok/s, {options.quant}, {record.dtype}, {options.device}, "
                 f"KV cache {self.limits.max_cache_bytes >> 20} MiB, up to {self.limits.max_sessions} sessions); "
                 f"DHT {' '.join(record.dht_addresses)}")

    def _peer_info(self) -> pb.PeerInfo:
        service, record, options = self.service, self.record, self.options
        metrics = service.metrics
        return pb.PeerInfo(
            model_id=self.info.model_id, peer_id=record.peer_id, start_block=record.start, end_block=record.end,
            state=record.state.value, device=options.device, dtype=record.dtype, quant=options.quant,
            throughput=record.throughput, open_sessions=service.sessions.open_count,
            max_sessions=self.limits.max_sessions, cache_bytes_used=service.sessions.reserved_bytes,
            cache_bytes_limit=self.limits.max_cache_bytes, checkpoint_bytes_read=self.source.bytes_read,
            parameter_bytes_held=service.span.parameter_bytes,
            adapter_bytes_held=service.span.adapter_bytes, checkpoint_bytes_total=self.info.total_bytes,
            rss_bytes=metrics.rss_bytes(), uptime_seconds=metrics.uptime_seconds(),
            adapters=metrics.adapter_names(), tokens_served=metrics.tokens_served(),
            steps_served=metrics.steps_served(),
        )

    def heartbeat(self) -> None:
        """Reclaims idle sessions (their KV cache is given back even when no one else opens one) and announces
        the record anew, with the adapters served now and the throughput measured from served work."""
        service, record = self.service, self.record
        service.sessions.reap()
        record.adapters = service.adapters.names
        record.throughput = service.throughput.value
        self._announce("heartbeat")
        self.display.serving(str(self.spec), service.sessions.open_count, self.limits.max_sessions,
                             service.metrics.tokens_served())

    def rebalance(self, policy: RebalancePolicy, stop: threading.Event) -> bool:
        """Looks at the swarm and moves where the blocks are needed more (peer/rebalance.py); whether it moved."""
        if self.service.training.runs:
            return False  # a fine-tuning run would lose its blocks mid-round
        try:
            move = plan_move(self.record, self.others(), self.num_blocks, policy.gain)
        except Exception as error:  # the DHT slow or unreachable: looked at again next time
            logger.warning("rebalancing: could not look at the swarm: %s", error or type(error).__name__)
            return False
        if move is None:
            return False
        self._drain()  # announced: a peer wanting to move at the same moment sees it
        if stop.wait(policy.confirm):
            return False  # SIGTERM meanwhile: the caller leaves
        try:
            servers = list(self.dht.find_servers(self.info.model_id, self.num_blocks).values())
            first = gives_way_to(self.record, servers)  # one lookup for both: the records as of now
            move = plan_move(self.record, self.others(servers), self.num_blocks, policy.gain) if first is None else None
        except Exception as error:  # as above: stay, and look again next time
            logger.warning("rebalancing: could not confirm the move: %s", error or type(error).__name__)
            move = None
        if move is None or self.service.training.runs:
            return self._stay()
        self._wait_for_sessions()
        if self.service.training.runs:  # a run opened while the sessions drained: its blocks stay here
            return self._stay()
        self.say(f"moving from blocks {self.spec} to {move.target}: {move.describe()}")
        adapters = self.service.adapters.names
        self.server.stop(grace=1).wait()
        self.service.release_span()  # the old blocks' memory is free before the new ones load
        self.serve(move.target, adapters=adapters)
        return True

    def leave(self) -> None:
        """Drain (say so in the DHT, so routes skip us; refuse new sessions; let open ones finish), then stop.
        A missed announcement costs nothing here: clients that still pick this peer are refused and go
        elsewhere."""
        self._drain()
        self._wait_for_sessions()
        self.server.stop(grace=1).wait()
        self.display.close()
        self.say(f"left the swarm ({self.service.sessions.open_count} sessions still open at exit)")

    def _stay(self) -> bool:
        """A move given up after `_drain`: online again, taking sessions; False (it did not move)."""
        self.service.accepting = True
        self.record.state = ServerState.ONLINE
        self._announce("announcement")
        return False

    def _drain(self) -> None:
        self.service.accepting = False
        self.record.state = ServerState.DRAINING
        self._announce("draining announcement")

    def _wait_for_sessions(self) -> None:
        deadline = time.monotonic() + self.options.drain_timeout
        while self.service.sessions.open_count and time.monotonic() < deadline:
            time.sleep(0.1)

    def _announce(self, what: str) -> None:
        """Announces the record; a failure (the DHT slow or unreachable) is logged, never raised: a missed
        heartbeat is retried at the next one."""
        try:
            self.dht.announce(self.info.model_id, self.record, self.options.record_ttl)
        except Exception as error:
            logger.warning("%s failed: %s", what, error or type(error).__name__)


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
