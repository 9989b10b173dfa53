"""What the command-line tools share: one readable line per error, quiet libraries, dtype names."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tsotsa.errors import TsotsaError

if TYPE_CHECKING:
    import torch

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


def quiet_libraries() -> None:
    """Keeps hivemind's, transformers' and bitsandbytes' chatter (and progress bars) off a user's terminal.
    Through the variables they read at import where possible: a tool that never needs transformers never
    loads it. bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the model hub
    (installing `kernels` would make it try): its logger is set before anything imports it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
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
