"""One run's calls to its peers: a pipeline's training passes, steps and evaluation, adapters out and in.

The run driver (coordinator/trainer.py) decides what runs where and when; this module only talks to
peers, so the wire (requests, wire dtype, timeouts, which failures break a pipeline) is in one place, apart
from the orchestration (as Petals keeps remote_forward_backward apart from its sequence manager). A failed
call in a pipeline's passes raises PipelineBroken naming the peer, so the driver can give the unit back and
leave that peer out; calls whose failure costs nothing (Discard, GetAdapter, CloseTraining) only log it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

import grpc
import torch

from tsotsa.client.swarm import Swarm
from tsotsa.codec import decode, encode
from tsotsa.records import ServerRecord
from tsotsa.run_credentials import METADATA_KEY, RunSigner
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.coordinator.pipelines import Pipeline

logger = logging.getLogger(__name__)
CLOSE_TIMEOUT = 10.0  # seconds: closing is a courtesy to peers, and must not hold up a run's end


class PipelineBroken(Exception):
    def __init__(self, peer: ServerRecord, reason: str) -> None:
        super().__init__(f"peer {peer.peer_id[:12]} at {peer.address} ({peer.start}:{peer.end}): {reason}")
        self.peer = peer


class PipelineClient:
    """The peers' training RPCs for run `run` of model `model_id`, hidden states sent in `wire_dtype`; each
    carries a run credential from `signer` (peers accept training calls only with one)."""

    def __init__(self, swarm: Swarm, run: str, model_id: str, wire_dtype: torch.dtype, signer: RunSigner) -> None:
        self.swarm, self.run, self.model_id, self.wire_dtype = swarm, run, model_id, wire_dtype
        self.signer = signer

    def _rpc(self, peer: ServerRecord, method: str, request, timeout: float | None = None,
             credential_run: str | None = None):
        """One training RPC to `peer` with this run's credential (or `credential_run`'s), signed per call
        (~50 us, no expiry to track)."""
        metadata = [(METADATA_KEY, self.signer.credential(self.model_id, credential_run or self.run))]
        return getattr(self.swarm.stub(peer.address), method)(request, timeout=timeout or self.swarm.step_timeout,
                                                              metadata=metadata)

    def open(self, peer: ServerRecord, lora: pb.LoraSpec, adapter: dict[str, torch.Tensor]) -> None:
        """OpenTraining, then SetAdapter with `adapter` (the peer's blocks of it). grpc.RpcError passes
        through: the caller decides whether a peer it could not prepare matters."""
        self._rpc(peer, "OpenTraining", pb.OpenTrainingRequest(model_id=self.model_id, run=self.run, lora=lora))
        tensors = [pb.NamedTensor(name=key, tensor=encode(tensor)) for key, tensor in sorted(adapter.items())]
        self._rpc(peer, "SetAdapter", pb.SetAdapterRequest(run=self.run, tensors=tensors))

    def train_forward(self, pipeline: Pipeline, tag: str, hidden: torch.Tensor, mask: torch.Tensor,
                      trace: list[tuple[ServerRecord, torch.Tensor, torch.Tensor]] | None = None
                      ) -> tuple[torch.Tensor, int]:
        """TrainForward through the pipeline (each peer keeps what its backward needs): the last hidden
        states and the bytes sent and received. The first peer's input needs no gradient. With `trace`,
        each peer's (peer, input as sent, output) is appended to it, for spot checks."""
        wire = 0
        for position, peer in enumerate(pipeline):
            request = pb.TrainForwardRequest(run=self.run, micro_batch=tag, attention_mask=encode(mask),
                                             hidden_states=encode(hidden, self.wire_dtype),
                                             no_input_grad=position == 0)
            reply = self.call(peer, "TrainForward", request)
            wire += request.ByteSize() + reply.ByteSize()
            sent, hidden = hidden, decode(reply.hidden_states, what="hidden_states", ndim=3)
            if trace is not None:
                trace.append((peer, sent.to(self.wire_dtype), hidden))
        return hidden, wire

    def recompute(self, referee: ServerRecord, adapter: dict[str, torch.Tensor], lora: pb.LoraSpec,
                  hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What `referee` computes for `hidden` through its span with `adapter` (another peer's, of the same
        span): loaded there as a throw-away run of its own, used by one Forward, closed again. grpc.RpcError
        passes through."""
        check = f"{self.run[:40]}-check-{uuid.uuid4().hex[:12]}"
        self._rpc(referee, "OpenTraining", pb.OpenTrainingRequest(model_id=self.model_id, run=check, lora=lora),
                  credential_run=check)
        try:
            tensors = [pb.NamedTensor(name=key, tensor=encode(tensor)) for key, tensor in sorted(adapter.items())]
            self._rpc(referee, "SetAdapter", pb.SetAdapterRequest(run=check, tensors=tensors), credential_run=check)
            request = pb.ForwardRequest(model_id=self.model_id, start_block=referee.start, end_block=referee.end,
                                        hidden_states=encode(hidden, self.wire_dtype), attention_mask=encode(mask),
                                        adapter=check)
            return decode(self._rpc(referee, "Forward", request).hidden_states, what="hidden_states", ndim=3)
        finally:
            try:
                self._rpc(referee, "CloseTraining", pb.CloseTrainingRequest(run=check), CLOSE_TIMEOUT,
                          credential_run=check)
            except grpc.RpcError:
                pass

    def adapter_of(self, peer: ServerRecord) -> dict[str, torch.Tensor]:
        """The run's adapter as `peer` holds it now. grpc.RpcError passes through."""
        reply = self._rpc(peer, "GetAdapter", pb.GetAdapterRequest(run=self.run))
        return {item.name: decode(item.tensor, what=item.name, ndim=2) for item in reply.tensors}

    def train_backward(self, pipeline: Pipeline, tag: str, grad: torch.Tensor) -> int:
        """TrainBackward back through the pipeline from the gradient of its output: the bytes sent and received."""
        wire = 0
        for position in range(len(pipeline) - 1, -1, -1):
            request = pb.TrainBackwardRequest(run=self.run, micro_batch=tag, grad_output=encode(grad, self.wire_dtype),
                                              want_grad_input=position > 0)
            reply = self.call(pipeline[position], "TrainBackward", request)
            wire += request.ByteSize() + reply.ByteSize()
            if position > 0:
                grad = decode(reply.grad_input, what="grad_input", ndim=3)
        return wire

    def step(self, pipeline: Pipeline, samples: int, lr: float) -> None:
        for peer in pipeline:
            self.call(peer, "Step", pb.StepRequest(run=self.run, samples=samples, lr=lr))

    def discard(self, pipeline: Pipeline, dead: ServerRecord | None) -> None:
        """The pipeline's peers (but `dead`) forget the gradients of the unit it could not finish."""
        for peer in pipeline:
            if dead is not None and peer.peer_id == dead.peer_id:
                continue
            try:
                self._rpc(peer, "Discard", pb.DiscardRequest(run=self.run))
            except grpc.RpcError as error:
                logger.warning("cannot discard on %s: %s", peer.address, error)

    def gather(self, peers: Iterable[ServerRecord]) -> list[tuple[ServerRecord, dict[str, torch.Tensor]]]:
        """(peer, adapter) of every peer that still answers (the samples a peer says it trained on are not
        asked for: the coordinator weighs replicas by what it dealt them)."""
        replicas = []
        for peer in peers:
            try:
                reply = self._rpc(peer, "GetAdapter", pb.GetAdapterRequest(run=self.run))
            except grpc.RpcError as error:
                logger.warning("replica %s is gone; its blocks keep the other replicas' work: %s",
                               peer.address, error.code().name)
                continue
            state = {item.name: decode(item.tensor, what=item.name, ndim=2) for item in reply.tensors}
            replicas.append((peer, state))
        return replicas

    def forward(self, pipeline: Pipeline, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Plain Forward through the pipeline with the run's adapter (what clients get): the last hidden states."""
        for peer in pipeline:
            request = pb.ForwardRequest(model_id=self.model_id, start_block=peer.start, end_block=peer.end,
                                        hidden_states=encode(hidden, self.wire_dtype), attention_mask=encode(mask),
                                        adapter=self.run)
            hidden = decode(self.call(peer, "Forward", request).hidden_states, what="hidden_states", ndim=3)
        return hidden

    def close(self, peers: Iterable[ServerRecord]) -> None:
        """The run's training state goes; its adapter stays loaded on the peers, ready to serve."""
        for peer in peers:
            try:
                self._rpc(peer, "CloseTraining", pb.CloseTrainingRequest(run=self.run, keep=True), CLOSE_TIMEOUT)
            except grpc.RpcError:
                pass  # not open there, or gone

    def call(self, peer: ServerRecord, method: str, request):
        """One RPC of a pipeline's passes; any failure breaks the pipeline at `peer`."""
        try:
            return self._rpc(peer, method, request)
        except grpc.RpcError as error:
            raise PipelineBroken(peer, f"{method}: {error.code().name}: {error.details()}") from None
