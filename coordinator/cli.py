"""`tsotsa-coordinator`: runs the swarm's coordinator."""

from __future__ import annotations

from pathlib import Path

import typer

from tsotsa.console import (AdminToken, CoordinatorAddress, LogFormat, NatTraversal, SwarmToken, TlsCa, TlsCert, TlsKey,
                            load_tls, run_app, run_command, setup_logging)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The tsotsa coordinator.")


@app.callback()
def commands() -> None:
    """The coordinator: DHT bootstrap node, model identity and tensors, swarm status."""


@app.command()
def up(
    model: Path = typer.Option(..., "--model", help="Hugging Face Llama checkpoint directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (gRPC and DHT)."),
    port: int = typer.Option(7070, help="gRPC port (0 picks a free one)."),
    dht_port: int = typer.Option(0, help="DHT port (0 picks a free one)."),
    token: SwarmToken = None,
    admin_token: AdminToken = None,
    state_dir: Path = typer.Option(None, help="Where the DHT identity, runs' data and adapters go (default "
                                              "~/.local/share/tsotsa/coordinator/MODEL_ID)."),
    db: Path = typer.Option(None, help="The runs' SQLite database (default STATE_DIR/coordinator.sqlite)."),
    nat_traversal: NatTraversal = False,
    log_format: LogFormat = "text",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    http_port: int = typer.Option(None, help="Also serve the HTTP API (OpenAI-compatible /v1, dashboard /, "
                                             "/metrics) on this port (0 picks a free one)."),
    http_host: str = typer.Option(None, help="Address the HTTP API listens on (default --host)."),
    served_model_name: str = typer.Option(None, help="The base model's name in /v1/models (default: its model id)."),
) -> None:
    """Serve MODEL to the swarm until SIGTERM or Ctrl-C; runs left unfinished by a restart resume."""

    def body() -> None:
        announce = setup_logging(log_format, "tsotsa.coordinator")
        tls = load_tls(tls_cert, tls_key, tls_ca)  # first: a bad TLS file is refused before torch loads
        from tsotsa.coordinator.server import CoordinatorOptions, serve_coordinator  # after quiet_libraries

        options = CoordinatorOptions(model_dir=model, host=host, port=port, dht_port=dht_port, token=token,
                                     admin_token=admin_token, state_dir=state_dir, db=db,
                                     nat_traversal=nat_traversal, tls=tls, http_port=http_port,
                                     http_host=http_host, served_name=served_model_name)
        serve_coordinator(options, announce=announce)

    run_command(body)


# ------------------------------------------------------------------ fine-tuning runs
# Everything heavy (gRPC, rich, torch) is imported inside the commands, so that --help stays fast.

FINAL_STATES = ("finished", "failed", "stopped")


def _loss(value: float) -> str:
    """A loss in the lines scripts read: always a float Python parses ("nan" when unknown)."""
    return f"{value:.4f}"


def _cell(value: float, digits: int = 4) -> str:
    """A number in a table: "-" when unknown."""
    return "-" if value != value else f"{value:.{digits}f}"


def _finite(value: float) -> float | None:
    return None if value != value else value


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def _short_peers(peer_ids) -> str:
    return ",".join(peer_id[-8:] for peer_id in peer_ids) or "-"


def _short_participant(entry: str) -> str:
    """ "peer_id start:end samples" with the peer id shortened to its last 8 characters (libp2p ids share their first ones)."""
    peer_id, _, rest = entry.partition(" ")
    return f"{peer_id[-8:]} {rest}".strip()


def _config(info) -> dict:
    import json

    try:
        config = json.loads(info.config_json) if info.config_json else {}
    except ValueError:
        return {"config_json": info.config_json}
    return config if isinstance(config, dict) else {"config": config}


def _rounds_total(info) -> int | None:
    total = _config(info).get("rounds")
    return total if isinstance(total, int) else None


def _last_done(info):
    done = [r for r in info.rounds if r.state == "done"]
    return max(done, key=lambda r: r.round) if done else None


def _round_json(round_info) -> dict:
    return {"round": round_info.round, "state": round_info.state, "train_loss": _finite(round_info.train_loss),
            "eval_loss": _finite(round_info.eval_loss), "samples": round_info.samples, "tokens": round_info.tokens,
            "tokens_per_s": _finite(round_info.tokens_per_s), "wire_bytes": round_info.wire_bytes,
            "peers": list(round_info.peers), "checkpoint": round_info.checkpoint}


def _state_line(name: str, state: str, message: str) -> str:
    return f"run {name}: {state} — {message}" if message else f"run {name}: {state}"


def _follow(client, name: str, rounds_total: int | None) -> None:
    """Prints the run's progress until it ends: a progress bar per round on a terminal, a plain line per event
    otherwise. Ctrl-C detaches and leaves the run going; a failed run raises (exit status 1)."""
    import contextlib
    import sys

    from tsotsa.errors import SwarmError

    live = sys.stdout.isatty()
    progress = None
    if live:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TextColumn("peers {task.fields[peers]}"), TimeElapsedColumn())

    def emit(line: str) -> None:
        if progress is not None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    tasks: dict[int, object] = {}  # round -> its progress bar
    totals: dict[int, int] = {}  # round -> steps it takes
    of_total = f"/{rounds_total}" if rounds_total else ""
    try:
        with progress if progress is not None else contextlib.nullcontext():
            for event in client.watch_run(name):
                if event.kind == "step":
                    if progress is None:
                        emit(f"round {event.round + 1} step {event.steps_done}/{event.steps_total} "
                             f"loss {_loss(event.loss)} tok/s {event.tokens_per_s:.1f} "
                             f"peers {_short_peers(event.peers)}")
                        continue
                    fields = {"loss": _cell(event.loss), "tps": f"{event.tokens_per_s:.1f}",
                              "peers": _short_peers(event.peers)}
                    if event.round not in tasks:
                        tasks[event.round] = progress.add_task(f"round {event.round + 1}{of_total}",
                                                               total=event.steps_total or None, **fields)
                    totals[event.round] = event.steps_total
                    progress.update(tasks[event.round], completed=event.steps_done,
                                    total=event.steps_total or None, **fields)
                elif event.kind == "round":
                    if event.round in tasks:
                        progress.update(tasks[event.round], completed=totals[event.round] or 1,
                                        total=totals[event.round] or 1)
                    emit(f"round {event.round + 1}: train loss {_loss(event.loss)}, eval loss {_loss(event.eval_loss)}, "
                         f"{event.samples} samples, {event.tokens_per_s:.1f} tok/s, checkpoint {event.checkpoint}")
                elif event.kind == "state":
                    emit(_state_line(name, event.state, event.message))
    except KeyboardInterrupt:
        print(f"detached; the run goes on: tsotsa-coordinator run {name}", flush=True)
        return
    info = client.run(name)
    if info.state == "failed":
        raise SwarmError(f"run {name} failed: {info.message or 'no reason given'}")
    last = _last_done(info)
    if info.state == "finished":
        print(f"run {name} finished: {info.rounds_done} rounds" +
              (f", adapter {last.checkpoint}" if last is not None and last.checkpoint else ""), flush=True)
    elif info.state == "stopped":
        print(f"run {name} stopped after {info.rounds_done}{of_total} rounds" +
              (f"; last adapter {last.checkpoint}" if last is not None and last.checkpoint else ""), flush=True)
    else:
        raise SwarmError(f"the coordinator stopped reporting on run {name} while it is {info.state}; "
                         f"see it with: tsotsa-coordinator run {name}")


@app.command()
def finetune(
    coordinator: CoordinatorAddress = ...,
    data: Path = typer.Option(..., "--data", help="Training data, JSONL, a row per line: {\"text\"}, {\"prompt\", "
                                                  "\"completion\"}, {\"messages\"} (OpenAI chat), {\"conversations\"} "
                                                  "(ShareGPT) or {\"instruction\", \"input\", \"output\"} (Alpaca); or "
                                                  "a Hugging Face datasets directory (its train split). Uploaded in "
                                                  "chunks, up to 1 GiB."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Evaluation data (same formats; a datasets "
                                                             "directory's validation or test split), scored each "
                                                             "round."),
    name: str = typer.Option(..., "--name", help="The run's name (unique on the coordinator)."),
    rounds: int = typer.Option(3, help="Rounds; each ends with an aggregated, evaluated, saved adapter."),
    steps_per_round: int = typer.Option(10, help="Optimizer steps per round across the swarm."),
    micro_batch: int = typer.Option(4, help="Samples per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(256, help="Longest sample in tokens (a longer one is refused)."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, help="LoRA alpha (the update is scaled by alpha / r)."),
    lora_dropout: float = typer.Option(0.0, help="LoRA dropout, in [0, 1)."),
    target_modules: str = typer.Option("q_proj,v_proj", help="Comma-separated Llama linears to adapt: q_proj, "
                                                             "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (the peak, with a schedule)."),
    lr_schedule: str = typer.Option("constant", help="constant, linear or cosine decay over the run's steps."),
    warmup_steps: int = typer.Option(0, help="Optimizer steps of linear warm-up from 0 to --lr."),
    verify_fraction: float = typer.Option(0.0, help="Chance per peer and micro-batch that its forward pass is "
                                                    "recomputed on a replica and compared (needs --lora-dropout 0; "
                                                    "docs/security.md)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    seed: int = typer.Option(0, help="Seed of the LoRA initialisation and the data order."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Recompute activations in backward to save peer memory."),
    out: Path = typer.Option(None, "--out", help="Where the coordinator writes the run's adapters (a path on the "
                                                 "coordinator's machine; default its state directory)."),
    token: SwarmToken = None,
    admin_token: AdminToken = None,
    detach: bool = typer.Option(False, "--detach", help="Launch the run and return without following it."),
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Launch a LoRA fine-tuning run on the swarm and follow its progress (Ctrl-C detaches; the run goes on)."""

    def body() -> None:
        from tsotsa.coordinator_client import CoordinatorClient
        from tsotsa.training.lora import LLAMA_LINEARS
        from tsotsa.v1 import tsotsa_pb2 as pb

        for flag, value in (("--rounds", rounds), ("--steps-per-round", steps_per_round),
                            ("--micro-batch", micro_batch), ("--grad-accum", grad_accum), ("--seq-len", seq_len),
                            ("--lora-r", lora_r)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive integer, not {value}")
        if not name.strip():
            raise ValueError("--name must not be empty")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), not {lora_dropout}")
        if not lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be positive, not {lora_alpha}")
        if not lr > 0:
            raise ValueError(f"--lr must be positive, not {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"--weight-decay must not be negative, not {weight_decay}")
        if seed < 0:
            raise ValueError(f"--seed must not be negative, not {seed}")
        from tsotsa.training.schedule import check_schedule

        check_schedule(lr_schedule, warmup_steps, rounds * steps_per_round)
        targets = [m.strip() for m in target_modules.split(",") if m.strip()]
        unknown = [m for m in targets if m not in LLAMA_LINEARS]
        if unknown or not targets:
            raise ValueError(f"--target-modules {','.join(unknown) or '(none)'}: choose from {', '.join(LLAMA_LINEARS)}")
        if not admin_token:
            raise ValueError("launching a run needs the coordinator's admin token: give --admin-token "
                             "(or TSOTSA_ADMIN_TOKEN)")
        config = pb.RunConfig(rounds=rounds, steps_per_round=steps_per_round, micro_batch=micro_batch,
                              grad_accum=grad_accum, seq_len=seq_len, lora_r=lora_r, lora_alpha=lora_alpha,
                              lora_dropout=lora_dropout, target_modules=list(dict.fromkeys(targets)), lr=lr,
                              weight_decay=weight_decay, seed=seed, gradient_checkpointing=gradient_checkpointing,
                              lr_schedule=lr_schedule, warmup_steps=warmup_steps, verify_fraction=verify_fraction,
                              out_dir=str(out) if out is not None else "")
        with CoordinatorClient(coordinator, token=token, admin_token=admin_token,
                               tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            info = client.create_run(name, config, data, eval_data)
            evaluated = f", {info.eval_examples} evaluation examples" if info.eval_examples else ""
            print(f"run {info.name} created: {info.state} ({info.train_examples} training examples{evaluated})",
                  flush=True)
            if detach:
                print(f"follow it with: tsotsa-coordinator run {info.name} --coordinator {coordinator} --follow",
                      flush=True)
                return
            _follow(client, info.name, rounds)

    run_command(body)


@app.command()
def runs(
    coordinator: CoordinatorAddress = ...,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line (a list of runs)."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """List the coordinator's fine-tuning runs."""

    def body() -> None:
        import json

        from tsotsa.coordinator_client import CoordinatorClient

        with CoordinatorClient(coordinator, token=token, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            infos = client.runs()
        rows = []
        for info in infos:
            last = _last_done(info)
            rows.append({"name": info.name, "state": info.state, "message": info.message,
                         "rounds_done": info.rounds_done, "rounds_total": _rounds_total(info),
                         "last_train_loss": _finite(last.train_loss) if last is not None else None,
                         "last_eval_loss": _finite(last.eval_loss) if last is not None else None})
        if as_json:
            print(json.dumps(rows))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} runs on {coordinator}")
        for column in ("name", "state", "rounds", "train loss", "eval loss", "message"):
            table.add_column(column, justify="right" if column in ("rounds", "train loss", "eval loss") else "left")
        for row in rows:
            table.add_row(row["name"], row["state"], f"{row['rounds_done']}/{row['rounds_total'] or '?'}",
                          "-" if row["last_train_loss"] is None else f"{row['last_train_loss']:.4f}",
                          "-" if row["last_eval_loss"] is None else f"{row['last_eval_loss']:.4f}", row["message"])
        Console().print(table)

    run_command(body)


@app.command("run")
def run_(
    run: str = typer.Argument(..., help="The run's name."),
    coordinator: CoordinatorAddress = ...,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
    follow: bool = typer.Option(False, "--follow", help="Then follow its progress until it ends, as finetune does."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Show a run: its state, its configuration and its rounds."""

    def body() -> None:
        import json

        from tsotsa.coordinator_client import CoordinatorClient

        with CoordinatorClient(coordinator, token=token, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            info = client.run(run)
            config = _config(info)
            if as_json:
                print(json.dumps({"name": info.name, "state": info.state, "message": info.message,
                                  "rounds_done": info.rounds_done, "config": config,
                                  "rounds": [_round_json(r) for r in info.rounds]}))
            else:
                from rich.console import Console
                from rich.table import Table

                console = Console()
                total = _rounds_total(info)
                console.print(f"{_state_line(info.name, info.state, info.message)} "
                              f"({info.rounds_done}/{total or '?'} rounds done)", markup=False, highlight=False)
                settings = Table(title="config", show_header=False)
                settings.add_column("setting")
                settings.add_column("value")
                for key, value in config.items():
                    settings.add_row(str(key), ", ".join(map(str, value)) if isinstance(value, list) else str(value))
                console.print(settings)
                table = Table(title="rounds")
                for column in ("round", "state", "train loss", "eval loss", "samples", "tokens", "tok/s",
                               "wire", "peers", "checkpoint"):
                    table.add_column(column, justify="left" if column in ("state", "peers", "checkpoint")
                                     else "right")
                for r in sorted(info.rounds, key=lambda r: r.round):
                    table.add_row(str(r.round), r.state, _cell(r.train_loss), _cell(r.eval_loss), str(r.samples),
                                  str(r.tokens), _cell(r.tokens_per_s, 1), _size(r.wire_bytes),
                                  "\n".join(_short_participant(p) for p in r.peers) or "-", r.checkpoint or "-")
                console.print(table)
            if follow and info.state not in FINAL_STATES:
                _follow(client, info.name, _rounds_total(info))

    run_command(body)


@app.command()
def stop(
    run: str = typer.Argument(..., help="The run's name."),
    coordinator: CoordinatorAddress = ...,
    token: SwarmToken = None,
    admin_token: AdminToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Stop a run; the rounds it finished, and their adapters, stay."""

    def body() -> None:
        from tsotsa.coordinator_client import CoordinatorClient

        if not admin_token:
            raise ValueError("stopping a run needs the coordinator's admin token: give --admin-token "
                             "(or TSOTSA_ADMIN_TOKEN)")
        with CoordinatorClient(coordinator, token=token, admin_token=admin_token,
                               tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            info = client.stop_run(run)
        print(_state_line(info.name or run, info.state, info.message))

    run_command(body)


@app.command()
def export(
    run: str = typer.Argument(..., help="The run's name."),
    coordinator: CoordinatorAddress = ...,
    out: Path = typer.Option(..., "--out", help="Where to write the adapter (or, with --merge, the merged model)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the adapter into the base model: a plain Llama "
                                                      "checkpoint that needs no PEFT (CPU is enough)."),
    base: Path = typer.Option(None, "--base", help="The base model's checkpoint directory (for --merge)."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Export the adapter of a run's last finished round in PEFT's format, or merged into the base model.

    The adapter comes from the coordinator over gRPC, so this runs on any machine; it prints the path it wrote.
    """

    def body() -> None:
        import tempfile

        from tsotsa.coordinator_client import CoordinatorClient
        from tsotsa.remote import fetch_adapter
        from tsotsa.training.export import merge_adapter, write_adapter
        from tsotsa.training.lora import lora_from_spec

        if merge and (base is None or not base.is_dir()):
            raise ValueError("--merge needs --base, the base model's checkpoint directory")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} already exists and is not empty; choose another --out")
        with CoordinatorClient(coordinator, token=token, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            spec, tensors = fetch_adapter(client, run)
            info = client.model_info()
        settings = lora_from_spec(spec)
        if not merge:
            print(write_adapter(out, tensors, settings, info.model_id))
            return
        with tempfile.TemporaryDirectory() as scratch:
            adapter_dir = write_adapter(Path(scratch) / "adapter", tensors, settings, str(base))
            print(merge_adapter(base, adapter_dir, out))

    run_command(body)


def main() -> None:
    """The `tsotsa-coordinator` console script."""
    run_app(app, prog_name="tsotsa-coordinator")
