"""`tsotsa`: make checkpoints, generate through the swarm, show the swarm map, make the lab's TLS certificates."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsotsa.console import (CoordinatorAddress, LogFormat, SwarmToken, TlsCa, TlsCert, TlsKey, load_tls, parse_dtype,
                            run_app, run_command, setup_logging)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tsotsa: Llama inference across a swarm.")


@app.command("make-tiny-model")
def make_tiny_model_command(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    layers: int = typer.Option(4, help="Transformer blocks."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    kv_heads: int = typer.Option(None, help="Key/value heads (GQA when fewer than --heads)."),
    intermediate: int = typer.Option(None, help="MLP size (default 4 x hidden)."),
    vocab: int = typer.Option(512, help="Vocabulary size."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    shard_size: str = typer.Option(None, help="Shard the safetensors files, e.g. 200KB or 2GB."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    chat_template: str = typer.Option(None, help="Give the tokenizer a chat template: llama-2 (Llama-2-chat's)."),
) -> None:
    """Write a random-weight Llama in the Hugging Face layout (config, safetensors, tokenizer)."""

    def body() -> None:
        from tsotsa.tiny_model import make_tiny_model

        if kv_heads and heads % kv_heads:
            raise ValueError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
        if hidden % heads:
            raise ValueError(f"--hidden {hidden} is not a multiple of --heads {heads}")
        path = make_tiny_model(out_dir, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                               intermediate=intermediate, vocab=vocab, seed=seed, shard_size=shard_size,
                               dtype=parse_dtype(dtype), chat_template=chat_template)
        print(f"wrote a {layers}-block Llama (hidden {hidden}) to {path}")

    run_command(body)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    coordinator: CoordinatorAddress = None,
    model: Path = typer.Option(None, "--model", help="Local checkpoint for the head (with --initial-peers)."),
    initial_peers: str = typer.Option(None, help="DHT multiaddrs, comma-separated (coordinator not needed)."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 for greedy; above 0 samples."),
    top_k: int = typer.Option(0, help="Keep only the k most likely tokens when sampling (0: all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: int = typer.Option(None, help="Seed for sampling."),
    cache_dir: Path = typer.Option(None, help="Where the head and tokenizer are cached (default ~/.cache/tsotsa)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line instead of streaming text."),
    adapter: str = typer.Option(None, help="A fine-tuning run whose adapter the peers apply (the base model "
                                           "when not given)."),
    verify_fraction: float = typer.Option(0.0, help="Chance per hop and step that a hop's work is recomputed on "
                                                    "another peer and compared (docs/security.md)."),
    verified_only: bool = typer.Option(False, help="Show only tokens every hop was checked for (each hop is "
                                                   "checked at the end)."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Generate a continuation of PROMPT through the swarm, streaming tokens as they come."""

    def body() -> None:
        from tsotsa.client.config import ClientConfig
        from tsotsa.client.model import SwarmModel, require_tokenizer

        peers = [p for p in (initial_peers or "").split(",") if p]
        tls = load_tls(tls_cert, tls_key, tls_ca)
        config = ClientConfig(verify_fraction=verify_fraction, verified_only=verified_only)
        if model is not None:
            if not peers:
                raise ValueError("--model needs --initial-peers (the DHT to find peers in)")
            swarm_model = SwarmModel.from_checkpoint(model, peers, token=token, tls=tls, config=config)
        elif coordinator:
            swarm_model = SwarmModel.from_coordinator(coordinator, initial_peers=peers or None, cache_dir=cache_dir,
                                                      token=token, tls=tls, config=config)
        else:
            raise ValueError("give --coordinator HOST:PORT (or --model with --initial-peers)")
        with swarm_model:
            tokenizer = require_tokenizer(swarm_model)
            prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
            produced: list[int] = []
            shown = ""

            def stream(tokens) -> None:
                nonlocal shown
                produced.append(int(tokens[0]))
                if as_json:
                    return
                text = tokenizer.decode(produced, skip_special_tokens=True)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

            if not as_json:
                sys.stdout.write(prompt)
            try:
                output, stats = swarm_model.generate(prompt_ids, max_new_tokens=max_new_tokens,
                                                     do_sample=temperature > 0, temperature=temperature or 1.0,
                                                     top_k=top_k, top_p=top_p, seed=seed, on_tokens=stream,
                                                     adapter=adapter, return_stats=True)
            except BaseException:
                if not as_json:  # the error line must not continue the streamed text's line
                    print(flush=True)
                raise
            produced[:] = output[0, prompt_ids.shape[1]:].tolist()  # what a rewind corrected, if one did
            if stats.rewound_tokens and not as_json:
                print(f"\n[a peer answered wrongly and was banned; the corrected text:]\n{prompt}"
                      f"{tokenizer.decode(produced, skip_special_tokens=True)}", end="")
            if as_json:
                print(json.dumps({
                    "prompt_ids": prompt_ids[0].tolist(),
                    "output_ids": produced,
                    "text": tokenizer.decode(produced, skip_special_tokens=True),
                    "tokens_per_s": round(stats.tokens_per_s, 3),
                }))
            else:
                print(flush=True)
                checked = f", {stats.checks} checks" if stats.checks else ""
                print(f"[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, {stats.hops} hops{checked}]",
                      file=sys.stderr)

    run_command(body)


@app.command()
def status(
    coordinator: CoordinatorAddress = ...,
    as_json: bool = typer.Option(False, "--json", help="Print the swarm map as JSON."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Print the swarm map: every block, the peers serving it, their state and throughput."""

    def body() -> None:
        from tsotsa.coordinator_client import CoordinatorClient
        from tsotsa.swarm_map import print_swarm_map, swarm_map_json

        with CoordinatorClient(coordinator, token=token, tls=load_tls(tls_cert, tls_key, tls_ca)) as client:
            swarm_map = client.swarm_status()
        if as_json:
            print(json.dumps(swarm_map_json(swarm_map)))
        else:
            print_swarm_map(swarm_map)

    run_command(body)


@app.command()
def serve(
    coordinator: CoordinatorAddress = ...,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="HTTP port (0 picks a free one)."),
    served_model_name: str = typer.Option(None, help="The base model's name in /v1/models (default: its model id)."),
    workers: int = typer.Option(16, min=1, max=256, help="Generations run at once; more requests wait."),
    verify_fraction: float = typer.Option(0.0, min=0.0, max=1.0,
                                          help="Spot-check peers (docs/security.md); only checked tokens are sent."),
    merge_steps: bool = typer.Option(True, help="Send the decode steps of concurrent requests on each peer as "
                                                "one message (docs/architecture.md, \"Merging a client's "
                                                "requests\")."),
    wait_timeout: float = typer.Option(None, help="Seconds to wait for an unreachable coordinator before giving "
                                                  "up (default: wait as long as it takes)."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    log_format: LogFormat = "text",
) -> None:
    """Serve the swarm over HTTP: an OpenAI-compatible API (/v1), the dashboard (/) and /metrics."""

    def body() -> None:
        say = setup_logging(log_format, "tsotsa.serve")
        tls = load_tls(tls_cert, tls_key, tls_ca)
        from tsotsa.api.server import HttpOptions, serve_http

        serve_http(HttpOptions(coordinator=coordinator, host=host, port=port, token=token, tls=tls,
                               served_name=served_model_name, workers=workers, verify_fraction=verify_fraction,
                               merge_steps=merge_steps, wait_timeout=wait_timeout),
                   announce=say)

    run_command(body)


@app.command()
def plan(
    model: str = typer.Option(..., "--model", help="A checkpoint directory, its config.json, or llama-2-7b, "
                                                  "llama-2-13b, llama-2-70b."),
    machines: str = typer.Option(..., "--machines", help="Each machine's memory (GPU memory for GPU peers), "
                                                        "e.g. 8x16GiB,2x24GiB."),
    quant: str = typer.Option("none", help="none, nf4 or int8, as the peers will run."),
    dtype: str = typer.Option("float32", help="The peers' --dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cuda", help="The peers' --device, cpu or cuda (NF4 statistics differ)."),
    max_length: int = typer.Option(None, min=1, help="Tokens of one session, prompt and output (default: the "
                                                     "model's maximum)."),
    sessions: int = typer.Option(1, min=1, help="Sessions of --max-length every peer must hold at once (raises "
                                                "its --cache-mib where needed)."),
    cache_mib: int = typer.Option(None, min=1, help="The peers' KV-cache budget (tsotsa-peer --cache-mib; default: "
                                                    "each peer's own, 12 % of its free memory)."),
    reserve: str = typer.Option("1GiB", help="Memory the OS and runtime keep on each machine."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
) -> None:
    """How the model's blocks fit on the machines: bytes per block, head, KV cache, the span each machine takes."""

    def body() -> None:
        from tsotsa.plan import format_plan, parse_machines, parse_size, plan_json, plan_swarm

        result = plan_swarm(model, quant, parse_dtype(dtype), parse_machines(machines), max_length=max_length,
                            sessions=sessions, reserve_bytes=parse_size(reserve),
                            cache_bytes=cache_mib << 20 if cache_mib else None,
                            device=device)
        print(plan_json(result) if as_json else format_plan(result))

    run_command(body)


# ------------------------------------------------------------------ evaluation with lm-eval

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate the swarm with lm-eval tasks (docs/evaluation.md).")
app.add_typer(eval_app, name="eval")
# The options both eval commands take, and the EvalOptions they make.
IncludePaths = Annotated[list[Path], typer.Option(help="A directory of task YAML files (repeatable).")]
TaskLimit = Annotated[Optional[int], typer.Option(min=1, help="Documents per task (default: all).")]
NumFewshot = Annotated[Optional[int], typer.Option(min=0, help="Few-shot examples (default: the task's).")]
EvalBatch = Annotated[int, typer.Option(min=1, max=256, help="Sequences per Forward, generations at once.")]


def _eval_options(tasks: str, include_path: list[Path] | None, limit: int | None, num_fewshot: int | None):
    from tsotsa.evaluation.run import EvalOptions

    return EvalOptions(tasks=[name.strip() for name in tasks.split(",") if name.strip()],
                       include_paths=list(include_path or []), limit=limit, num_fewshot=num_fewshot)


@eval_app.command("run")
def eval_run(
    coordinator: CoordinatorAddress = ...,
    tasks: str = typer.Option(..., help="lm-eval task names, comma-separated (shipped: tsotsa_colors, "
                                        "tsotsa_colors_gen, tsotsa_lab_qa, tsotsa_lab_continue, "
                                        "tsotsa_lab_texts)."),
    adapter: str = typer.Option(None, help="A fine-tuning run whose adapter the peers apply."),
    include_path: IncludePaths = None,
    limit: TaskLimit = None,
    num_fewshot: NumFewshot = None,
    batch_size: EvalBatch = 8,
    output: Path = typer.Option(None, help="Also write the results as JSON here."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Run lm-eval TASKS through the swarm and print lm-eval's results table."""

    def body() -> None:
        tls = load_tls(tls_cert, tls_key, tls_ca)
        from tsotsa.client.model import SwarmModel
        from tsotsa.evaluation.backend import SwarmLM
        from tsotsa.evaluation.run import evaluate, write_results
        from lm_eval.utils import make_table

        options = _eval_options(tasks, include_path, limit, num_fewshot)
        with SwarmModel.from_coordinator(coordinator, token=token, tls=tls) as model:
            results = evaluate(SwarmLM(model=model, adapter=adapter, batch_size=batch_size), options)
        print(make_table(results))
        if output is not None:
            write_results(results, output)

    run_command(body)


@eval_app.command("compare")
def eval_compare(
    variants: str = typer.Option("transformers,fp32,nf4", help="KIND[+RUN], comma-separated; KIND: transformers, "
                                                                "fp32, bf16, int8, nf4 (peers started here) or "
                                                                "swarm (the given swarm's peers)."),
    model: Path = typer.Option(None, help="The checkpoint directory (peers read it; transformers loads it)."),
    coordinator: str = typer.Option(None, help="HOST:PORT of a coordinator (without peers, unless the variant is "
                                               "swarm); default: one is started here."),
    adapter: str = typer.Option(None, help="A fine-tuning run: every variant also with its adapter."),
    tasks: str = typer.Option("tsotsa_colors,tsotsa_lab_texts", help="lm-eval task names, comma-separated."),
    include_path: IncludePaths = None,
    limit: TaskLimit = None,
    num_fewshot: NumFewshot = None,
    batch_size: EvalBatch = 8,
    peers: int = typer.Option(2, min=1, max=64, help="Peers started per variant, the blocks split evenly."),
    threads: int = typer.Option(1, min=1, max=1024, help="torch threads of each peer and of transformers."),
    device: str = typer.Option("cpu", help="cpu or cuda, for the peers and transformers."),
    warmup: int = typer.Option(1, min=0, max=100, help="Latency: warm-up runs of each phase."),
    repeats: int = typer.Option(5, min=1, max=1000, help="Latency: timed runs of each phase."),
    new_tokens: int = typer.Option(32, min=1, max=4096, help="Latency: tokens per timed generation."),
    concurrency: int = typer.Option(4, min=1, max=256, help="Throughput: requests at once."),
    output_dir: Path = typer.Option(Path("eval-compare"), help="Where results.md, results.json and the plots go."),
    token: SwarmToken = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Run the same tasks and latency protocol over variants (formats, adapters, transformers vs the swarm)."""

    def body() -> None:
        tls = load_tls(tls_cert, tls_key, tls_ca)
        from tsotsa.evaluation.compare import CompareOptions, compare, parse_variants
        from tsotsa.evaluation.latency import LatencyProtocol
        from tsotsa.evaluation.report import write_report

        options = CompareOptions(
            variants=parse_variants(variants, adapter), output_dir=output_dir, model_dir=model, coordinator=coordinator,
            tasks=_eval_options(tasks, include_path, limit, num_fewshot),
            protocol=LatencyProtocol(new_tokens=new_tokens, warmup=warmup, repeats=repeats, concurrency=concurrency),
            peers=peers, threads=threads, device=device, batch_size=batch_size, token=token, tls=tls)
        paths = write_report(compare(options, say=lambda line: print(line, flush=True)), output_dir)
        print(paths[1].read_text(), end="")
        print(f"wrote {', '.join(str(path) for path in paths)}")

    run_command(body)


# ------------------------------------------------------------------ the lab's TLS certificates

tls_app = typer.Typer(no_args_is_help=True, help="The lab's certificate authority and one certificate per machine.")
app.add_typer(tls_app, name="tls")


@tls_app.command("init")
def tls_init(directory: Path = typer.Argument(..., help="Where to write ca.key and ca.crt.")) -> None:
    """Make the lab CA: ca.key (keep it on one machine, mode 0600) and ca.crt (give it to every machine)."""

    def body() -> None:
        from tsotsa.tls import init_ca

        key, cert = init_ca(directory)
        print(f"wrote the lab CA: {key} (keep it here) and {cert} (give it to every machine as --tls-ca)")

    run_command(body)


@tls_app.command("issue")
def tls_issue(
    directory: Path = typer.Argument(..., help="The lab CA's directory (tsotsa tls init); NAME.key and NAME.crt "
                                               "are written there."),
    name: str = typer.Argument(..., help="The machine's name, used for the file names."),
    host: list[str] = typer.Option(..., "--host", help="A DNS name or IP address others reach the machine at; "
                                                        "repeat for each."),
) -> None:
    """Issue one machine's key and certificate, signed by the lab CA, valid as a server and as a client."""

    def body() -> None:
        from tsotsa.tls import issue

        key, cert = issue(directory, name, host)
        print(f"wrote {key} and {cert} for {', '.join(host)}; copy them with ca.crt to that machine: "
              f"--tls-cert {cert.name} --tls-key {key.name} --tls-ca ca.crt")

    run_command(body)


def main() -> None:
    """The `tsotsa` console script."""
    run_app(app, prog_name="tsotsa")
