"""The peer's training RPCs (OpenTraining … CloseTraining): `TrainingService`, to which `PeerService` forwards them.

Each one validates before it changes anything and runs its computation on the peer's runtime thread, as
inference does: training and serving share the blocks and take turns on them. What it shares with inference
is handed to it explicitly: the blocks, their adapters, the request checks and the runtime thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import torch

from tsotsa.codec import FLOAT_DTYPES, encode
from tsotsa.metrics import PeerMetrics
from tsotsa.spans import BlockSpan
from tsotsa.training.lora import LLAMA_LINEARS, check_run_name, lora_from_spec, optimizer_from_spec
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.peer.adapters import Adapters, check_adapter_keys
from tsotsa.peer.errors import PeerError, refusals
from tsotsa.peer.requests import RequestChecker
from tsotsa.runtime import Runtime
from tsotsa.peer.training import TrainingRun, check_micro_batch

# Tokens of micro-batches forwarded and not yet backwarded, over all runs: what their kept activations (and
# autograd graphs) hold in memory is proportional to it.
MAX_PENDING_TOKENS = 65536
MAX_RUNS = 16  # runs training on one peer at once: each holds an adapter (up to rank 1024) and its optimizer
MAX_DETAILS = 1024  # characters of a refusal that quotes the request: a status's trailer holds a few KiB


class TrainingService:
    """The fine-tuning runs open on this peer (`runs`, by name) and the RPCs that drive them."""

    def __init__(self, span: BlockSpan, adapters: Adapters, checker: RequestChecker, runtime: Runtime,
                 metrics: PeerMetrics) -> None:
        """`metrics`: the peer's, where the micro-batches computed are counted."""
        self.span, self.adapters, self.checker, self.runtime, self.metrics = span, adapters, checker, runtime, metrics
        self.runs: dict[str, TrainingRun] = {}

    @refusals("OpenTraining")
    def OpenTraining(self, request: pb.OpenTrainingRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        self.checker.check_model(request.model_id)
        # counted before anything reads them: 64 MiB of one-letter names would be millions of Python strings
        if len(request.lora.target_modules) > len(LLAMA_LINEARS):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"at most {len(LLAMA_LINEARS)} target modules, not {len(request.lora.target_modules)}")
        try:
            check_run_name(request.run)
            lora, optimizer = lora_from_spec(request.lora), optimizer_from_spec(request.lora)
        except ValueError as error:  # cut: it may quote the request (target module names of any length)
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, _cut(str(error))) from None
        checkpointing = request.lora.gradient_checkpointing

        def open_run() -> TrainingRun:
            run = self.runs.get(request.run)
            if run is not None:
                if (run.settings, run.optimizer_settings, run.checkpointing) != (lora, optimizer, checkpointing):
                    raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"run {request.run!r} is already open here with other settings")
                return run
            if len(self.runs) >= MAX_RUNS:
                raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this peer trains {MAX_RUNS} runs already; close one first")
            if request.run in self.adapters:
                self.adapters.remove(request.run)  # a served adapter of the same name: training starts afresh
            self.adapters.attach(request.run, lora)
            try:
                run = TrainingRun(self.span, self.adapters, request.run, lora, optimizer, checkpointing)
            except Exception:
                self.adapters.remove(request.run)
                raise
            self.runs[request.run] = run
            return run

        return self._training_state(self.runtime.run(open_run))

    @refusals("TrainForward")
    def TrainForward(self, request: pb.TrainForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        run = self._run(request.run)
        check_micro_batch(request.micro_batch)
        hidden = self.checker.hidden(request.hidden_states, per="micro-batch")
        batch, length = hidden.shape[:2]
        mask = self.checker.mask(request, batch, length)

        def forward() -> torch.Tensor:  # on the runtime thread, which every change of `pending` runs on
            pending = sum(kept.mask.numel() for open_run in self.runs.values() for kept in open_run.pending.values())
            if pending + batch * length > MAX_PENDING_TOKENS:
                raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{pending} tokens of micro-batches await backward on this peer (at most "
                                f"{MAX_PENDING_TOKENS}); backward or discard first")
            return run.forward(request.micro_batch, hidden, mask, not request.no_input_grad).to("cpu", hidden.dtype)

        output = self.runtime.run(forward)
        self.metrics.train_micro_batches.labels("forward").inc()
        return pb.ForwardResponse(hidden_states=encode(output, hidden.dtype))

    @refusals("TrainBackward")
    def TrainBackward(self, request: pb.TrainBackwardRequest, context: grpc.ServicerContext
                      ) -> pb.TrainBackwardResponse:
        run = self._run(request.run)

        def check(shape: tuple[int, ...]) -> None:
            forwarded = run.forwarded_shape(request.micro_batch)
            if shape != forwarded:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"grad_output shape {list(shape)} differs from the forwarded {list(forwarded)}")

        grad = self.checker.states(request.grad_output, "grad_output", check)

        def backward() -> torch.Tensor | None:
            grad_input = run.backward(request.micro_batch, grad, request.want_grad_input)
            return None if grad_input is None else grad_input.to("cpu", grad.dtype)

        grad_input = self.runtime.run(backward)
        self.metrics.train_micro_batches.labels("backward").inc()
        return pb.TrainBackwardResponse(grad_input=encode(grad_input, grad.dtype) if grad_input is not None else None)

    @refusals("Step")
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        run = self._run(request.run)
        lr = request.lr if request.HasField("lr") else run.optimizer_settings.lr
        if not (math.isfinite(lr) and lr >= 0):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "lr must be a finite number, not negative")
        self.runtime.run(lambda: run.step(request.samples, lr))
        return self._training_state(run)

    @refusals("Discard")
    def Discard(self, request: pb.DiscardRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        run = self._run(request.run)
        self.runtime.run(run.discard)
        return self._training_state(run)

    @refusals("GetAdapter")
    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterState:
        run = self._run(request.run)
        state = self.runtime.run(lambda: self.adapters.state(run.name))
        return pb.AdapterState(state=self._training_state(run), tensors=[
            pb.NamedTensor(name=key, tensor=encode(tensor)) for key, tensor in sorted(state.items())])

    @refusals("SetAdapter")
    def SetAdapter(self, request: pb.SetAdapterRequest, context: grpc.ServicerContext) -> pb.TrainingState:
        """The names, dtypes and shapes of all the tensors are checked against the run's parameters before any
        of them is decoded: a refusal costs no inflating, and changes nothing."""
        run = self._run(request.run)
        # counted before the names are read, which could be millions; up to twice the adapter's count, the
        # refusal below names the wrong ones instead
        if len(request.tensors) > 2 * len(run.shapes):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.tensors)} adapter tensors; this "
                            f"peer's blocks have {len(run.shapes)}")
        names = [item.name for item in request.tensors]
        if len(set(names)) != len(names):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "adapter tensors are named twice")
        try:
            check_adapter_keys(run.shapes, names)
        except ValueError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        for item in request.tensors:
            self.checker.header(item.tensor, item.name, ndim=2, allowed=FLOAT_DTYPES,
                                check_shape=_parameter_shape(item.name, run.shapes[item.name]))
        state = {item.name: self.checker.tensor(item.tensor, item.name, ndim=2, allowed=FLOAT_DTYPES,
                                                check_shape=_parameter_shape(item.name, run.shapes[item.name]))
                 for item in request.tensors}

        def load() -> None:
            try:
                run.load(state)
            except ValueError as error:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

        self.runtime.run(load)
        return self._training_state(run)

    @refusals("CloseTraining")
    def CloseTraining(self, request: pb.CloseTrainingRequest, context: grpc.ServicerContext
                      ) -> pb.CloseTrainingResponse:
        run = self._run(request.run)

        def close() -> None:
            del self.runs[run.name]
            run.close(keep_adapter=request.keep)

        self.runtime.run(close)
        return pb.CloseTrainingResponse()

    # ------------------------------------------------------------------ helpers

    def _run(self, name: str) -> TrainingRun:
        run = self.runs.get(name)
        if run is None:
            raise PeerError(grpc.StatusCode.NOT_FOUND, f"run {name[:80]!r} is not open on this peer")
        return run

    def _training_state(self, run: TrainingRun) -> pb.TrainingState:
        return pb.TrainingState(run=run.name, start_block=self.span.span.start, end_block=self.span.span.end,
                                trainable_parameters=run.trainable_parameters, steps=run.steps, samples=run.samples,
                                pending=len(run.pending))


def _parameter_shape(name: str, expected: tuple[int, ...]) -> Callable[[tuple[int, ...]], None]:
    """A `check_shape` that refuses any shape but the adapter parameter's own."""

    def check(shape: tuple[int, ...]) -> None:
        if shape != expected:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{name} has shape {list(shape)}, expected {list(expected)}")

    return check


def _cut(text: str) -> str:
    """A refusal's details, no longer than MAX_DETAILS: past the client's metadata limit (16 KiB) the client
    would read RESOURCE_EXHAUSTED instead of the status the peer sent."""
    return text if len(text) <= MAX_DETAILS else text[:MAX_DETAILS] + " ..."
