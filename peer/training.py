"""A run's training on one peer: forward keeping what backward needs, backward, optimizer steps.

The coordinator drives: TrainForward (activations kept per micro-batch), TrainBackward (the gradient of the
span's input goes back up the pipeline; the adapters' gradients accumulate here), Step (AdamW over this
span's B matrices; its state never leaves the peer). With gradient checkpointing only the inputs and the RNG
state are kept, and Backward recomputes the forward: the same dropout masks, the same gradients.
Every method runs on the peer's runtime thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from tsotsa.spans import BlockSpan, position_ids_from_mask
from tsotsa.training.lora import LoraSettings, OptimizerSettings
from tsotsa.peer.adapters import Adapters
from tsotsa.peer.errors import PeerError

MAX_PENDING = 64  # micro-batches forwarded and not yet backwarded, per run: activations are bounded
MAX_MICRO_BATCH_ID = 128  # characters of a micro-batch's name, which is kept until its backward


def check_micro_batch(name: str) -> None:
    """A micro-batch's name is kept until its backward (64 of them per run): a short one, as a session id is."""
    if not 1 <= len(name) <= MAX_MICRO_BATCH_ID:
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"a micro-batch's name must have 1..{MAX_MICRO_BATCH_ID} characters")


@dataclass
class Kept:
    inputs: torch.Tensor          # a leaf that requires grad: its .grad is what goes back up the pipeline
    mask: torch.Tensor
    outputs: torch.Tensor | None  # None under gradient checkpointing
    rng_state: tuple[torch.Tensor, torch.Tensor | None]  # CPU and (on a GPU) device generator states


class TrainingRun:
    def __init__(self, span: BlockSpan, adapters: Adapters, name: str, settings: LoraSettings,
                 optimizer: OptimizerSettings, checkpointing: bool) -> None:
        self.span, self.adapters, self.name, self.settings = span, adapters, name, settings
        self.optimizer_settings, self.checkpointing = optimizer, checkpointing
        self.trainable = [p for key, p in adapters.tensors(name).items() if key.endswith(".lora_B.weight")]
        # fixed for the run's life; read by the RPC threads to check a SetAdapter before it is decoded
        self.shapes: dict[str, tuple[int, ...]] = adapters.shapes(name)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                           weight_decay=optimizer.weight_decay)
        self.pending: dict[str, Kept] = {}
        self.steps = self.samples = 0
        adapters.set_training(name, True)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def forward(self, micro_batch: str, hidden: torch.Tensor, mask: torch.Tensor, input_grad: bool = True
                ) -> torch.Tensor:
        """`input_grad` False (the first span, whose input is the frozen embeddings): autograd skips the
        gradient of the input, which nobody would read."""
        if micro_batch in self.pending:
            raise PeerError(grpc.StatusCode.ALREADY_EXISTS, f"micro-batch {micro_batch!r} is already forwarded")
        if len(self.pending) >= MAX_PENDING:
            raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{MAX_PENDING} micro-batches await backward on this peer; backward or discard first")
        inputs = hidden.to(self.span.device, self.span.dtype).detach().requires_grad_(input_grad)
        mask = mask.to(self.span.device)
        rng_state = self._rng_state()
        if self.checkpointing:
            with torch.no_grad():
                outputs = self._run(inputs, mask)
            self.pending[micro_batch] = Kept(inputs, mask, None, rng_state)
        else:
            outputs = self._run(inputs, mask)
            self.pending[micro_batch] = Kept(inputs, mask, outputs, rng_state)
        return outputs.detach()

    def forwarded_shape(self, micro_batch: str) -> tuple[int, ...]:
        """The shape of the input `micro_batch` was forwarded with, which its gradient must have (NOT_FOUND
        if none is pending): read by the RPC threads to bound a grad_output before it is decoded."""
        kept = self.pending.get(micro_batch)
        if kept is None:
            raise PeerError(grpc.StatusCode.NOT_FOUND,
                            f"micro-batch {micro_batch[:MAX_MICRO_BATCH_ID]!r} was not forwarded here")
        return tuple(kept.inputs.shape)

    def backward(self, micro_batch: str, grad_output: torch.Tensor, want_grad_input: bool) -> torch.Tensor | None:
        kept = self.pending.get(micro_batch)
        if kept is None:
            raise PeerError(grpc.StatusCode.NOT_FOUND,
                            f"micro-batch {micro_batch[:MAX_MICRO_BATCH_ID]!r} was not forwarded here")
        if tuple(grad_output.shape) != tuple(kept.inputs.shape):
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"grad_output shape {list(grad_output.shape)} "
                            f"differs from the forwarded {list(kept.inputs.shape)}")
        if want_grad_input and not kept.inputs.requires_grad:
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"micro-batch {micro_batch!r} was forwarded with no_input_grad: no input gradient to give")
        del self.pending[micro_batch]
        outputs = kept.outputs
        if outputs is None:
            with torch.random.fork_rng(devices=[self.span.device] if self.span.device.type == "cuda" else []):
                self._set_rng_state(kept.rng_state)
                outputs = self._run(kept.inputs, kept.mask)
        torch.autograd.backward(outputs, grad_output.to(outputs.device, outputs.dtype))
        return kept.inputs.grad if want_grad_input else None

    def step(self, samples: int, lr: float) -> None:
        if self.pending:
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{len(self.pending)} micro-batches still await backward; no step before they do")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.samples += samples

    def discard(self) -> None:
        self.pending.clear()
        self.optimizer.zero_grad(set_to_none=True)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The aggregated adapter replaces this replica's; counters restart for the next round. A refused
        state (ValueError) changes nothing."""
        self.adapters.load(self.name, state)
        self.discard()
        self.steps = self.samples = 0

    def close(self, keep_adapter: bool) -> None:
        self.discard()
        self.adapters.set_training(self.name, False)
        if not keep_adapter:
            self.adapters.remove(self.name)

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generators dropout draws from (on a GPU, the device's too), so a recompute draws the same."""
        cuda = self.span.device.type == "cuda"
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.span.device) if cuda else None

    def _set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.span.device)

    def _run(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.adapters.activate(self.name)
        self.span.train(True)  # LoRA dropout is live only in training mode
        try:
            return self.span.run_blocks(inputs, mask, position_ids_from_mask(mask))
        finally:
            self.span.train(False)
