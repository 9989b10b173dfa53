"""`tsotsa-coordinator`: runs the swarm's coordinator."""

from __future__ import annotations

from pathlib import Path

import typer

from tsotsa.console import run_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The tsotsa coordinator.")


@app.callback()
def main() -> None:
    """The coordinator: DHT bootstrap node, model identity and tensors, swarm status."""


@app.command()
def up(
    model: Path = typer.Option(..., "--model", help="Hugging Face Llama checkpoint directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (gRPC and DHT)."),
    port: int = typer.Option(7070, help="gRPC port (0 picks a free one)."),
    dht_port: int = typer.Option(0, help="DHT port (0 picks a free one)."),
    token: str = typer.Option(None, envvar="TSOTSA_TOKEN", show_default=False,
                              help="Swarm token (or TSOTSA_TOKEN): calls without it are refused."),
) -> None:
    """Serve MODEL to the swarm until SIGTERM or Ctrl-C."""
    from tsotsa.coordinator.server import serve_coordinator

    run_command(lambda: serve_coordinator(model, host, port, dht_port, announce=lambda line: print(line, flush=True),
                                          token=token))
