"""A fine-tuning run, driven by the coordinator: rounds of micro-batches through pipelines of peers.

Each round deals `steps_per_round` units of `grad_accum` micro-batches to the pipelines. A pipeline runs a
unit micro-batch by micro-batch: embed here, TrainForward through its peers, head and loss here,
TrainBackward back through them; then each of its peers steps its own optimizer. A pipeline that loses a
peer gives its unfinished unit back (its surviving peers forget the unit's gradients), so no sample is lost
and none is counted twice. At the round's end the replicas' adapters are gathered and aggregated exactly
(see tsotsa.training.aggregate), pushed to every replica, evaluated and exported in PEFT's format.

This module orchestrates (rounds, units, progress, aggregation, export, the store, events); the calls to
peers are coordinator/pipeline_client.py, the loss and the batches tsotsa.training.loss and .batches.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch
from safetensors.torch import save
from transformers import LlamaConfig

from tsotsa.client.swarm import Swarm
from tsotsa.errors import SwarmError
from tsotsa.head import ModelHead
from tsotsa.records import ServerRecord
from tsotsa.run_credentials import RunSigner
from tsotsa.training.aggregate import adapter_problem, aggregate, blocks_of
from tsotsa.training.batches import Example, collate, micro_batches
from tsotsa.training.export import initial_adapter, read_adapter, write_adapter, write_durably
from tsotsa.training.lora import LoraSettings, OptimizerSettings, lora_spec
from tsotsa.training.loss import causal_lm_loss, summed_loss
from tsotsa.training.schedule import learning_rate
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.coordinator.data import load_examples
from tsotsa.coordinator.progress import RoundProgress, UnitDone
from tsotsa.coordinator.spot_checks import LiarCaught, SpotChecks
from tsotsa.coordinator.pipeline_client import PipelineBroken, PipelineClient
from tsotsa.coordinator.pipelines import Pipeline, form_pipelines, uncovered_blocks
from tsotsa.coordinator.store import Participant, RunStore

logger = logging.getLogger(__name__)
WAIT_SECONDS = 2.0
# Pauses between the tries of writing a run's final state (each try waits out the store's own retries).
FINAL_STATE_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
# A checkpoint that cannot be written for lack of space is tried again this often, the run waiting meanwhile.
DISK_FULL_WAIT_SECONDS = 30.0
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class RunSpec:
    """A run's settings as stored in SQLite: everything a restarted coordinator needs to resume it."""

    name: str
    train_file: str
    eval_file: str | None
    out_dir: str
    rounds: int = 3
    steps_per_round: int = 10
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    gradient_checkpointing: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    verify_fraction: float = 0.0  # spot checks of pipeline peers' TrainForward (RunDriver._spot_check)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def step_lr(self, step: int) -> float:
        return learning_rate(step, self.optimizer.lr, self.lr_schedule, self.warmup_steps, self.total_steps)

    def to_dict(self) -> dict:
        return {**asdict(self), "lora": self.lora.to_dict(), "optimizer": asdict(self.optimizer)}

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        optimizer = dict(data["optimizer"], betas=tuple(data["optimizer"]["betas"]))
        return cls(**{**data, "lora": LoraSettings.from_dict(data["lora"]),
                      "optimizer": OptimizerSettings(**optimizer)})



@dataclass
class BaseModel:
    """What the coordinator holds of the model for training: its config, ends and tokenizer."""

    model_id: str
    config: LlamaConfig
    head: ModelHead
    tokenizer: object
    directory: Path


class RunStopped(Exception):
    pass


class PipelineVoided(Exception):
    """A spot check found that a liar took part in this pipeline's work: its unit goes back."""


class RunDriver:
    """Runs one run from its first unfinished round to the end; `stop` ends it between units."""

    def __init__(self, spec: RunSpec, store: RunStore, base: BaseModel, swarm: Swarm,
                 emit: Callable[[pb.RunEvent], None], data: tuple[list[Example], list[Example]] | None = None,
                 *, signer: RunSigner, on_liar: Callable[[str, str], None] | None = None) -> None:
        """`data`: the training and eval examples when the caller has them already (a new run, checked at
        creation); a resumed run reads them back from its files. `signer` signs the run credential of every
        training call to a peer; `on_liar(peer_id, reason)` hears of every peer a spot check catches."""
        self.spec, self.store, self.base, self.swarm, self.emit = spec, store, base, swarm, emit
        self.stop_requested = threading.Event()
        self._data = data
        self.examples: list[Example] = []
        self.eval_examples: list[Example] = []
        self.adapter: dict[str, torch.Tensor] = {}
        self._holds: dict[str, int] = {}  # peer id -> version of the adapter it holds (rounds done)
        self._lock = threading.Lock()
        self._leaving = False  # stopping because the coordinator shuts down: the run resumes after restart
        self._thread: threading.Thread | None = None
        # The state the store has not taken yet (see _finish and _set_state), as (state, message); else None.
        self.unsaved_state: tuple[str, str] | None = None
        self.peers = PipelineClient(swarm, spec.name, base.model_id, base.head.dtype, signer)
        self.checks = SpotChecks(self.peers, swarm, lora_spec(spec.lora, spec.optimizer, spec.gradient_checkpointing),
                                 spec.verify_fraction)
        self.liars: set[str] = set()  # peers a spot check caught: left out of this run for good
        self._on_liar = on_liar

    # ------------------------------------------------------------------- run

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"run-{self.spec.name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, *, leaving: bool = False) -> None:
        """Ends the run between units; `leaving`: only this coordinator goes away, the run stays unfinished."""
        self._leaving = leaving
        self.stop_requested.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The thread's body: every round, then the run's final state, which is recorded whatever happened."""
        name = self.spec.name
        try:
            self.examples, self.eval_examples = self._data or self._read_data()
            done = self.store.get_run(name).rounds_done
            last = self.store.last_checkpoint(name)
            self.adapter = (read_adapter(Path(last))[0] if done and last
                            else initial_adapter(self.base.config, self.spec.lora))
            for round_index in range(done, self.spec.rounds):
                self._set_state("running", f"round {round_index + 1}/{self.spec.rounds}")
                self._round(round_index)
            self._close_on_peers()
            outcome = ("finished", f"{self.spec.rounds} rounds done")
        except RunStopped:
            if self._leaving:
                return
            try:
                self._close_on_peers()
            except Exception:  # closing is a courtesy to peers; the run is stopped all the same
                logger.exception("run %s: cannot close it on its peers", name)
            outcome = ("stopped", "stopped by request")
        except Exception as error:  # the run fails; the coordinator goes on serving
            logger.exception("run %s failed", name)
            outcome = ("failed", str(error) or type(error).__name__)
        self._finish(*outcome)

    def _finish(self, state: str, message: str) -> None:
        """Records the run's final state. Watchers get it at once; the store gets it as soon as it takes
        writes again (another process may hold its lock, the disk may be full): the write is tried
        len(FINAL_STATE_PAUSES) + 1 times in all, and until it succeeds `unsaved_state` holds it, which is what
        GetRun reports. Should every try fail, the store keeps the run unfinished, so a restarted
        coordinator resumes it from its last completed round rather than losing it."""
        self.unsaved_state = (state, message)
        self.emit(pb.RunEvent(kind="state", state=state, message=message))
        for attempt, pause in enumerate((*FINAL_STATE_PAUSES, None)):
            try:
                self.store.set_state(self.spec.name, state, message)
            except Exception as error:
                if pause is None:
                    logger.error("run %s is %s, but the store did not take it in %d tries (%s); it stays "
                                 "unfinished there", self.spec.name, state, attempt + 1, error)
                    return
                logger.warning("run %s: cannot record its state %r (%s); trying again in %g s", self.spec.name,
                               state, error, pause)
                time.sleep(pause)
            else:
                self.unsaved_state = None
                return

    def _read_data(self) -> tuple[list[Example], list[Example]]:
        spec, tokenizer = self.spec, self.base.tokenizer
        train = load_examples(Path(spec.train_file), tokenizer, spec.seq_len)
        return train, load_examples(Path(spec.eval_file), tokenizer, spec.seq_len) if spec.eval_file else []

    def _round(self, index: int) -> None:
        spec = self.spec
        self.store.start_round(spec.name, index)
        first = index * spec.steps_per_round * spec.grad_accum
        units = deque(list(range(first + k * spec.grad_accum, first + (k + 1) * spec.grad_accum))
                      for k in range(spec.steps_per_round))
        progress = RoundProgress()
        while units:
            pipelines = self._pipelines(exclude=progress.broken | self.liars)
            self._prepare(pipelines, index)
            progress.tainted.clear()  # prepared again: they hold the round's adapter
            workers = [threading.Thread(target=self._work, args=(pipeline, units, progress, index), daemon=True)
                       for pipeline in pipelines]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            self._check_stop()
        elapsed = time.perf_counter() - progress.began
        replicas = self._gather(progress)
        self.adapter = aggregate(self.adapter, [(state, samples) for _, state, samples in replicas])
        checkpoint = self.export_round(index, replicas)
        self._push_everywhere(progress, index + 1)
        eval_loss = self._evaluate(index + 1)
        train_loss = sum(progress.losses) / len(progress.losses)
        tokens_per_s = progress.tokens / elapsed if elapsed > 0 else None
        self.store.finish_round(
            spec.name, index, train_loss=train_loss, eval_loss=eval_loss, samples=progress.samples,
            tokens=progress.tokens, tokens_per_s=tokens_per_s, checkpoint=str(checkpoint),
            wire_bytes=progress.wire_bytes,
            participants=[Participant(peer.peer_id, peer.address, peer.start, peer.end, samples)
                          for peer, _, samples in replicas],
        )
        self.emit(pb.RunEvent(kind="round", round=index, steps_done=spec.steps_per_round,
                              steps_total=spec.steps_per_round, loss=train_loss, tokens_per_s=tokens_per_s or 0.0,
                              eval_loss=math.nan if eval_loss is None else eval_loss, samples=progress.samples,
                              peers=[peer.peer_id for peer, _, _ in replicas], checkpoint=str(checkpoint)))

    # ------------------------------------------------------------- pipelines

    def _pipelines(self, exclude: set[str] = frozenset()) -> list[Pipeline]:
        """The pipelines the swarm allows now; while none can form, the run waits and says why."""
        waiting = False
        while True:
            self._check_stop()
            servers = [server for server in self.swarm.servers() if server.peer_id not in exclude]
            pipelines = form_pipelines(servers, self.base.config.num_hidden_layers)
            if pipelines:
                if waiting:
                    self._set_state("running", "pipelines formed again")
                return pipelines
            missing = uncovered_blocks(servers, self.base.config.num_hidden_layers)
            reason = (f"no peer serves blocks {_ranges(missing)}" if missing
                      else "the online peers' spans do not chain into a full pipeline")
            if not waiting:
                self._set_state("waiting", f"waiting: {reason}")
                waiting = True
            self.stop_requested.wait(WAIT_SECONDS)

    def _prepare(self, pipelines: list[Pipeline], version: int) -> None:
        """Opens the run on every pipeline peer and gives those that lack it the latest adapter (newcomers,
        peers of an interrupted round, every peer after a coordinator restart)."""
        for peer in (peer for pipeline in pipelines for peer in pipeline):
            if self._holds.get(peer.peer_id) == version:
                continue
            try:
                self._push(peer, version)
            except grpc.RpcError as error:
                logger.warning("cannot prepare %s: %s", peer.address, error)

    def _push(self, peer: ServerRecord, version: int) -> None:
        spec = self.spec
        self.peers.open(peer, lora_spec(spec.lora, spec.optimizer, spec.gradient_checkpointing),
                        blocks_of(self.adapter, peer.start, peer.end))
        with self._lock:
            self._holds[peer.peer_id] = version

    def _work(self, pipeline: Pipeline, units: deque, progress: RoundProgress, index: int) -> None:
        """Takes units until none is left or the pipeline breaks (its unit goes back for others)."""
        while not self.stop_requested.is_set():
            with self._lock:
                if not units:
                    return
                unit = units.popleft()
            try:
                self._train_unit(pipeline, unit, units, progress, index)
            except PipelineBroken as error:
                logger.warning("pipeline broke: %s; unit %s goes back", error, unit)
                with self._lock:
                    units.appendleft(unit)
                    progress.broken.add(error.peer.peer_id)
                self.peers.discard(pipeline, error.peer)
                return
            except PipelineVoided:
                with self._lock:
                    units.appendleft(unit)
                self.peers.discard(pipeline, None)
                return

    def _train_unit(self, pipeline: Pipeline, unit: list[int], units: deque, progress: RoundProgress,
                    index: int) -> None:
        spec = self.spec
        losses, tokens, wire = [], 0, 0
        for micro_batch in unit:
            examples = micro_batches(self.examples, spec.micro_batch, spec.lora.seed, micro_batch, 1)[0]
            input_ids, mask, labels = collate(examples, self.base.config.pad_token_id or 0)
            tag = f"{index}.{micro_batch}"
            with torch.no_grad():
                hidden = self.base.head.embed(input_ids)
            trace = [] if spec.verify_fraction else None
            hidden, sent = self.peers.train_forward(pipeline, tag, hidden, mask, trace)
            if trace:
                self._spot_check(pipeline, trace, mask, units, progress)
            hidden = hidden.detach().requires_grad_(True)
            loss = causal_lm_loss(self.base.head.logits(hidden), labels)
            (loss / spec.grad_accum).backward()
            wire += sent + self.peers.train_backward(pipeline, tag, hidden.grad)
            losses.append(loss.item())
            tokens += int(mask.sum())
        samples = len(unit) * spec.micro_batch
        lr = spec.step_lr(unit[0] // spec.grad_accum)  # unit k of the run is its optimizer step k
        self.peers.step(pipeline, samples, lr)
        with self._lock:
            if any(peer.peer_id in self.liars or peer.peer_id in progress.tainted for peer in pipeline):
                raise PipelineVoided()  # a check elsewhere voided this pipeline's work meanwhile
            progress.done.append(UnitDone(unit, tuple(pipeline), samples, tokens, wire, losses))
            done, rate = progress.units_done, progress.tokens / max(time.perf_counter() - progress.began, 1e-9)
        self.emit(pb.RunEvent(kind="step", round=index, steps_done=done, steps_total=spec.steps_per_round,
                              loss=sum(losses) / len(losses), peers=[peer.peer_id for peer in pipeline],
                              tokens_per_s=rate))

    def _spot_check(self, pipeline: Pipeline, trace: list, mask: torch.Tensor, units: deque,
                    progress: RoundProgress) -> None:
        """Spot checks of this micro-batch's answers (`coordinator/spot_checks.py`). A liar is left out of the
        run; the units it and the peers it worked with did this round are dealt again, and those peers start
        again from the round's adapter (PipelineVoided when this pipeline is among them)."""
        try:
            self.checks.check(trace, mask, excluded=progress.broken | self.liars)
        except LiarCaught as caught:
            with self._lock:
                self.liars |= {liar.peer_id for liar in caught.liars}
                tainted, voided = progress.void(self.liars)
                units.extend(voided)
                for peer_id in tainted:
                    self._holds.pop(peer_id, None)  # pushed the round's adapter again before it trains on
            logger.warning("run %s: %s; %d units of this round are dealt again", self.spec.name, caught.reason,
                           len(voided))
            if self._on_liar is not None:
                for liar in caught.liars:
                    self._on_liar(liar.peer_id, f"blocks {liar.start}:{liar.end}: run {self.spec.name}: "
                                                f"{caught.reason}")
            self._set_state("running", f"{caught.reason}: left out of the run", best_effort=True)
            if any(peer.peer_id in tainted or peer.peer_id in self.liars for peer in pipeline):
                raise PipelineVoided() from None

    # ------------------------------------------------------- end of a round

    def _gather(self, progress: RoundProgress) -> list[tuple[ServerRecord, dict[str, torch.Tensor], int]]:
        """Every surviving replica's adapter, weighted by the samples this coordinator dealt it this round
        (never a count the peer reports); an adapter of the wrong shape or not finite is left out."""
        replicas = []
        for peer, state in self.peers.gather(progress.trained.values()):
            problem = adapter_problem(self.adapter, state)
            if problem:
                logger.warning("run %s: the adapter of peer %s (%s) is left out of the round: %s", self.spec.name,
                               peer.peer_id, peer.address, problem)
                continue
            replicas.append((peer, state, progress.dealt.get(peer.peer_id, 0)))
        if not replicas:
            raise SwarmError("every peer that trained this round is gone (or sent an adapter that cannot be used)")
        return replicas

    def export_round(self, index: int, replicas: list[tuple[ServerRecord, dict[str, torch.Tensor], int]]) -> Path:
        """Writes round `index`'s aggregated adapter (and, in `replicas/`, what each replica sent) as one
        directory that appears whole or not at all (tsotsa.training.export.write_adapter), so the previous
        round's stays what a resume reads whatever happens here. When the disk is full the run waits, saying
        so, and tries again every DISK_FULL_WAIT_SECONDS until the write succeeds or the run is stopped; a
        coordinator restarted meanwhile resumes the run at this round, from the previous round's adapter."""
        out = Path(self.spec.out_dir) / f"round-{index:03d}"
        waiting = False
        while True:
            try:
                write_adapter(out, self.adapter, self.spec.lora, str(self.base.directory),
                              extra=lambda staging: _write_replicas(staging / "replicas", replicas))
            except OSError as error:
                if error.errno not in DISK_FULL_ERRNOS:
                    raise
                if not waiting:
                    self._set_state("waiting", f"waiting: cannot write the round {index + 1} adapter to {out}: "
                                               f"{error.strerror or error}; trying again every "
                                               f"{DISK_FULL_WAIT_SECONDS:g} s", best_effort=True)
                    waiting = True
                self.stop_requested.wait(DISK_FULL_WAIT_SECONDS)
                self._check_stop()
                continue
            if waiting:
                self._set_state("running", f"round {index + 1}/{self.spec.rounds}: its adapter is written",
                                best_effort=True)
            return out

    def _push_everywhere(self, progress: RoundProgress, version: int) -> None:
        for peer in progress.trained.values():
            try:
                self._push(peer, version)
            except grpc.RpcError:
                self._holds.pop(peer.peer_id, None)

    def _evaluate(self, version: int) -> float | None:
        """Token-weighted mean loss over the eval set, through the swarm with the aggregated adapter."""
        if not self.eval_examples:
            return None
        broken: set[str] = set()
        while True:
            pipeline = self._pipelines(exclude=broken | self.liars)[0]
            self._prepare([pipeline], version)
            try:
                return self._evaluate_on(pipeline)
            except PipelineBroken as error:
                logger.warning("evaluation moves to another pipeline: %s", error)
                broken.add(error.peer.peer_id)

    def _evaluate_on(self, pipeline: Pipeline) -> float:
        total, count = 0.0, 0
        size = self.spec.micro_batch
        for first in range(0, len(self.eval_examples), size):
            input_ids, mask, labels = collate(self.eval_examples[first:first + size], self.base.config.pad_token_id or 0)
            with torch.no_grad():
                hidden = self.peers.forward(pipeline, self.base.head.embed(input_ids), mask)
                loss_sum, tokens = summed_loss(self.base.head.logits(hidden), labels)
                total, count = total + loss_sum, count + tokens
        return total / count

    def _close_on_peers(self) -> None:
        self.peers.close(self.swarm.servers())

    # ---------------------------------------------------------------- helpers

    def _check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise RunStopped()

    def _set_state(self, state: str, message: str, *, best_effort: bool = False) -> None:
        """Records and announces where the run stands. A store that refuses the write raises, unless
        `best_effort` (the run goes on whatever the store says: e.g. it waits for disk space, and the
        database may be on that disk), in which case `unsaved_state` holds it for GetRun."""
        try:
            self.store.set_state(self.spec.name, state, message)
            self.unsaved_state = None
        except Exception as error:
            if not best_effort:
                raise
            logger.warning("run %s: cannot record its state %r (%s)", self.spec.name, state, error)
            self.unsaved_state = (state, message)
        self.emit(pb.RunEvent(kind="state", state=state, message=message))


def _write_replicas(directory: Path,
                    replicas: list[tuple[ServerRecord, dict[str, torch.Tensor], int]]) -> None:
    """Each replica's adapter as it came from its peer, with its samples and blocks, for inspection."""
    directory.mkdir()
    for peer, state, samples in replicas:
        write_durably(directory / f"{peer.peer_id}.safetensors", save(
            {key: tensor.contiguous() for key, tensor in state.items()},
            metadata={"samples": str(samples), "blocks": f"{peer.start}:{peer.end}", "address": peer.address}))


def _ranges(blocks: list[int]) -> str:
    spans, start = [], None
    for i, block in enumerate(blocks):
        start = block if start is None else start
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            spans.append(f"{start}:{block + 1}")
            start = None
    return ", ".join(spans)
