#!/usr/bin/env python3
"""`make demo`: a whole tsotsa swarm on this machine, end to end, in about a minute on a laptop CPU.

1. writes a small random-weight Llama checkpoint (6 blocks, hidden 256, 8 heads / 4 KV heads: GQA) in the
   real Hugging Face layout;
2. starts a coordinator and three peers on loopback as real processes, each with its own DHT node, with
   uneven spans (0:1, 1:4, 4:6); the last peer has no copy of the checkpoint and fetches its two blocks
   from the coordinator into a cache directory;
3. prints the swarm map with `tsotsa status`;
4. generates text through the swarm with `tsotsa generate`, streaming tokens as they come;
5. checks that the swarm's greedy tokens equal `transformers`' `LlamaForCausalLM.generate` on the same
   checkpoint (through the Python API, `SwarmModel`), and that the CLI printed exactly those tokens;
6. fine-tunes: `tsotsa-coordinator finetune` on a small dataset that ships with the project
   (deploy/data/colors.jsonl: "the color of snow is" -> " white"); the peers train LoRA adapters of their
   own blocks, the coordinator aggregates them each round; eval loss before and after, and generation
   with the new adapter (`tsotsa generate --adapter`) next to the base model's;
7. compares, with `tsotsa eval compare`: fp32 peers against NF4 peers, each with and without the new
   adapter, on the shipped lm-eval tasks the demo's data teaches (accuracy, latency, memory per block);
8. stops every process it started and prints a summary.

The weights are random, so the generated text is gibberish; what matters is that it is the *same*
gibberish a single-process `transformers` model produces.

    .venv/bin/python deploy/demo.py [--work-dir demo-out] [--prompt TEXT] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from tsotsa.console import quiet_libraries
from tsotsa.errors import TsotsaError
from tsotsa.local_swarm import LocalPeer, LocalSwarm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "The swarm pools ordinary lab machines"
MODEL = dict(layers=6, hidden=256, heads=8, kv_heads=4, vocab=512, seed=0)
LOCAL_SPANS = ["0:1", "1:4"]   # these peers read their blocks from the checkpoint directory
FETCHING_SPAN = "4:6"          # this one has no checkpoint: it fetches its blocks from the coordinator
ADMIN_TOKEN = "demo-admin"     # launching a fine-tuning run needs the coordinator's admin token
DATA = REPO / "deploy" / "data" / "colors.jsonl"
RUN = "demo-colors"
FINE_TUNE = dict(rounds=4, steps_per_round=16, micro_batch=8, lora_r=16, lora_alpha=32, lr="5e-3",
                 target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
PROBES = ["the color of snow is", "the color of banana is", "the color of grass is"]
COMPARE = dict(variants="fp32,nf4", tasks="tsotsa_colors,tsotsa_colors_gen", repeats="3", new_tokens="16")
STATS_LINE = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s, (\d+) hops\]")

# Piped into a file or `tee`, rich would wrap at 80 columns; the swarm map needs more.
WIDE = None if sys.stdout.isatty() else 120
console = Console(highlight=False, width=WIDE)


def step(number: int, title: str) -> None:
    console.print()
    console.rule(f"[bold cyan]{number}. {title}", align="left")


def tsotsa_command(*args: str, program: str = "tsotsa") -> list[str]:
    """argv of a tsotsa CLI: the installed console script, or `python -m` where there is none."""
    script = Path(sys.executable).parent / program
    module = {"tsotsa": "tsotsa", "tsotsa-coordinator": "tsotsa.coordinator"}[program]
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", module, *args]


def show_command(args: list[str], program: str = "tsotsa") -> None:
    """Prints `$ PROGRAM ARGS`: what a user types for the same thing."""
    console.print(f"[bold green]$[/] [bold]{shlex.join([program, *args])}[/]", soft_wrap=True)


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def start_peers(swarm: LocalSwarm) -> list[LocalPeer]:
    """Starts the local-checkpoint peers and the fetching peer at the same time; waits for all three."""
    processes = [swarm.start_peer(span) for span in LOCAL_SPANS]
    processes.append(swarm.start_peer(FETCHING_SPAN, local_model=False))
    peers = swarm.wait_for_peers(processes)
    for peer in peers:
        fetched = f"{peer.start}:{peer.end}" == FETCHING_SPAN
        console.print(f"[green]✓[/] peer serving blocks {peer.start}:{peer.end} at {peer.address}"
                      + (" (fetched its blocks from the coordinator)" if fetched else ""))
    return peers


def peer_infos(peers: list[LocalPeer]) -> dict[str, object]:
    """Each peer's own account of what it read and holds (the Peer.Info RPC)."""
    import grpc

    from tsotsa.v1 import tsotsa_pb2 as pb
    from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

    infos = {}
    for peer in peers:
        with grpc.insecure_channel(peer.address) as channel:
            infos[peer.peer_id] = pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10)
    return infos


def run_visible(args: list[str], env: dict[str, str], capture: bool = False, program: str = "tsotsa"
                ) -> tuple[int, str, str]:
    """Runs `PROGRAM ARGS` in the foreground, its stdout shown live (and returned when `capture`)."""
    show_command(args, program)
    argv = tsotsa_command(*args, program=program)
    sys.stdout.flush()
    if WIDE:
        env = {**env, "COLUMNS": str(WIDE)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, env=env)
    stderr_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    reader.start()
    out: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while capture:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            text = decoder.decode(chunk)
            out.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    return process.returncode, "".join(out), b"".join(stderr_chunks).decode("utf-8", "replace")


def swarm_eval_loss(model, examples, adapter: str | None) -> float:
    """Token-weighted mean loss over `examples` through the swarm, as the coordinator scores a round."""
    import torch

    from tsotsa.training.batches import collate
    from tsotsa.training.loss import summed_loss

    input_ids, mask, labels = collate(examples, model.config.pad_token_id or 0)
    with torch.inference_mode():
        total, count = summed_loss(model.forward(input_ids, mask, adapter=adapter), labels)
    return total / count


def fine_tune(address: str, env: dict[str, str], client_cache: Path) -> dict[str, object]:
    """Act 6: eval loss of the base model, a run from the CLI, eval loss after, generation with the adapter."""
    import json

    from tsotsa.client.model import SwarmModel
    from tsotsa.coordinator.data import load_examples

    with SwarmModel.from_coordinator(address, cache_dir=client_cache) as model:
        examples = load_examples(DATA, model.tokenizer, 64)
        before = swarm_eval_loss(model, examples, None)
    example = '{"prompt": "the color of snow is", "completion": " white"}'
    console.print(f"{len(examples)} examples in [bold]{DATA.relative_to(REPO)}[/], e.g. {example}; the loss is "
                  f"taken on the completion only. Eval loss of the base model: [bold]{before:.3f}[/]")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in FINE_TUNE.items()]
    rc, _, err = run_visible(["finetune", "--coordinator", address, "--data", str(DATA), "--eval-data", str(DATA),
                              "--name", RUN, *flags],
                             env, capture=True, program="tsotsa-coordinator")
    if rc != 0:
        raise TsotsaError(f"tsotsa-coordinator finetune failed ({rc}): {err.strip()}")
    shown = subprocess.run(tsotsa_command("run", RUN, "--coordinator", address, "--json", program="tsotsa-coordinator"),
                           capture_output=True, text=True, env=env)
    after = json.loads(shown.stdout.splitlines()[-1])["rounds"][-1]["eval_loss"]
    console.print(f"eval loss: base [bold]{before:.3f}[/] -> after {FINE_TUNE['rounds']} rounds [bold]{after:.3f}[/]")

    table = Table(title=f"greedy continuations: base model vs adapter {RUN!r} (tsotsa generate --adapter {RUN})")
    for column in ("prompt", "base model", f"with {RUN}"):
        table.add_column(column)
    with SwarmModel.from_coordinator(address, cache_dir=client_cache) as model:
        for prompt in PROBES:
            ids = model.tokenizer(prompt, return_tensors="pt").input_ids
            texts = [model.tokenizer.decode(model.generate(ids, max_new_tokens=5, adapter=adapter)[0, ids.shape[1]:],
                                            skip_special_tokens=True) for adapter in (None, RUN)]
            table.add_row(prompt, *texts)
    console.print(table)
    return {"eval_before": before, "eval_after": after, "learned": after < before}


def compare_variants(swarm: LocalSwarm, model_dir: Path, env: dict[str, str], out: Path) -> dict[str, object]:
    """Act 7: the demo's peers leave; `tsotsa eval compare` starts fp32, then NF4 peers of its own on the same
    coordinator and evaluates each with and without the adapter."""
    import json

    for peer in list(swarm.peers):
        swarm.stop_peer(peer)
    console.print("the demo's peers left; compare starts its own for each format, then stops them")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in COMPARE.items()]
    rc, _, err = run_visible(["eval", "compare", "--coordinator", swarm.coordinator_address, "--model", str(model_dir),
                              "--adapter", RUN, *flags, "--output-dir", str(out)], env, capture=True)
    if rc != 0:
        raise TsotsaError(f"tsotsa eval compare failed ({rc}): {err.strip().splitlines()[-1:] or ''}")
    rows = json.loads((out / "results.json").read_text())["variants"]
    accuracy = {row["variant"]: row["metrics"]["tsotsa_colors"]["acc"]["value"] for row in rows}
    return {"compare_dir": out, "accuracy": accuracy,
            "adapter_helps": all(accuracy[f"{kind}+{RUN}"] > accuracy[kind] for kind in COMPARE["variants"].split(","))}


def streamed_text(tokenizer, prompt: str, new_ids: list[int]) -> str:
    """Exactly what `tsotsa generate` writes to stdout for these new tokens (it decodes incrementally)."""
    shown, written = "", prompt
    for count in range(1, len(new_ids) + 1):
        text = tokenizer.decode(new_ids[:count], skip_special_tokens=True)
        written += text[len(shown):]
        shown = text
    return written + "\n"


def process_tree(pids: list[int]) -> list[psutil.Process]:
    """The processes and every descendant (DHT child, p2p daemon, torch's shm manager) of `pids`."""
    tree: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    return tree


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def still_running(processes: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Those of `processes` still alive after `timeout` (psutil tells a reused PID from the original)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    left = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.Error:
            continue
    return left


def interrupt(*_) -> None:
    raise KeyboardInterrupt


def mark(ok: bool) -> str:
    return "[bold green]✓ equal[/]" if ok else "[bold red]✗ DIFFERENT[/]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "demo-out",
                        help="where the checkpoint and caches go (default: demo-out/ in the repository)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, interrupt)  # `kill` of the demo cleans up like Ctrl-C does

    work = args.work_dir.resolve()
    model_dir, peer_cache, client_cache = work / "model", work / "peer-cache", work / "client-cache"
    began = psutil.Process().create_time()  # from the start of this process, imports included
    timings: dict[str, float] = {}
    tracked: list[psutil.Process] = []
    results: dict[str, object] = {}

    console.print(Panel(
        "[bold]tsotsa demo[/]: a coordinator and 3 peers on this machine serve a small Llama together. "
        "The weights are [bold]random[/], so the text is gibberish; the point is that the swarm produces "
        "exactly the tokens a single-process [bold]transformers[/] model produces on the same weights.",
        border_style="cyan"))

    # ------------------------------------------------------------------ 1. checkpoint
    step(1, "A demo checkpoint in the Hugging Face layout")
    with console.status("writing a random-weight Llama (config.json, safetensors, tokenizer)..."):
        from tsotsa.tiny_model import make_tiny_model

        for stale in (model_dir, peer_cache, client_cache):  # fresh every run, so the fetch below is real
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        make_tiny_model(model_dir, **MODEL)
        timings["checkpoint"] = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    console.print(f"{MODEL['layers']} blocks, hidden {MODEL['hidden']}, {MODEL['heads']} heads / "
                  f"{MODEL['kv_heads']} KV heads (grouped-query attention), vocabulary {MODEL['vocab']}, "
                  f"{human_bytes(size)} of float32 weights")
    console.print(f"[dim]{model_dir}[/]")

    env = {**os.environ, "TSOTSA_CACHE": str(client_cache), "TSOTSA_ADMIN_TOKEN": ADMIN_TOKEN}
    try:
        with LocalSwarm(model_dir, cache_dir=peer_cache, admin_token=ADMIN_TOKEN) as swarm:
            # ------------------------------------------------------------- 2. processes
            step(2, "A coordinator and 3 peers, each a real process with its own DHT node")
            with console.status("starting the coordinator (gRPC server + DHT bootstrap node)...") as status:
                t0 = time.perf_counter()
                address = swarm.start_coordinator()
                console.print(f"coordinator [bold]{address}[/]  model id [bold]{swarm.model_id}[/]")
                console.print(f"  DHT bootstrap: [dim]{' '.join(swarm.initial_peers)}[/]", soft_wrap=True)
                status.update(f"starting 3 peers: blocks {', '.join(LOCAL_SPANS)} from the checkpoint, "
                              f"blocks {FETCHING_SPAN} fetched from the coordinator...")
                peers = start_peers(swarm)
                timings["startup"] = time.perf_counter() - t0
            infos = peer_infos(peers)
            table = Table(title="peers (each reads only its own blocks' tensors)")
            for column in ("blocks", "address", "weights from", "tensor bytes read", "throughput"):
                table.add_column(column, justify="right" if column in ("tensor bytes read", "throughput") else "left",
                                 no_wrap=True)
            for peer in peers:
                info = infos[peer.peer_id]
                source = ("checkpoint dir" if f"{peer.start}:{peer.end}" in LOCAL_SPANS
                          else "[yellow]the coordinator[/]")
                table.add_row(f"{peer.start}:{peer.end}", peer.address, source,
                              f"{human_bytes(info.checkpoint_bytes_read)} of {human_bytes(info.checkpoint_bytes_total)}",
                              f"{info.throughput:.0f} tok/s")
            console.print(table)
            fetched = sorted(p.name for p in (peer_cache / swarm.model_id).glob("*.safetensors"))
            console.print(f"the fetching peer's cache [dim]{peer_cache / swarm.model_id}[/] holds "
                          f"{', '.join(fetched) or 'nothing'}: its blocks and nothing else of the model",
                          soft_wrap=True)

            # ------------------------------------------------------------- 3. swarm map
            step(3, "The swarm map, as the DHT records tell it")
            status_rc, _, status_err = run_visible(
                ["status", "--coordinator", address], env)
            if status_rc != 0:
                raise TsotsaError(f"tsotsa status failed ({status_rc}): {status_err.strip()}")

            # ------------------------------------------------------------- 4. generation
            step(4, "Generating through the swarm (greedy; tokens stream as they come)")
            t0 = time.perf_counter()
            gen_rc, cli_out, cli_err = run_visible(
                ["generate", "--coordinator", address, args.prompt,
                 "--max-new-tokens", str(args.max_new_tokens)], env, capture=True)
            timings["generate"] = time.perf_counter() - t0
            console.print()
            if gen_rc != 0:
                raise TsotsaError(f"tsotsa generate failed ({gen_rc}): {cli_err.strip()}")
            stats = STATS_LINE.search(cli_err)
            if stats:
                console.print(f"[dim]{stats.group(0)}[/]")
                results["cli_tokens_per_s"] = float(stats.group(2))
                results["hops"] = int(stats.group(3))
            console.print("[dim](random weights: gibberish is expected)[/]")

            # ------------------------------------------------------------- 5. oracle
            step(5, "Checking the swarm against single-process transformers")
            with console.status("greedy generation through the swarm (SwarmModel) and in one process "
                                "(LlamaForCausalLM)..."):
                import torch
                from transformers import LlamaForCausalLM

                from tsotsa.client.model import SwarmModel

                t0 = time.perf_counter()
                with SwarmModel.from_coordinator(address, cache_dir=client_cache) as model:
                    tokenizer = model.tokenizer
                    prompt = tokenizer(args.prompt, return_tensors="pt")
                    swarm_ids = model.generate(prompt.input_ids, prompt.attention_mask,
                                               max_new_tokens=args.max_new_tokens)
                reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                with torch.inference_mode():
                    hf_ids = reference.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
                timings["check"] = time.perf_counter() - t0
            console.print(Panel(
                "[bold]Python API[/] (what the check above ran):\n"
                "  from tsotsa.client.model import SwarmModel\n"
                f"  with SwarmModel.from_coordinator(\"{address}\") as model:\n"
                "      ids = model.tokenizer(prompt, return_tensors=\"pt\").input_ids\n"
                f"      out = model.generate(ids, max_new_tokens={args.max_new_tokens})", border_style="dim"))
            prompt_length = prompt.input_ids.shape[1]
            swarm_new = swarm_ids[0, prompt_length:].tolist()
            hf_new = hf_ids[0, prompt_length:].tolist()
            tokens_equal = swarm_ids.shape == hf_ids.shape and bool(torch.equal(swarm_ids, hf_ids))
            cli_equal = cli_out == streamed_text(tokenizer, args.prompt, hf_new)
            results.update(tokens_equal=tokens_equal, cli_equal=cli_equal, new_tokens=len(hf_new))
            check = Table(show_header=True)
            check.add_column("")
            check.add_column("new token ids")
            check.add_row("transformers LlamaForCausalLM.generate", str(hf_new))
            check.add_row("swarm (SwarmModel.generate)", str(swarm_new))
            console.print(check)
            console.print(f"swarm tokens vs transformers tokens: {mark(tokens_equal)} "
                          f"({len(hf_new)} greedy tokens after a {prompt_length}-token prompt)")
            console.print(f"text printed by `tsotsa generate` vs those tokens decoded: {mark(cli_equal)}")

            # ------------------------------------------------------------- 6. fine-tuning
            step(6, "Fine-tuning: peers train LoRA adapters of their own blocks, the coordinator aggregates")
            t0 = time.perf_counter()
            results.update(fine_tune(address, env, client_cache))
            timings["fine-tune"] = time.perf_counter() - t0

            # ------------------------------------------------------------- 7. comparison
            step(7, "Comparing formats and the adapter with lm-eval: fp32 vs NF4 peers, with and without it")
            t0 = time.perf_counter()
            results.update(compare_variants(swarm, model_dir, env, work / "compare"))
            timings["compare"] = time.perf_counter() - t0

            # ------------------------------------------------------------- 8. shutdown
            step(8, "Stopping every process")
            with console.status("peers drain (leave the DHT) and exit, then the coordinator..."):
                t0 = time.perf_counter()
                tracked = process_tree([swarm.coordinator.pid, *(peer.process.pid for peer in swarm.peers)])
                swarm.stop()
                timings["shutdown"] = time.perf_counter() - t0
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: every process of the swarm has been stopped[/]")
        return 130
    except TsotsaError as error:
        console.print(f"[bold red]demo failed:[/] {error}")
        return 1

    # torch starts a shared-memory manager for this process too; it ends with this process.
    tracked += [child for child in psutil.Process().children(recursive=True) if _name(child) != "torch_shm_manager"]
    left = still_running(tracked)
    for process in left:
        console.print(f"[red]still running: pid {process.pid} {' '.join(process.cmdline())}[/]", soft_wrap=True)
    console.print(f"{len(tracked)} processes of the swarm (servers, DHT children, p2p daemons, helpers): "
                  f"{'all stopped' if not left else f'{len(left)} still running'}")

    # ------------------------------------------------------------------- summary
    ok = (results.get("tokens_equal") and results.get("cli_equal") and results.get("learned")
          and results.get("adapter_helps") and not left)
    summary = Table(title="summary", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", f"{MODEL['layers']}-block random Llama (GQA), {swarm.model_id}")
    summary.add_row("swarm", f"coordinator + peers {', '.join(LOCAL_SPANS + [FETCHING_SPAN])} "
                             f"(the last fetched its blocks)")
    if "hops" in results:
        summary.add_row("generation", f"{results['new_tokens']} tokens over {results['hops']} hops, "
                                      f"{results['cli_tokens_per_s']:.1f} tok/s (CPU, loopback)")
    summary.add_row("oracle", "swarm == transformers" if results.get("tokens_equal") else "MISMATCH")
    if "eval_after" in results:
        summary.add_row("fine-tuning", f"eval loss {results['eval_before']:.3f} -> {results['eval_after']:.3f} "
                                       f"in {FINE_TUNE['rounds']} rounds ({RUN})")
    if "accuracy" in results:
        summary.add_row("comparison", ", ".join(f"{name} {value:.2f}" for name, value in results["accuracy"].items())
                        + f" (tsotsa_colors accuracy; tables and plots in {results['compare_dir']})")
    summary.add_row("time", f"{time.time() - began:.0f} s in all: " + ", ".join(
        f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    summary.add_row("result", "[bold green]OK[/]" if ok else "[bold red]FAILED[/]")
    console.print()
    console.print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before any process was started
        sys.exit(130)
