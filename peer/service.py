"""The peer's gRPC service: Forward (stateless) and Inference (a stream holding a KV cache).

Every request is validated against the model config and this peer's span before it touches the blocks;
anything wrong is refused with a precise status code and the peer keeps serving. All computation runs on
one long-lived runtime thread (as in hivemind's and Petals' servers): concurrent sessions share the cores
instead of oversubscribing them, and on a GPU the thread keeps its CUDA and cuBLAS state warm, where gRPC's
pool would spread steps over many threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from tsotsa.codec import FLOAT_DTYPES, WireError, decode, encode
from tsotsa.spans import BlockSpan, position_ids_from_mask
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.peer.adapters import Adapters
from tsotsa.peer.errors import PeerError, refusals
from tsotsa.peer.sessions import Session, SessionTable
from tsotsa.peer.training import TrainingRun
from tsotsa.peer.training_rpcs import TrainingRpcs

logger = logging.getLogger(__name__)
INDEX_DTYPES = ("int64", "int32")
MASK_DTYPES = ("int64", "int32", "bool")
T = TypeVar("T")


@dataclass
class PeerLimits:
    max_sessions: int = 32
    max_cache_bytes: int = 2 << 30
    max_forward_tokens: int = 8192
    session_timeout: float = 300.0


class PeerService(TrainingRpcs, pb_grpc.PeerServicer):
    def __init__(self, span: BlockSpan, model_id: str, num_model_blocks: int, limits: PeerLimits,
                 info: Callable[[], pb.PeerInfo]) -> None:
        self.span, self.model_id, self.limits, self._info = span, model_id, limits, info
        self.num_model_blocks = num_model_blocks
        self.config = span.config
        self.sessions = SessionTable(limits.max_sessions, limits.max_cache_bytes, limits.session_timeout)
        self.accepting = True
        self.adapters = Adapters(span)
        self.runs: dict[str, TrainingRun] = {}
        self._runtime = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")

    # ------------------------------------------------------------------ RPCs

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PeerInfo:
        return self._info()

    @refusals("forward")
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        self._check_model_and_blocks(request.model_id, request.start_block, request.end_block)
        self._check_adapter(request.adapter)
        hidden = self._decode_hidden(request.hidden_states)
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_forward_tokens:
            raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{batch * length} tokens exceed this peer's limit of "
                            f"{self.limits.max_forward_tokens} per Forward")
        mask = self._decode_mask(request, batch, length)
        positions = self._decode_positions(request, batch, length, mask)
        output = self._compute(request.adapter, hidden, mask, positions, None, request.start_block, request.end_block)
        return pb.ForwardResponse(hidden_states=encode(output, hidden.dtype))

    def Inference(self, requests: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
                  ) -> Iterator[pb.InferenceResponse]:
        session: Session | None = None
        try:
            for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise PeerError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already has a session")
                    session = self._open(request.session_id, request.open)
                    yield pb.InferenceResponse(session_id=session.session_id, cache_length=0)
                elif kind == "step":
                    if session is None or request.session_id != session.session_id:
                        raise self.sessions.refusal(request.session_id)
                    self.sessions.touch(session)
                    output = self._step(session, request.step)
                    yield pb.InferenceResponse(session_id=session.session_id, hidden_states=output,
                                               cache_length=session.length)
                else:
                    raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "request has neither open nor step")
        except PeerError as error:
            context.abort(error.code, error.message)
        except grpc.RpcError:
            return  # the client cancelled or went away; its session is closed below
        except Exception as error:
            logger.exception("Inference failed")
            context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {error}")
        finally:
            if session is not None:
                self.sessions.close(session)

    # --------------------------------------------------------------- helpers

    def _on_runtime(self, work: Callable[[], T]) -> T:
        return self._runtime.submit(work).result()

    def _compute(self, adapter: str, hidden: torch.Tensor, *args) -> torch.Tensor:
        """Runs the span with `adapter` (empty: none) on the runtime thread; the output comes back on the CPU,
        in the input's dtype."""

        def run() -> torch.Tensor:
            self._check_adapter(adapter)  # again here: a session's adapter may have been removed since it opened
            self.adapters.activate(adapter or None)
            return self.span(hidden, *args).to("cpu", hidden.dtype)

        return self._on_runtime(run)

    def _check_adapter(self, name: str) -> None:
        if name and name not in self.adapters:
            raise PeerError(grpc.StatusCode.NOT_FOUND, f"adapter {name[:80]!r} is not loaded on this peer")

    def _open(self, session_id: str, request: pb.OpenSession) -> Session:
        if not self.accepting:
            raise PeerError(grpc.StatusCode.UNAVAILABLE, "peer is draining and takes no new sessions")
        self._check_model_and_blocks(request.model_id, request.start_block, request.end_block)
        self._check_adapter(request.adapter)
        if request.batch_size < 1:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be at least 1")
        limit = self.config.max_position_embeddings
        if not 1 <= request.max_length <= limit:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in 1..{limit}")
        blocks = request.end_block - request.start_block
        reserved = self.span.cache_bytes(request.batch_size, request.max_length, blocks)
        session = Session(
            session_id=session_id, start=request.start_block, end=request.end_block, batch_size=request.batch_size,
            max_length=request.max_length, reserved_bytes=reserved, cache=self.span.new_cache(),
            attention_mask=torch.zeros(request.batch_size, 0, dtype=torch.long), adapter=request.adapter,
        )
        self.sessions.open(session)
        return session

    def _step(self, session: Session, step: pb.InferenceStep) -> pb.Tensor:
        """One step of a session that `touch` just found open; nothing changes unless the step is valid."""
        cache = session.cache  # held here: if the session expires while waiting for the lock, this step still ends
        hidden = self._decode_hidden(step.hidden_states)
        batch, length = hidden.shape[:2]
        if batch != session.batch_size:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"hidden_states batch {batch} differs from the session's {session.batch_size}")
        if session.length + length > session.max_length:
            raise PeerError(grpc.StatusCode.OUT_OF_RANGE,
                            f"{session.length} + {length} tokens exceed the session's max_length {session.max_length}")
        new_mask = self._decode_mask(step, batch, length)
        mask = torch.cat([session.attention_mask, new_mask], dim=1)
        if step.HasField("position_ids"):
            positions = self._decode_positions(step, batch, length, new_mask)
        else:
            positions = position_ids_from_mask(mask)[:, -length:]
        output = self._compute(session.adapter, hidden, mask, positions, cache, session.start, session.end)
        session.attention_mask = mask
        return encode(output, hidden.dtype)

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"this peer serves model {self.model_id}, not {model_id!r}")

    def _check_model_and_blocks(self, model_id: str, start: int, end: int) -> None:
        self._check_model(model_id)
        num_blocks = self.num_model_blocks
        if not start < end:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"empty block range {start}:{end}")
        if end > num_blocks:
            raise PeerError(grpc.StatusCode.OUT_OF_RANGE, f"blocks {start}:{end} are outside the model's {num_blocks}")
        if start < self.span.span.start or end > self.span.span.end:
            raise PeerError(grpc.StatusCode.OUT_OF_RANGE,
                            f"blocks {start}:{end} are not served here (this peer serves {self.span.span})")

    def _decode_hidden(self, message: pb.Tensor) -> torch.Tensor:
        try:
            hidden = decode(message, what="hidden_states", ndim=3, last_dim=self.config.hidden_size,
                            allowed=FLOAT_DTYPES)
        except WireError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden_states shape {list(hidden.shape)} is empty")
        return hidden

    def _decode_mask(self, message, batch: int, length: int) -> torch.Tensor:
        if not message.HasField("attention_mask"):
            return torch.ones(batch, length, dtype=torch.long)
        mask = self._decode_index(message.attention_mask, "attention_mask", batch, length, MASK_DTYPES)
        if ((mask != 0) & (mask != 1)).any():
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "attention_mask must hold only 0 and 1")
        return mask.long()

    def _decode_positions(self, message, batch: int, length: int, mask: torch.Tensor) -> torch.Tensor:
        if not message.HasField("position_ids"):
            return position_ids_from_mask(mask)
        positions = self._decode_index(message.position_ids, "position_ids", batch, length, INDEX_DTYPES).long()
        limit = self.config.max_position_embeddings
        if ((positions < 0) | (positions >= limit)).any():
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"position_ids must be in 0..{limit - 1}")
        return positions

    @staticmethod
    def _decode_index(message: pb.Tensor, what: str, batch: int, length: int, allowed: tuple[str, ...]) -> torch.Tensor:
        try:
            tensor = decode(message, what=what, ndim=2, allowed=allowed)
        except WireError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if tuple(tensor.shape) != (batch, length):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{what} shape {list(tensor.shape)} does not match hidden_states ({batch}, {length})")
        return tensor
