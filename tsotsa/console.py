"""What the command-line tools share: one readable line per error, quiet libraries, dtype names, the options
every tool takes (swarm token, TLS files)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tsotsa.errors import TsotsaError

if TYPE_CHECKING:
    import torch

    from tsotsa.tls import TlsSettings

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# The options every CLI shares, declared once. `token: SwarmToken = None`; `coordinator: CoordinatorAddress`
# (`= ...`: required) or `= None` (optional).
SwarmToken = Annotated[Optional[str], typer.Option(
    "--token", envvar="TSOTSA_TOKEN", show_default=False,
    help="Swarm token (or TSOTSA_TOKEN): every call carries it, and servers refuse calls without it.")]
AdminToken = Annotated[Optional[str], typer.Option(
    "--admin-token", envvar="TSOTSA_ADMIN_TOKEN", show_default=False,
    help="The coordinator's admin token (or TSOTSA_ADMIN_TOKEN), which launching and stopping fine-tuning runs "
         "needs.")]
CoordinatorAddress = Annotated[str, typer.Option("--coordinator", help="Coordinator address HOST:PORT.")]
# TLS: all three or none (`tsotsa.tls.TlsSettings.load` says which is missing); `tls_cert: TlsCert = None`, ...,
# then `load_tls(tls_cert, tls_key, tls_ca)` inside the command's body.
TlsCert = Annotated[Optional[Path], typer.Option(
    "--tls-cert", envvar="TSOTSA_TLS_CERT", show_default=False,
    help="This machine's TLS certificate, signed by the lab CA (or TSOTSA_TLS_CERT; see tsotsa tls issue). With "
         "--tls-key and --tls-ca every connection is mutual TLS.")]
TlsKey = Annotated[Optional[Path], typer.Option(
    "--tls-key", envvar="TSOTSA_TLS_KEY", show_default=False,
    help="The private key of --tls-cert (or TSOTSA_TLS_KEY).")]
TlsCa = Annotated[Optional[Path], typer.Option(
    "--tls-ca", envvar="TSOTSA_TLS_CA", show_default=False,
    help="The lab CA's certificate (or TSOTSA_TLS_CA; see tsotsa tls init): servers and clients admit only "
         "certificates it signed.")]
NatTraversal = Annotated[bool, typer.Option(
    "--nat-traversal", envvar="TSOTSA_NAT_TRAVERSAL", show_default=False,
    help="Let the DHT node map its port by UPnP and use libp2p relays (off: on a lab network they only widen "
         "who can reach it).")]


def load_tls(cert: Path | None, key: Path | None, ca: Path | None) -> "TlsSettings | None":
    """The TLS settings of the three options (None: TLS off); a missing or inconsistent file raises one line."""
    from tsotsa.tls import TlsSettings

    return TlsSettings.load(cert, key, ca)


def quiet_libraries() -> None:
    """Keeps hivemind's, transformers' and bitsandbytes' chatter (and progress bars) off a user's terminal.
    Through the variables they read at import where possible: a tool that never needs transformers never
    loads it. bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the model hub
    (installing `kernels` would make it try): its logger is set before anything imports it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # else gRPC logs each failed TLS handshake at INFO on stderr
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def run_command(body: Callable[[], None]) -> None:
    """Runs a CLI command: a TsotsaError or bad value becomes `error: ...` on stderr and exit status 1."""
    quiet_libraries()
    try:
        body()
    except (TsotsaError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def parse_dtype(name: str) -> "torch.dtype":
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    import torch  # here, not at the top: tools that only talk to servers start without torch

    return getattr(torch, name)
