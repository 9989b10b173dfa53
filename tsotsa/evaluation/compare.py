"""`tsotsa eval compare`: the same tasks and the same latency protocol over several variants of one model.

A variant is `KIND[+RUN]`: KIND is `transformers` (the whole checkpoint in one process, through lm-eval's
`hf` backend: the baseline), `fp32`, `bf16`, `int8` or `nf4` (peers this command starts on this machine,
each holding a span of blocks in that format), or `swarm` (the peers the given swarm already has); `+RUN`
applies fine-tuning run RUN's adapter (for `transformers`, the adapter exported in PEFT's format).

Variants of one KIND share their peers: they are started once, the base and every adapter evaluated on
them, then stopped before the next KIND starts, so that two formats never serve the same blocks at once.
Peers this command starts join the given coordinator (or one it starts itself on loopback), so they
need a coordinator whose swarm has no peers of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tsotsa.checkpoint import load_config
from tsotsa.errors import SwarmError, TsotsaError
from tsotsa.evaluation.latency import LatencyProtocol, describe_machine
from tsotsa.evaluation.run import EvalOptions
from tsotsa.spans import even_spans
from tsotsa.tls import TlsSettings

PEER_KINDS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8"),
              "nf4": ("float32", "nf4")}  # KIND -> the peers' --dtype, --quant
KINDS = ("transformers", *PEER_KINDS, "swarm")


@dataclass(frozen=True)
class Variant:
    kind: str
    adapter: str | None = None

    @property
    def name(self) -> str:
        return self.kind + (f"+{self.adapter}" if self.adapter else "")


def parse_variants(text: str, adapter: str | None = None) -> list[Variant]:
    """`KIND[+RUN],...`; with `adapter`, every variant also with that run's adapter (right after it)."""
    variants: list[Variant] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, run = item.partition("+")
        if kind not in KINDS:
            raise TsotsaError(f"unknown variant {item!r}: a variant is KIND or KIND+RUN, KIND one of "
                              f"{', '.join(KINDS)}")
        for variant in [Variant(kind, run or None)] + ([Variant(kind, adapter)] if adapter and not run else []):
            if variant in variants:
                raise TsotsaError(f"variant {variant.name} is listed twice")
            variants.append(variant)
    if not variants:
        raise TsotsaError("--variants names no variant")
    return variants


@dataclass
class CompareOptions:
    variants: list[Variant]
    tasks: EvalOptions
    output_dir: Path
    protocol: LatencyProtocol = field(default_factory=LatencyProtocol)
    model_dir: Path | None = None  # the checkpoint: peers read their blocks from it, `transformers` loads it
    coordinator: str | None = None  # the swarm's; None: one started on loopback for this comparison
    peers: int = 2  # peers per started KIND, the blocks split evenly
    threads: int = 1  # torch threads of each peer and of the transformers process
    device: str = "cpu"
    batch_size: int = 8
    token: str | None = None
    tls: TlsSettings | None = None

    def __post_init__(self) -> None:  # before anything starts
        kinds = {variant.kind for variant in self.variants}
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise TsotsaError(f"--model {self.model_dir} is not a checkpoint directory (no config.json)")
        if "transformers" in kinds and self.model_dir is None:
            raise TsotsaError("variant transformers loads the whole checkpoint in one process: give --model, its "
                              "directory")
        if self.coordinator is None:
            if self.model_dir is None:
                raise TsotsaError("give --model (a coordinator is started for it) or --coordinator")
            if "swarm" in kinds:
                raise TsotsaError("variant swarm compares the peers a swarm has: give --coordinator")
            adapters = sorted(variant.name for variant in self.variants if variant.adapter)
            if adapters:
                raise TsotsaError(f"{', '.join(adapters)}: an adapter is a run of a coordinator: give --coordinator, "
                                  "the coordinator that trained it")
        if "swarm" in kinds and kinds & set(PEER_KINDS):
            raise TsotsaError("variant swarm uses the swarm's own peers while "
                              f"{', '.join(sorted(kinds & set(PEER_KINDS)))} start their own: compare them apart")
        if self.peers < 1 or self.threads < 1 or self.batch_size < 1:
            raise TsotsaError("--peers, --threads and --batch-size must be at least 1")
        if self.model_dir is not None and kinds & set(PEER_KINDS):
            check_peers(self.peers, load_config(self.model_dir).num_hidden_layers)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise TsotsaError(f"--output-dir {self.output_dir} is a file")


def check_peers(peers: int, blocks: int) -> None:
    """Peers on even spans of `blocks` blocks: at most one per block."""
    if peers > blocks:
        raise TsotsaError(f"--peers {peers} is more than the model's {blocks} blocks")


def compare(options: CompareOptions, say: Callable[[str], None] = print) -> dict:
    """Evaluates every variant; returns the comparison (what `report.write_report` writes): per variant its
    lm-eval results and their `metrics` (`report.task_metrics`), latency, peers and memory."""
    from tsotsa.evaluation.report import task_metrics
    from tsotsa.evaluation.run import checked_tasks
    from tsotsa.local_swarm import LocalSwarm

    checked_tasks(options.tasks)  # an unknown task fails here, not after the first variant's peers started
    rows: list[dict] = []
    groups: dict[str, list[Variant]] = {}
    for variant in options.variants:
        groups.setdefault(variant.kind, []).append(variant)
    with tempfile.TemporaryDirectory(prefix="tsotsa-compare-") as scratch_dir:
        scratch = Path(scratch_dir)
        owned = LocalSwarm(options.model_dir, cache_dir=scratch / "peer-cache", threads=options.threads,
                           token=options.token, tls=options.tls)
        try:
            if options.coordinator is None and set(groups) != {"transformers"}:
                say("starting a coordinator for the comparison...")
                owned.start_coordinator()
            else:
                owned.coordinator_address = options.coordinator
            done = 0
            for kind, variants in groups.items():
                label = ", ".join(variant.name for variant in variants)
                numbers = f"{done + 1}" + (f"-{done + len(variants)}" if len(variants) > 1 else "")
                say(f"[{numbers}/{len(options.variants)}] {label}")
                if kind == "transformers":
                    say("one transformers process: lm-eval's hf backend, then the latency protocol")
                    rows += _transformers_rows(variants, options, scratch, owned.coordinator_address)
                else:
                    rows += _swarm_rows(kind, variants, options, owned, scratch, say)
                done += len(variants)
        finally:
            owned.stop()
    for row in rows:
        row["metrics"] = task_metrics(row["results"])
    return {"machine": {**describe_machine(), "threads_per_process": options.threads, "device": options.device},
            "protocol": {"latency": options.protocol.as_dict(), "tasks": options.tasks.tasks,
                         "limit": options.tasks.limit, "num_fewshot": options.tasks.num_fewshot,
                         "batch_size": options.batch_size, "peers_per_variant": options.peers},
            "variants": rows}


def _swarm_rows(kind: str, variants: list[Variant], options: CompareOptions, owned, scratch: Path,
                say: Callable[[str], None]) -> list[dict]:
    """Starts KIND's peers (unless KIND is `swarm`), evaluates each variant through them (one client for all),
    stops them."""
    from tsotsa.client.model import SwarmModel
    from tsotsa.coordinator_client import CoordinatorClient

    with CoordinatorClient(owned.coordinator_address, token=options.token, tls=options.tls) as client:
        num_blocks = client.model_info().num_blocks
        online = _online(client)
    started = []
    if kind != "swarm":
        if online:
            raise TsotsaError(f"the swarm at {owned.coordinator_address} has {len(online)} peers online: "
                              f"{kind} starts its own; give a coordinator without peers (or compare variant swarm)")
        dtype, quant = PEER_KINDS[kind]
        check_peers(options.peers, num_blocks)  # (the coordinator's model, when --model was not given)
        spans = even_spans(num_blocks, options.peers)
        runs = sorted({variant.adapter for variant in variants if variant.adapter})
        say(f"starting {len(spans)} {kind} peers (blocks {', '.join(spans)})"
            + (f" serving adapter {', '.join(runs)}" if runs else "") + "...")
        args = ["--dtype", dtype, "--quant", quant, "--device", options.device,
                *(["--adapters", ",".join(runs)] if runs else [])]
        try:
            started = owned.add_peers(spans, *args, local_model=options.model_dir is not None)
        except SwarmError as error:  # its message holds the peer's whole output: the user gets its reason
            raise TsotsaError(f"the {kind} peers did not start: {_reason(str(error))}") from None
    elif not online:
        raise TsotsaError(f"the swarm at {owned.coordinator_address} has no peer online to compare")
    try:
        with SwarmModel.from_coordinator(owned.coordinator_address, cache_dir=scratch / "client-cache",
                                         token=options.token, tls=options.tls) as model:
            return [_swarm_row(model, variant, options, owned.coordinator_address, started, say)
                    for variant in variants]
    finally:
        for peer in started:
            owned.stop_peer(peer)


def _online(client) -> list:
    """The swarm map's peers that serve now (a peer that just left may still be listed, draining)."""
    return [peer for peer in client.swarm_status().peers if peer.state == "online"]


def _reason(output: str) -> str:
    """The line of a failed peer's output that says why (its `error:` line), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
    return said.removeprefix("error:").strip()


def _swarm_row(model, variant: Variant, options: CompareOptions, coordinator: str, started: list,
               say: Callable[[str], None]) -> dict:
    """One variant through `model` (a client of the swarm): its tasks, its latency, its peers' account."""
    from tsotsa.evaluation.backend import SwarmLM
    from tsotsa.evaluation.latency import SwarmGenerator, measure, peak_rss
    from tsotsa.evaluation.run import evaluate

    say(f"{variant.name}: lm-eval tasks {', '.join(options.tasks.tasks)}, then the latency protocol")
    results = evaluate(SwarmLM(model=model, adapter=variant.adapter, batch_size=options.batch_size), options.tasks)
    latency = measure(SwarmGenerator(model, variant.adapter), model.tokenizer, options.protocol, variant.name)
    peers = _peer_infos(coordinator, options)
    by_address = {peer.address: peer for peer in started}
    for peer in peers:
        local = by_address.get(peer["address"])
        peak = peak_rss(local.process.pid) if local is not None else None
        peer["peak_rss_bytes"], peer["rss_measured"] = (peak, "peak") if peak else (peer["rss_bytes"], "current")
    return {"variant": variant.name, "kind": variant.kind, "adapter": variant.adapter, "backend": "swarm",
            "dtype": ", ".join(sorted({p["dtype"] for p in peers})),
            "quant": ", ".join(sorted({p["quant"] for p in peers})),
            "results": results["results"], "latency": latency, "peers": peers,
            "bytes_per_block": max((p["bytes_per_block"] for p in peers), default=None),
            "peak_rss_bytes": max((p["peak_rss_bytes"] or 0 for p in peers), default=None)}


def _peer_infos(coordinator: str, options: CompareOptions) -> list[dict]:
    """Each online peer's own account (Peer.Info) of its blocks, format and memory."""
    from tsotsa.coordinator_client import CoordinatorClient
    from tsotsa.rpc import open_channel
    from tsotsa.v1 import tsotsa_pb2 as pb
    from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

    with CoordinatorClient(coordinator, token=options.token, tls=options.tls) as client:
        records = _online(client)
    peers = []
    for record in records:
        with open_channel(record.address, options.token, options.tls) as channel:
            info = pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=30)
        blocks = max(info.end_block - info.start_block, 1)
        peers.append({"address": record.address, "peer_id": info.peer_id,
                      "blocks": f"{info.start_block}:{info.end_block}", "device": info.device, "dtype": info.dtype,
                      "quant": info.quant, "bytes_per_block": info.parameter_bytes_held // blocks,
                      "adapter_bytes": info.adapter_bytes_held, "adapters": list(info.adapters),
                      "rss_bytes": info.rss_bytes})
    return sorted(peers, key=lambda peer: int(peer["blocks"].split(":")[0]))


def _transformers_rows(variants: list[Variant], options: CompareOptions, scratch: Path, coordinator: str
                       ) -> list[dict]:
    """The `transformers` variants in one child process of their own (tsotsa.evaluation.single_process): the
    checkpoint loaded once, the base evaluated first, then each adapter on it."""
    ordered = sorted(variants, key=lambda variant: variant.adapter is not None)
    spec = {"model_dir": str(options.model_dir), "device": options.device, "dtype": "float32",
            "threads": options.threads, "batch_size": options.batch_size,
            "variants": [{"name": variant.name, "adapter_dir": _export_adapter(variant.adapter, coordinator, options,
                                                                               scratch) if variant.adapter else None}
                         for variant in ordered],
            "tasks": asdict(options.tasks), "protocol": options.protocol.as_dict()}
    spec_path, out_path = scratch / "transformers.spec.json", scratch / "transformers.out.json"
    spec_path.write_text(json.dumps(spec, default=str))  # (the include paths as strings)
    subprocess.run([sys.executable, "-m", "tsotsa.evaluation.single_process", str(spec_path), str(out_path)],
                   check=False)
    if not out_path.exists():
        raise TsotsaError("the transformers process ended without a result")
    result = json.loads(out_path.read_text())
    if "error" in result:
        raise TsotsaError(f"the transformers process failed: {result['error']}")
    peer = {"blocks": f"0:{result['num_blocks']}", "device": result["device"], "dtype": result["dtype"],
            "quant": "none", "bytes_per_block": result["bytes_per_block"], "peak_rss_bytes": result["peak_rss_bytes"],
            "rss_measured": "peak"}
    measured = {row["name"]: row for row in result["variants"]}
    return [{"variant": variant.name, "kind": variant.kind, "adapter": variant.adapter, "backend": "transformers",
             "dtype": result["dtype"], "quant": "none", "results": measured[variant.name]["results"],
             "latency": measured[variant.name]["latency"], "peers": [peer],
             "bytes_per_block": result["bytes_per_block"], "peak_rss_bytes": result["peak_rss_bytes"]}
            for variant in variants]


def _export_adapter(run: str, coordinator: str, options: CompareOptions, scratch: Path) -> str:
    """Run `run`'s adapter from the coordinator, in PEFT's own format (what `tsotsa-coordinator export` writes)."""
    from tsotsa.coordinator_client import CoordinatorClient
    from tsotsa.remote import fetch_adapter
    from tsotsa.training.export import write_adapter
    from tsotsa.training.lora import lora_from_spec

    with CoordinatorClient(coordinator, token=options.token, tls=options.tls) as client:
        spec, tensors = fetch_adapter(client, run)
    return str(write_adapter(scratch / f"adapter-{run}", tensors, lora_from_spec(spec), str(options.model_dir)))
