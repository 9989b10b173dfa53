"""The coordinator's gRPC service: the model's identity, the swarm map, the checkpoint's tensors, and the
fine-tuning runs (launch, watch, list, stop, adapters).

Each call holds one of the server's worker threads for as long as it lasts, and a stream (Fetch, WatchRun,
UploadData) can last for minutes or the whole run. Streams therefore share at most MAX_STREAMS slots, fewer
than the server's workers (coordinator/server.py starts it with 16): a stream beyond them is refused at once
with RESOURCE_EXHAUSTED instead of taking the last workers, so GetModelInfo, which every joining machine
needs first, and the other short calls always find one free. Uploads themselves are coordinator/uploads.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from hivemind.utils import get_dht_time

from tsotsa.auth import admin_refusal
from tsotsa.checkpoint import BLOCKS_PREFIX, HEAD_PREFIXES, TOKENIZER_FILES, Checkpoint
from tsotsa.codec import DTYPE_NAMES, encode, tensor_bytes
from tsotsa.dht import SwarmDHT
from tsotsa.errors import TsotsaError
from tsotsa.training.aggregate import blocks_of
from tsotsa.training.export import read_adapter
from tsotsa.training.lora import LoraSettings, OptimizerSettings, lora_spec
from tsotsa.training.schedule import check_schedule
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.coordinator.reports import MAX_REASON
from tsotsa.coordinator.runs import RunManager
from tsotsa.coordinator.store import RunExists, RunRecord, StoreBusy
from tsotsa.coordinator.trainer import RunSpec
from tsotsa.coordinator.uploads import IDLE_TIMEOUT, IdleWatchdog, Upload, UploadRefused, UploadStore

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_STREAMS = 12  # concurrent Fetch, WatchRun and UploadData calls; the server has 4 workers more (server.py)
ALLOWED_PREFIXES = (BLOCKS_PREFIX, *HEAD_PREFIXES)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, checkpoint: Checkpoint, model_id: str, dht: SwarmDHT, runs: RunManager,
                 admin_token: str | None, max_streams: int = MAX_STREAMS, uploads: UploadStore | None = None,
                 upload_idle_timeout: float = IDLE_TIMEOUT) -> None:
        """`max_streams`: how many Fetch, WatchRun and UploadData calls run at once; it must stay below the
        server's worker threads, or streams can take every worker. `uploads`: where UploadData writes (default:
        the state directory's uploads/, emptied now); `upload_idle_timeout`: seconds an upload may go without
        a chunk before it is cancelled."""
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self.checkpoint, self.model_id, self.dht, self.runs = checkpoint, model_id, dht, runs
        self.admin_token = admin_token
        self.uploads = uploads or UploadStore(runs.state_dir / "uploads")
        self.upload_idle_timeout = upload_idle_timeout
        self.reports = runs.reports  # what clients report and what the runs' spot checks catch
        self.max_streams = max_streams
        self._stream_slots = threading.BoundedSemaphore(max_streams)
        self.config_json = (checkpoint.directory / "config.json").read_text()
        self.tokenizer_files = [name for name in TOKENIZER_FILES if (checkpoint.directory / name).is_file()]
        self.initial_peers = dht.visible_maddrs()
        dtypes = {dtype for dtype, _ in checkpoint.specs.values()}
        self.torch_dtype = ",".join(sorted(dtypes))

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(
            model_id=self.model_id,
            config_json=self.config_json,
            num_blocks=self.checkpoint.config.num_hidden_layers,
            dht_initial_peers=self.initial_peers,
            tokenizer_files=self.tokenizer_files,
            torch_dtype=self.torch_dtype,
            total_bytes=self.checkpoint.total_bytes,
            run_signing_key=self.runs.signer.public_key,
        )

    def SwarmStatus(self, request: pb.SwarmStatusRequest, context: grpc.ServicerContext) -> pb.SwarmMap:
        servers, rejected = self.dht.survey(self.model_id, self.checkpoint.config.num_hidden_layers)
        now = get_dht_time()
        peers = [
            pb.PeerRecord(
                peer_id=record.peer_id, address=record.address, start_block=record.start, end_block=record.end,
                state=record.state.value, throughput=record.throughput, device=record.device, dtype=record.dtype,
                quant=record.quant, expires_in=max(0.0, record.expires_at - now),
            )
            for record in sorted(servers.values(), key=lambda r: (r.start, r.end, r.peer_id))
        ]
        return pb.SwarmMap(model_id=self.model_id, num_blocks=self.checkpoint.config.num_hidden_layers, peers=peers,
                           rejected_records=rejected, reported=self.reports.listing())

    def ReportPeer(self, request: pb.PeerReport, context: grpc.ServicerContext) -> pb.PeerReportAck:
        if request.model_id != self.model_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this coordinator serves {self.model_id}, not {request.model_id[:80]!r}")
        peer_id = request.peer_id
        if not 0 < len(peer_id) <= 128 or not (peer_id.isascii() and peer_id.isalnum()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "peer_id must be a peer id (base58, at most 128 characters)")
        blocks = self.checkpoint.config.num_hidden_layers
        if not request.start_block < request.end_block <= blocks:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"blocks {request.start_block}:{request.end_block} are not a span of the model's {blocks}")
        reason = " ".join(request.reason.split())
        logger.warning("a client reports peer %s (blocks %d:%d): %s", request.peer_id, request.start_block,
                       request.end_block, reason[:MAX_REASON])
        self.reports.add(request.peer_id, f"blocks {request.start_block}:{request.end_block}: {reason}")
        return pb.PeerReportAck()

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        with self._stream_slot(context, "Fetch"):
            yield from self._fetch(request, context)

    def _fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        if request.model_id != self.model_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this coordinator serves model {self.model_id}, not {request.model_id[:80]!r}")
        bad = [p for p in request.tensor_prefixes if not p.startswith(ALLOWED_PREFIXES)]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"tensor prefixes not served: {[prefix[:80] for prefix in bad[:3]]}")
        unknown = [name for name in request.file_names if name not in self.tokenizer_files]
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"files not served: {[name[:80] for name in unknown[:3]]}")
        for name in self.checkpoint.names_with_prefix(list(request.tensor_prefixes)):
            tensor = self.checkpoint.read([name])[name]
            yield from _chunks(name, tensor_bytes(tensor), is_file=False, dtype=DTYPE_NAMES[tensor.dtype],
                               shape=list(tensor.shape))
        for name in dict.fromkeys(request.file_names):  # once each, however often a request names it
            yield from _chunks(name, (self.checkpoint.directory / name).read_bytes(), is_file=True)


    # ------------------------------------------------------------------ runs

    def UploadData(self, request_iterator: Iterator[pb.DataChunk], context: grpc.ServicerContext) -> pb.DataUpload:
        """A data file in chunks, for a later CreateRun (coordinator/uploads.py has the protocol and its limits).
        A client that stops sending for `upload_idle_timeout` seconds is cancelled; a stream that ends any way
        but complete and checked leaves nothing on disk."""
        self._require_admin(context)
        with self._stream_slot(context, "UploadData"):
            watchdog = IdleWatchdog(self.upload_idle_timeout, context.cancel)
            try:
                return self.uploads.receive(_touching(request_iterator, watchdog))
            except UploadRefused as error:
                context.abort(error.code, str(error))
            except OSError as error:  # the state directory's disk
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if error.errno in (errno.ENOSPC, errno.EDQUOT) else \
                    grpc.StatusCode.INTERNAL
                context.abort(code, f"cannot write the upload into {self.uploads.directory}: "
                                    f"{error.strerror or error}")
            finally:
                watchdog.stop()
                if watchdog.fired:
                    logger.warning("a data upload sent nothing for %g s and was cancelled", self.upload_idle_timeout)

    def CreateRun(self, request: pb.CreateRunRequest, context: grpc.ServicerContext) -> pb.RunInfo:
        self._require_admin(context)
        claimed: dict[str, Upload] = {}  # the uploads this call uses: deleted if the run is created, else kept
        created = False
        try:
            fields = run_fields(request.config)
            longest = self.checkpoint.config.max_position_embeddings
            if fields["seq_len"] > longest:
                raise ValueError(f"seq_len {fields['seq_len']} exceeds the model's {longest} positions "
                                 "(max_position_embeddings)")
            train_name, train = self._data("train", request.train_name, request.train_data, request.train_upload,
                                           claimed)
            eval_name, eval_data = self._data("eval", request.eval_name, request.eval_data, request.eval_upload,
                                              claimed)
            record, train_examples, eval_examples = self.runs.create(request.name, fields, train_name, train,
                                                                     eval_name, eval_data)
            created = True
        except UploadRefused as error:
            context.abort(error.code, str(error))
        except RunExists as error:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(error))
        except StoreBusy as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except (TsotsaError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        finally:
            for upload_id in claimed:
                self.uploads.release(upload_id, used=created)
        info = self._run_info(record)
        info.train_examples, info.eval_examples = train_examples, eval_examples
        return info

    def _data(self, what: str, name: str, inline: bytes, upload_id: str, claimed: dict[str, Upload]
              ) -> tuple[str, bytes]:
        """(name, JSONL bytes) of the training or evaluation data: inline, or from the upload it names (which
        stays claimed, in `claimed`, until the call ends; one upload may serve as both)."""
        if not upload_id:
            return name, inline
        if inline:
            raise UploadRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"both {what}_data and {what}_upload are set: send the {what} data one way")
        upload = claimed.get(upload_id)
        if upload is None:
            upload = claimed[upload_id] = self.uploads.claim(upload_id)
        try:
            return name or upload.name, upload.path.read_bytes()
        except OSError as error:
            raise UploadRefused(grpc.StatusCode.NOT_FOUND, f"data upload {upload_id} ({upload.name}) cannot be "
                                                           f"read: {error.strerror or error}") from None

    def StopRun(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunInfo:
        self._require_admin(context)
        return self._run_info(self._known_run(request.name, context, self.runs.stop))

    def GetRun(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunInfo:
        return self._run_info(self._known_run(request.name, context, self.runs.get))

    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.RunList:
        return pb.RunList(runs=[self._run_info(record) for record in self.runs.store.list_runs()])

    def WatchRun(self, request: pb.RunRequest, context: grpc.ServicerContext) -> Iterator[pb.RunEvent]:
        with self._stream_slot(context, "WatchRun"):
            self._known_run(request.name, context, self.runs.get)
            # A watcher that hangs up frees its slot within a second, even while the run emits nothing.
            for event in self.runs.watch(request.name, context.is_active):
                if not context.is_active():
                    return
                yield event

    def GetAdapter(self, request: pb.AdapterRequest, context: grpc.ServicerContext) -> pb.AdapterTensors:
        """The run's latest aggregated adapter for blocks [start, end) (all blocks when end is 0)."""
        self._known_run(request.run, context, self.runs.get)
        checkpoint = self.runs.store.last_checkpoint(request.run)
        if not checkpoint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"run {request.run[:80]!r} has no completed round yet")
        tensors, lora = read_adapter(Path(checkpoint))
        end = request.end_block or self.checkpoint.config.num_hidden_layers
        return pb.AdapterTensors(run=request.run, lora=lora_spec(lora), tensors=[
            pb.NamedTensor(name=key, tensor=encode(tensor))
            for key, tensor in sorted(blocks_of(tensors, request.start_block, end).items())])

    @contextmanager
    def _stream_slot(self, context: grpc.ServicerContext, what: str) -> Iterator[None]:
        """One of the MAX_STREAMS slots for the body of a streaming call, or RESOURCE_EXHAUSTED when all
        are taken; the slot is given back however the stream ends (finished, refused, cancelled)."""
        if not self._stream_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the coordinator already serves {self.max_streams} streams (Fetch, WatchRun, "
                          f"UploadData), its limit; {what} was refused: try again when one ends")
        try:
            yield
        finally:
            self._stream_slots.release()

    def _require_admin(self, context: grpc.ServicerContext) -> None:
        refusal = admin_refusal(self.admin_token, context)
        if refusal is not None:
            context.abort(*refusal)

    def _known_run(self, name: str, context: grpc.ServicerContext, action) -> RunRecord:
        try:
            return action(name)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no run named {name[:80]!r}")

    def _run_info(self, record: RunRecord) -> pb.RunInfo:
        store = self.runs.store
        rounds = [
            pb.RoundInfo(
                round=r.round, state=r.state, train_loss=_or_nan(r.train_loss), eval_loss=_or_nan(r.eval_loss),
                samples=r.samples, tokens=r.tokens, tokens_per_s=_or_nan(r.tokens_per_s), checkpoint=r.checkpoint or "",
                wire_bytes=r.wire_bytes,
                peers=[f"{p.peer_id} {p.start}:{p.end} {p.samples}" for p in store.participants(record.name, r.round)],
            )
            for r in store.rounds(record.name)
        ]
        return pb.RunInfo(name=record.name, state=record.state, message=record.message,
                          config_json=json.dumps(record.config), rounds_done=record.rounds_done, rounds=rounds)


def run_fields(config: pb.RunConfig) -> dict:
    """A RunSpec's settings from the request: zero means the default; anything out of range is a ValueError."""
    defaults = RunSpec(name="", train_file="", eval_file=None, out_dir="")
    fields = {name: getattr(config, name) or getattr(defaults, name)
              for name in ("rounds", "steps_per_round", "micro_batch", "grad_accum", "seq_len")}
    too_small = [name for name, value in fields.items() if value < 1]
    if too_small:
        raise ValueError(f"{', '.join(too_small)} must be at least 1")
    lora = LoraSettings(r=config.lora_r or defaults.lora.r, alpha=config.lora_alpha or defaults.lora.alpha,
                        dropout=config.lora_dropout, seed=config.seed,
                        target_modules=tuple(config.target_modules) or defaults.lora.target_modules)
    optimizer = OptimizerSettings(lr=config.lr or defaults.optimizer.lr, weight_decay=config.weight_decay)
    schedule = config.lr_schedule or defaults.lr_schedule
    check_schedule(schedule, config.warmup_steps, fields["rounds"] * fields["steps_per_round"])
    if not 0.0 <= config.verify_fraction <= 1.0:
        raise ValueError(f"verify_fraction must be in [0, 1], not {config.verify_fraction}")
    if config.verify_fraction and lora.dropout:
        raise ValueError("spot checks (verify_fraction) compare forward passes, which LoRA dropout makes differ: "
                         "use lora_dropout 0")
    return {**fields, "lora": lora, "optimizer": optimizer, "gradient_checkpointing": config.gradient_checkpointing,
            "lr_schedule": schedule, "warmup_steps": config.warmup_steps, "out_dir": config.out_dir or None,
            "verify_fraction": config.verify_fraction}


def _touching(chunks: Iterator[pb.DataChunk], watchdog: IdleWatchdog) -> Iterator[pb.DataChunk]:
    """The chunks as they come, each one telling the watchdog the client is still sending."""
    for chunk in chunks:
        watchdog.touch()
        yield chunk


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _chunks(name: str, data: bytes, *, is_file: bool, dtype: str = "", shape: list[int] | None = None
            ) -> Iterator[pb.FetchChunk]:
    digest = hashlib.sha256(data).hexdigest()
    for offset in range(0, max(len(data), 1), CHUNK_BYTES):
        first, last = offset == 0, offset + CHUNK_BYTES >= len(data)
        yield pb.FetchChunk(
            name=name, is_file=is_file, dtype=dtype if first else "", shape=(shape or []) if first else [],
            total_bytes=len(data), offset=offset, data=data[offset:offset + CHUNK_BYTES], sha256=digest if last else "",
        )
