"""What the command-line tools share: one readable line per error, quiet libraries, dtype names, the options
every tool takes (swarm token, TLS files, log format)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
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
# `log_format: LogFormat = "text"`, then `say = setup_logging(log_format)` first thing in the command's body (see
# setup_logging).
LogFormat = Annotated[str, typer.Option(
    "--log-format", envvar="TSOTSA_LOG_FORMAT",
    help="text (or TSOTSA_LOG_FORMAT): plain lines as always; json: one JSON object per line (time, level, logger, "
         "message, exception) on stdout and stderr, for log collectors.")]
LOG_FORMATS = ("text", "json")
NatTraversal = Annotated[bool, typer.Option(
    "--nat-traversal", envvar="TSOTSA_NAT_TRAVERSAL", show_default=False,
    help="Let the DHT node map its port by UPnP and use libp2p relays (off: on a lab network they only widen "
         "who can reach it).")]


def load_tls(cert: Path | None, key: Path | None, ca: Path | None) -> "TlsSettings | None":
    """The TLS settings of the three options (None: TLS off); a missing or inconsistent file raises one line."""
    from tsotsa.tls import TlsSettings

    return TlsSettings.load(cert, key, ca)


def quiet_libraries() -> None:
    """Keeps hivemind's, transformers', peft's and bitsandbytes' chatter (and progress bars) off a user's terminal.
    Through the variables they read at import where possible: a tool that never needs transformers never
    loads it. bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the model hub
    (installing `kernels` would make it try): its logger is set before anything imports it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # else gRPC logs each failed TLS handshake at INFO on stderr
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft 0.21 asks transformers 5.24 the attribute it deprecated, whenever it wraps a model
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def run_app(app: typer.Typer, prog_name: str | None = None) -> None:
    """A console script's entry point: runs `app` on the command line, where a usage error (a missing
    option, a value of the wrong type, an unknown flag) is one line on stderr, `error: ...; see 'CMD --help'`,
    exit status 2, instead of click's usage box; a command given no arguments still prints its help."""
    try:  # typer 0.2x carries its own copy of click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = app(prog_name=prog_name, standalone_mode=False)
    except NoArgsIsHelpError as error:
        error.show()
        sys.exit(error.exit_code)
    except UsageError as error:
        hint = f"; see '{error.ctx.command_path} --help'" if error.ctx is not None else ""
        print(f"error: {' '.join(error.format_message().split()).rstrip('.')}{hint}", file=sys.stderr)
        sys.exit(error.exit_code)
    except ClickException as error:
        print(f"error: {' '.join(error.format_message().split())}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def run_command(body: Callable[[], None]) -> None:
    """Runs a CLI command: a TsotsaError or bad value becomes `error: ...` on stderr and exit status 1 (in json
    log format, one JSON object with level ERROR; so is any other exception, with its traceback)."""
    quiet_libraries()
    try:
        body()
    except (TsotsaError, ValueError) as error:
        if _json_logs:
            logging.getLogger("tsotsa").error("%s", error)
        else:
            print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception:
        if not _json_logs:
            raise
        logging.getLogger("tsotsa").critical("the command failed", exc_info=True)
        raise typer.Exit(1) from None


Say = Callable[[str], None]  # prints one of a service's announcement lines ("serving blocks ...")
_json_logs = False


def setup_logging(log_format: str, logger_name: str = "tsotsa") -> Say:
    """Applies `--log-format` to this process and returns the `say` function for the command's own announcement
    lines (what a service prints when it is up, waiting, leaving).

    Usage in a command (`log_format: LogFormat = "text"` among its options), inside `run_command`'s body so
    that a bad value is one `error:` line:

        say = setup_logging(log_format, "tsotsa.serve")
        say(f"serving at {url}")

    `text` changes nothing: `say` prints the line as it is, and log records keep Python's defaults (warnings
    and worse, bare, on stderr). `json` makes every line the process writes through Python one JSON object:
    `say` writes `{"time", "level": "INFO", "logger": logger_name, "message"}` to stdout; the root logger gets a
    handler writing the same objects (plus `exception`, the traceback, when there is one) to stderr, at the
    level it has (WARNING unless set); handlers libraries already installed (or install later: hivemind's,
    transformers') get the same formatter; `warnings.warn` and uncaught exceptions in threads become records
    too. Output of native code (gRPC's C core, hivemind's p2p daemon) stays as it is."""
    global _json_logs
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown --log-format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
    if log_format == "text":
        return lambda line: print(line, flush=True)
    _json_logs = True
    formatter = JsonFormatter()
    root = logging.getLogger()
    if not any(getattr(handler, "_tsotsa_json", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._tsotsa_json = True
        root.addHandler(handler)
    for logger in [root, *logging.root.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler):
                handler.setFormatter(formatter)
    logging.setLoggerClass(_json_logger_class(logging.getLoggerClass(), formatter))
    logging.captureWarnings(True)

    def thread_failed(args: threading.ExceptHookArgs) -> None:
        logging.getLogger(logger_name).error("uncaught exception in thread %s",
                                             args.thread.name if args.thread else "?",
                                             exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = thread_failed

    def say(line: str) -> None:
        record = logging.LogRecord(logger_name, logging.INFO, __file__, 0, "%s", (line,), None)
        print(formatter.format(record), flush=True)

    return say


# Python's own level names: libraries rename some process-wide (hivemind makes WARNING "WARN"), and a log
# collector's parsing must not depend on which ones this process imported.
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR",
                logging.CRITICAL: "CRITICAL"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, milliseconds), level (DEBUG, INFO, WARNING, ERROR or
    CRITICAL), logger, message, and `exception` (the formatted traceback) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
                 "level": _LEVEL_NAMES.get(record.levelno, record.levelname), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def _json_logger_class(base: type[logging.Logger], formatter: logging.Formatter) -> type[logging.Logger]:
    """A logger class whose stream handlers, added by a library after `setup_logging`, write JSON too."""

    class JsonHandlersLogger(base):
        def addHandler(self, handler: logging.Handler) -> None:
            if isinstance(handler, logging.StreamHandler):
                handler.setFormatter(formatter)
            super().addHandler(handler)

    return JsonHandlersLogger


def parse_dtype(name: str) -> "torch.dtype":
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    import torch  # here, not at the top: tools that only talk to servers start without torch

    return getattr(torch, name)
