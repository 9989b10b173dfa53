"""`tsotsa-peer`: joins a lab machine to the swarm."""

from __future__ import annotations

from pathlib import Path

import typer

from tsotsa.console import (CoordinatorAddress, LogFormat, NatTraversal, SwarmToken, TlsCa, TlsCert, TlsKey, load_tls,
                            parse_dtype, run_app, run_command, setup_logging)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A tsotsa peer.")


@app.callback()
def commands() -> None:
    """A peer hosts a span of the model's blocks for the swarm."""


@app.command()
def join(
    coordinator: CoordinatorAddress = ...,
    model: Path = typer.Option(None, "--model", help="Local copy of the checkpoint (else blocks are fetched)."),
    blocks: str = typer.Option(None, help="Span START:END to serve (default: what the swarm needs most)."),
    num_blocks: int = typer.Option(None, help="How many blocks to take when --blocks is not given."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    quant: str = typer.Option("none", help="none, nf4 or int8 (bitsandbytes)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="gRPC port (0 picks a free one)."),
    dht_port: int = typer.Option(0, help="DHT port (0 picks a free one; fix it to open it in a firewall)."),
    announce_host: str = typer.Option(None, help="Address others reach this peer at (default: --host)."),
    cache_dir: Path = typer.Option(None, help="Where fetched blocks are cached (default ~/.cache/tsotsa)."),
    max_sessions: int = typer.Option(None, min=1, help="Concurrent inference sessions (default: as many 1024-token "
                                                       "sessions as the KV budget holds, 4..128)."),
    max_batch: int = typer.Option(32, min=1, help="Sessions whose decode steps one pass over the blocks may "
                                               "compute together (1: every step alone)."),
    batch_window_ms: float = typer.Option(2.0, min=0.0, help="Milliseconds a decode pass may wait for the other "
                                                          "sessions that stepped lately (0: never waits)."),
    cache_mib: int = typer.Option(None, min=1, help="KV-cache budget in MiB over all sessions (default: 12 % of the "
                                                    "memory free at start, at least 256)."),
    session_timeout: float = typer.Option(300.0, help="Seconds an idle session keeps its cache."),
    admission_wait: float = typer.Option(10.0, min=0.0, help="Seconds a new session may wait in line for room "
                                                            "when the peer is full, before it is refused."),
    open_timeout: float = typer.Option(30.0, help="Seconds a new inference stream may take to open its session "
                                                  "before the peer closes it."),
    drain_timeout: float = typer.Option(60.0, help="Seconds SIGTERM (or a move) waits for open sessions."),
    rebalance: bool = typer.Option(None, "--rebalance/--no-rebalance",
                                   help="Move to other blocks when the swarm needs them more (default: on "
                                        "unless --blocks is given; with --blocks, the peer starts there)."),
    rebalance_period: float = typer.Option(60.0, min=0.1, help="Mean seconds between two looks at the swarm "
                                                              "when rebalancing."),
    rebalance_gain: float = typer.Option(1.3, min=1.0, help="How many times the swarm's weakest block's "
                                                           "throughput must grow for a move (uncovered blocks: "
                                                           "always)."),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)."),
    adapters: str = typer.Option(None, help="Fine-tuning runs whose adapters to serve, comma-separated "
                                            "(fetched from the coordinator)."),
    state_dir: Path = typer.Option(None, help="Where the peer keeps its DHT identity across restarts (default "
                                              "~/.local/share/tsotsa/peer/MODEL_ID; one per peer process)."),
    wait_timeout: float = typer.Option(None, help="Seconds to wait for an unreachable coordinator before giving "
                                                  "up (default: wait as long as it takes)."),
    metrics_port: int = typer.Option(None, help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a "
                                                "free port; under the swarm token and TLS when set; default off)."),
    metrics_host: str = typer.Option(None, help="Address the metrics page listens on (default: --host)."),
    log_format: LogFormat = "text",
    token: SwarmToken = None,
    nat_traversal: NatTraversal = False,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Serve a span of the coordinator's model until SIGTERM (which drains open sessions first)."""

    def body() -> None:
        say = setup_logging(log_format, "tsotsa.peer")
        tls = load_tls(tls_cert, tls_key, tls_ca)  # first: a wrong certificate is refused before torch loads
        if tls is not None:
            tls.check_serves(announce_host or host)
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, not {metrics_port}")
        import sys

        from tsotsa.peer.display import PeerDisplay
        from tsotsa.peer.rebalance import RebalancePolicy
        from tsotsa.peer.server import PeerOptions, serve_peer
        from tsotsa.peer.service import PeerLimits
        from tsotsa.remote import default_cache_dir
        from tsotsa.spans import QUANT_MODES, parse_span

        if quant not in QUANT_MODES:
            raise ValueError(f"unknown --quant {quant!r}; expected one of {', '.join(QUANT_MODES)}")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda, but this machine's torch sees no CUDA device")
        options = PeerOptions(
            coordinator=coordinator, model_dir=model, blocks=parse_span(blocks) if blocks else None,
            num_blocks=num_blocks, device=device, quant=quant, dtype=parse_dtype(dtype), host=host, port=port,
            dht_port=dht_port, announce_host=announce_host, cache_dir=cache_dir or default_cache_dir(),
            limits=PeerLimits(max_sessions=max_sessions, max_batch=max_batch,
                              max_cache_bytes=cache_mib << 20 if cache_mib else None,
                              session_timeout=session_timeout, open_timeout=open_timeout,
                              admission_wait=admission_wait, batch_window=batch_window_ms / 1000),
            drain_timeout=drain_timeout, threads=threads, token=token,
            adapters=[name for name in (adapters or "").split(",") if name], state_dir=state_dir,
            wait_timeout=wait_timeout, nat_traversal=nat_traversal, tls=tls, metrics_port=metrics_port,
            metrics_host=metrics_host,
            rebalance=RebalancePolicy(period=rebalance_period, gain=rebalance_gain)
            if (blocks is None if rebalance is None else rebalance) else None,
        )
        # progress bars and the live status line on a terminal only: elsewhere stdout is what scripts parse
        serve_peer(options, say=say, display=PeerDisplay(say, live=sys.stdout.isatty() and log_format == "text"))

    run_command(body)


def main() -> None:
    """The `tsotsa-peer` console script."""
    run_app(app, prog_name="tsotsa-peer")
