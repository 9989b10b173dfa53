"""The peer's gRPC service: Forward (stateless) and Inference (a stream holding a KV cache); the training
RPCs it forwards to `TrainingService` (peer/training_rpcs.py).

Every request is validated against the model config and this peer's span before it touches the blocks
(`RequestChecker`, peer/requests.py, shared with training); anything wrong is refused with a precise status
code and the peer keeps serving. All computation runs on the peer's one runtime thread (peer/runtime.py).
What it serves is counted where it happens, in `metrics` (`tsotsa.metrics.PeerMetrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry

from tsotsa.codec import encode
from tsotsa.metrics import PeerMetrics
from tsotsa.spans import BlockSpan, position_ids_from_mask
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.peer.adapters import Adapters
from tsotsa.peer.batching import BatchKey, DecodeStep, is_decode_step, prefill_in_chunks, run_decode_steps
from tsotsa.peer.errors import PeerError, refusals, stream_refusals
from tsotsa.peer.links import Links, StepInputs, check_link_key, check_linked_ids, refuse
from tsotsa.peer.requests import RequestChecker
from tsotsa.peer.roles import CoordinatorOnly
from tsotsa.runtime import RecentCallers, Runtime
from tsotsa.peer.sessions import Session, SessionTable
from tsotsa.peer.throughput import ServedThroughput
from tsotsa.peer.training_rpcs import TrainingService

logger = logging.getLogger(__name__)


@dataclass
class PeerLimits:
    # None: from the peer's memory when it starts (peer/selection.py default_max_sessions, default_cache_bytes);
    # PeerService takes them resolved
    max_sessions: int | None = None
    max_cache_bytes: int | None = None
    max_forward_tokens: int = 8192
    session_timeout: float = 300.0
    open_timeout: float = 30.0  # seconds a new Inference stream may take to send its `open`
    max_batch: int = 32  # sessions whose decode steps one pass may compute together (1: no batching)
    admission_wait: float = 10.0  # seconds an open may wait in line for room before RESOURCE_EXHAUSTED
    batch_window: float = 0.002  # seconds a decode pass may wait for the other sessions that stepped lately
    max_links: int = 32  # clients' Link streams open at once (each holds a server thread, like a session)


class PeerService(pb_grpc.PeerServicer):
    def __init__(self, span: BlockSpan, model_id: str, num_model_blocks: int, limits: PeerLimits,
                 info: Callable[[], pb.PeerInfo], coordinator_only: CoordinatorOnly,
                 registry: CollectorRegistry | None = None, throughput: float = 0.0) -> None:
        """`coordinator_only`: the check every training call passes first (`tsotsa.peer.roles`); `registry`:
        where the peer's metrics go (the one its /metrics page serves; default a registry of its own);
        `throughput`: the start-up probe's (peer/throughput.py), which served work then refines."""
        self._info, self.coordinator_only = info, coordinator_only
        self.model_id, self.num_model_blocks, self.max_forward_tokens = model_id, num_model_blocks, \
            limits.max_forward_tokens
        self.open_timeout = limits.open_timeout
        self.sessions = SessionTable(limits.max_sessions, limits.max_cache_bytes, limits.session_timeout,
                                     limits.admission_wait)
        self.accepting = True
        self.links = Links(limits.max_links)
        self.metrics = PeerMetrics(
            registry if registry is not None else CollectorRegistry(), open_sessions=lambda: self.sessions.open_count,
            max_sessions=limits.max_sessions, cache_bytes_used=lambda: self.sessions.reserved_bytes,
            cache_bytes_budget=limits.max_cache_bytes, adapters=lambda: self.adapters.names if self.adapters else [])
        self.steppers = RecentCallers()
        self.runtime = Runtime(self._run_batch, limits.max_batch, on_batch=self.metrics.batch_sessions.observe,
                               window=limits.batch_window, expected=self.steppers.count)
        self.replace_span(span, throughput)

    def replace_span(self, span: BlockSpan, throughput: float) -> None:
        """Serves `span` from now on, with no adapters and no training runs (at start, and after a move, once
        the gRPC server stopped and the sessions drained); the metrics and the runtime thread stay."""

        def swap() -> None:
            self.span = span
            self.adapters = Adapters(span)
            self.checker = RequestChecker(self.model_id, span.config, self.num_model_blocks, span.span,
                                          self.max_forward_tokens)
            self.training = TrainingService(span, self.adapters, self.checker, self.runtime, self.metrics)
            self.throughput = ServedThroughput(throughput, span.span.length)
            self.accepting = True

        self.runtime.run(swap)

    def release_span(self) -> None:
        """Lets go of the blocks, their adapters and training runs (a move, before the new blocks load)."""

        def release() -> None:
            self.span = self.adapters = self.checker = self.training = None

        self.runtime.run(release)

    # ------------------------------------------------------------------ RPCs

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PeerInfo:
        return self._info()

    @refusals("forward")
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        self._check_route(request.model_id, request.start_block, request.end_block, request.adapter)
        hidden = self.checker.hidden(request.hidden_states, per="Forward")
        batch, length = hidden.shape[:2]
        mask = self.checker.mask(request, batch, length)
        positions = self.checker.positions(request, batch, length, mask)
        output = self._compute(request.adapter, hidden, mask, positions, None, request.start_block, request.end_block)
        self.metrics.forward_calls.inc()
        self.metrics.tokens.inc(batch * length)
        return pb.ForwardResponse(hidden_states=encode(output, hidden.dtype))

    def Inference(self, requests: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
                  ) -> Iterator[pb.InferenceResponse]:
        session: Session | None = None
        unopened = self._until_opened(context)
        try:
            with stream_refusals(context, "inference"):
                for request in requests:
                    unopened.cancel()
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
                        began = time.perf_counter()
                        output, tokens = self._step(session, request.step)
                        self._count_step(began, tokens)
                        yield pb.InferenceResponse(session_id=session.session_id, hidden_states=output,
                                                   cache_length=session.length)
                    else:
                        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "request has neither open nor step")
        finally:
            unopened.cancel()
            if session is not None:
                self.steppers.forget((session.start, session.end, session.adapter), session.session_id)
                self.sessions.close(session)

    def Link(self, requests: Iterator[pb.LinkRequest], context: grpc.ServicerContext) -> Iterator[pb.LinkResponse]:
        """A client's decode steps for several of its sessions per message, run as one batch (peer/links.py)."""
        key: bytes | None = None
        unopened = self._until_opened(context)
        try:
            with stream_refusals(context, "link"):
                for request in requests:
                    unopened.cancel()
                    kind = request.WhichOneof("kind")
                    if kind == "open":
                        if key is not None:
                            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION, "this link is already open")
                        self.checker.check_model(request.open.model_id)
                        opened = check_link_key(request.open.link_key)
                        self.links.enter()
                        key = opened  # from here on the link holds a slot, given back when it ends
                        yield pb.LinkResponse()
                    elif kind == "steps":
                        if key is None:
                            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION, "open the link before its steps")
                        yield self._linked_steps(key, request.steps)
                    else:
                        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "request has neither open nor steps")
        finally:
            unopened.cancel()
            if key is not None:
                self.links.leave()

    # ------------------------------------------------- training RPCs, answered by TrainingService

    def OpenTraining(self, request: pb.OpenTrainingRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        self._admit(request.run, context)
        return self.training.OpenTraining(request, context)

    def TrainForward(self, request: pb.TrainForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        self._admit(request.run, context)
        return self.training.TrainForward(request, context)

    def TrainBackward(self, request: pb.TrainBackwardRequest, context: grpc.ServicerContext
                      ) -> pb.TrainBackwardResponse:
        self._admit(request.run, context)
        return self.training.TrainBackward(request, context)

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        self._admit(request.run, context)
        return self.training.Step(request, context)

    def Discard(self, request: pb.DiscardRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        self._admit(request.run, context)
        return self.training.Discard(request, context)

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterState:
        self._admit(request.run, context)
        return self.training.GetAdapter(request, context)

    def SetAdapter(self, request: pb.SetAdapterRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        self._admit(request.run, context)
        return self.training.SetAdapter(request, context)

    def CloseTraining(self, request: pb.CloseTrainingRequest, context: grpc.ServicerContext
                      ) -> pb.CloseTrainingResponse:
        self._admit(request.run, context)
        return self.training.CloseTraining(request, context)

    # --------------------------------------------------------------- helpers

    def _admit(self, run: str, context: grpc.ServicerContext) -> None:
        """Training calls come from the coordinator only: PERMISSION_DENIED, and nothing done, otherwise."""
        try:
            self.coordinator_only.check(context, run)
        except PeerError as error:
            context.abort(error.code, error.message)

    def _compute(self, adapter: str, hidden: torch.Tensor, *args) -> torch.Tensor:
        """Runs the span with `adapter` (empty: none) on the runtime thread; the output comes back on the CPU,
        in the input's dtype."""

        def run() -> torch.Tensor:
            self._check_adapter(adapter)  # again here: a session's adapter may have been removed since it opened
            self.adapters.activate(adapter or None)
            return self.span(hidden, *args).to("cpu", hidden.dtype)

        return self.runtime.run(run)

    def _check_adapter(self, name: str) -> None:
        if name and name not in self.adapters:
            raise PeerError(grpc.StatusCode.NOT_FOUND, f"adapter {name[:80]!r} is not loaded on this peer")

    def _check_route(self, model_id: str, start: int, end: int, adapter: str) -> None:
        """What a Forward or a new session asks for: this model, blocks served here, a loaded adapter (if any)."""
        self.checker.check_model(model_id)
        self.checker.check_blocks(start, end)
        self._check_adapter(adapter)

    def _open(self, session_id: str, request: pb.OpenSession) -> Session:
        if not self.accepting:
            raise PeerError(grpc.StatusCode.UNAVAILABLE, "peer is draining and takes no new sessions")
        self._check_route(request.model_id, request.start_block, request.end_block, request.adapter)
        self.checker.check_session(request.batch_size, request.max_length)
        blocks = request.end_block - request.start_block
        reserved = self.span.cache_bytes(request.batch_size, request.max_length, blocks)
        session = Session(
            session_id=session_id, start=request.start_block, end=request.end_block, batch_size=request.batch_size,
            max_length=request.max_length, reserved_bytes=reserved, cache=self.span.new_cache(),
            attention_mask=torch.zeros(request.batch_size, 0, dtype=torch.long), adapter=request.adapter,
            link_key=check_link_key(request.link_key) if request.link_key else b"",
        )
        self.sessions.open(session)
        return session

    def _until_opened(self, context: grpc.ServicerContext) -> threading.Timer:
        """A stream that never opens would hold one of the server's workers for ever: cancelled after
        `open_timeout` unless the timer is cancelled first (by the stream's first message)."""
        unopened = threading.Timer(self.open_timeout, context.cancel)
        unopened.daemon = True
        unopened.start()
        return unopened

    def _count_step(self, began: float, tokens: int) -> None:
        self.metrics.step_latency.observe(time.perf_counter() - began)
        self.metrics.steps.inc()
        self.metrics.tokens.inc(tokens)

    def _inputs(self, session: Session, step: pb.InferenceStep, linked: bool = False) -> StepInputs:
        """A step of `session` validated against it (nothing changes yet); `linked`: a Link's, which must be
        one new token per row."""

        def fits(batch: int, length: int) -> None:
            if batch != session.batch_size:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hidden_states batch {batch} differs from the session's {session.batch_size}")
            if linked and length != 1:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a linked step holds one token per row, not {length}")
            if session.length + length > session.max_length:
                raise PeerError(grpc.StatusCode.OUT_OF_RANGE, f"{session.length} + {length} tokens exceed the "
                                f"session's max_length {session.max_length}")

        hidden = self.checker.hidden(step.hidden_states, per="inference step", fits=fits)
        batch, length = hidden.shape[:2]
        new_mask = self.checker.mask(step, batch, length)
        mask = torch.cat([session.attention_mask, new_mask], dim=1)
        if step.HasField("position_ids"):
            positions = self.checker.positions(step, batch, length, new_mask)
        else:
            positions = position_ids_from_mask(mask)[:, -length:]
        # held here: if the session expires while its step waits for the runtime, this step still ends
        cache = session.cache
        decode = is_decode_step(hidden, cache, session.length, session.start - self.span.span.start)
        if linked and not decode:
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION, "a linked step must follow the session's first "
                            "step on its own stream")
        return StepInputs((session.start, session.end, session.adapter), DecodeStep(cache, hidden, mask, positions),
                          decode)

    def _step(self, session: Session, step: pb.InferenceStep) -> tuple[pb.Tensor, int]:
        """One step of a session that `touch` just found open, and the token positions it computed; nothing
        changes unless the step is valid."""
        session.claim()
        try:
            inputs = self._inputs(session, step)
            work = inputs.work
            if inputs.decode:  # may share a pass
                self.steppers.stepped(inputs.key, session.session_id)
                output = self.runtime.step(inputs.key, work)
            else:  # a prefill: in chunks, other sessions' decode passes in between
                output = prefill_in_chunks(lambda *part: self._compute(session.adapter, part[0], *part[1:],
                                                                       work.cache, session.start, session.end),
                                           work.hidden, work.mask, work.positions)
            session.attention_mask = work.mask
        finally:
            session.release()
        return self._answer(session, work, output), work.hidden.shape[0] * work.hidden.shape[1]

    def _answer(self, session: Session, work: DecodeStep, output: torch.Tensor) -> pb.Tensor:
        """A computed step's answer on the wire, in the dtype it came in (one place for a session's steps on
        its stream and on its link)."""
        return encode(output.to("cpu", work.hidden.dtype), work.hidden.dtype)

    def _linked_steps(self, key: bytes, message: pb.LinkSteps) -> pb.LinkResponse:
        """A Link message: every valid step queued on the runtime at once (so they share passes), each
        refused one answered with its code while the others run."""
        began = time.perf_counter()
        steps = message.steps
        check_linked_ids([item.session_id for item in steps], self.sessions.max_sessions)
        results = [pb.LinkedResult(session_id=item.session_id) for item in steps]
        accepted: list[tuple[int, Session, StepInputs]] = []
        for index, item in enumerate(steps):
            try:
                session = self.sessions.linked(item.session_id, key)
                session.claim()
            except PeerError as error:
                refuse(results[index], error)
                continue
            try:
                accepted.append((index, session, self._inputs(session, item.step, linked=True)))
            except PeerError as error:
                session.release()
                refuse(results[index], error)
        try:
            self._run_linked(accepted, results, began)
        finally:
            for _, session, _ in accepted:
                session.release()
        self.metrics.link_steps.observe(len(steps))
        return pb.LinkResponse(results=results)

    def _run_linked(self, accepted: list[tuple[int, Session, StepInputs]], results: list[pb.LinkedResult],
                    began: float) -> None:
        """Queues the accepted steps, those of one batch key together, and fills in their results."""
        by_key: dict[BatchKey, list[tuple[int, Session, StepInputs]]] = {}
        for entry in accepted:
            self.steppers.stepped(entry[2].key, entry[1].session_id)
            by_key.setdefault(entry[2].key, []).append(entry)
        futures = {}
        for batch_key, entries in by_key.items():
            for entry, future in zip(entries, self.runtime.submit_steps(batch_key, [e[2].work for e in entries])):
                futures[entry[0]] = future
        for index, session, inputs in accepted:
            try:
                output = futures[index].result()
            except PeerError as error:
                refuse(results[index], error)
            except Exception as error:
                logger.exception("a linked step failed")
                refuse(results[index], PeerError(grpc.StatusCode.INTERNAL, f"inference failed: {error}"))
            else:
                session.attention_mask = inputs.work.mask
                results[index].hidden_states.CopyFrom(self._answer(session, inputs.work, output))
                results[index].cache_length = session.length
                self._count_step(began, inputs.work.hidden.shape[0])

    def _run_batch(self, key: BatchKey, steps: Sequence[DecodeStep]) -> list[torch.Tensor]:
        """On the runtime thread: decode steps of sessions over the same blocks and adapter, in one pass."""
        start, end, adapter = key
        self._check_adapter(adapter)
        self.adapters.activate(adapter or None)
        began = time.perf_counter()
        outputs = run_decode_steps(self.span, start, end, steps)
        if len(steps) == 1 and steps[0].hidden.shape[0] == 1:  # what the announced throughput measures
            self.throughput.observe(end - start, time.perf_counter() - began)
        return outputs
