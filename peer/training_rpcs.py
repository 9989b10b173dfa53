"""The peer's training RPCs (OpenTraining … CloseTraining), mixed into `PeerService`.

Each one validates before it changes anything and runs its computation on the peer's runtime thread, as
inference does: training and serving share the blocks and take turns on them.
"""

from __future__ import annotations

import math

import grpc
import torch

from tsotsa.codec import FLOAT_DTYPES, WireError, decode, encode
from tsotsa.training.lora import check_run_name, lora_from_spec, optimizer_from_spec
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.peer.errors import PeerError, refusals
from tsotsa.peer.training import TrainingRun

class TrainingRpcs:
    """Needs from the service: span, adapters, runs, _check_model, _on_runtime, _decode_hidden, _decode_mask."""

    @refusals("OpenTraining")
    def OpenTraining(self, request: pb.OpenTrainingRequest, context) -> pb.TrainingState:
        self._check_model(request.model_id)
        try:
            check_run_name(request.run)
            lora, optimizer = lora_from_spec(request.lora), optimizer_from_spec(request.lora)
        except ValueError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        checkpointing = request.lora.gradient_checkpointing

        def open_run() -> TrainingRun:
            run = self.runs.get(request.run)
            if run is not None:
                if (run.settings, run.optimizer_settings, run.checkpointing) != (lora, optimizer, checkpointing):
                    raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"run {request.run!r} is already open here with other settings")
                return run
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

        return self._training_state(self._on_runtime(open_run))

    @refusals("TrainForward")
    def TrainForward(self, request: pb.TrainForwardRequest, context) -> pb.ForwardResponse:
        run = self._run(request.run)
        hidden = self._decode_hidden(request.hidden_states)
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_forward_tokens:
            raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{batch * length} tokens exceed this peer's limit "
                            f"of {self.limits.max_forward_tokens} per micro-batch")
        mask = self._decode_mask(request, batch, length)
        output = self._on_runtime(lambda: run.forward(request.micro_batch, hidden, mask, not request.no_input_grad)
                                  .to("cpu", hidden.dtype))
        return pb.ForwardResponse(hidden_states=encode(output, hidden.dtype))

    @refusals("TrainBackward")
    def TrainBackward(self, request: pb.TrainBackwardRequest, context) -> pb.TrainBackwardResponse:
        run = self._run(request.run)
        try:
            grad = decode(request.grad_output, what="grad_output", ndim=3, last_dim=self.config.hidden_size,
                          allowed=FLOAT_DTYPES)
        except WireError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

        def backward() -> torch.Tensor | None:
            grad_input = run.backward(request.micro_batch, grad, request.want_grad_input)
            return None if grad_input is None else grad_input.to("cpu", grad.dtype)

        grad_input = self._on_runtime(backward)
        return pb.TrainBackwardResponse(grad_input=encode(grad_input, grad.dtype) if grad_input is not None else None)

    @refusals("Step")
    def Step(self, request: pb.StepRequest, context) -> pb.TrainingState:
        run = self._run(request.run)
        lr = request.lr if request.HasField("lr") else run.optimizer_settings.lr
        if not (math.isfinite(lr) and lr >= 0):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "lr must be a finite number, not negative")
        self._on_runtime(lambda: run.step(request.samples, lr))
        return self._training_state(run)

    @refusals("Discard")
    def Discard(self, request: pb.DiscardRequest, context) -> pb.TrainingState:
        run = self._run(request.run)
        self._on_runtime(run.discard)
        return self._training_state(run)

    @refusals("GetAdapter")
    def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.AdapterState:
        run = self._run(request.run)
        state = self._on_runtime(lambda: self.adapters.state(run.name))
        return pb.AdapterState(state=self._training_state(run), tensors=[
            pb.NamedTensor(name=key, tensor=encode(tensor)) for key, tensor in sorted(state.items())])

    @refusals("SetAdapter")
    def SetAdapter(self, request: pb.SetAdapterRequest, context) -> pb.TrainingState:
        run = self._run(request.run)
        state = {}
        for item in request.tensors:
            try:
                state[item.name] = decode(item.tensor, what=item.name, ndim=2, allowed=FLOAT_DTYPES)
            except WireError as error:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if len(state) != len(request.tensors):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "adapter tensors are named twice")

        def load() -> None:
            try:
                run.load(state)
            except ValueError as error:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

        self._on_runtime(load)
        return self._training_state(run)

    @refusals("CloseTraining")
    def CloseTraining(self, request: pb.CloseTrainingRequest, context) -> pb.CloseTrainingResponse:
        run = self._run(request.run)

        def close() -> None:
            del self.runs[run.name]
            run.close(keep_adapter=request.keep)

        self._on_runtime(close)
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
