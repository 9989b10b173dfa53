"""What a peer checks in every request it receives, in one place for inference and training alike.

Forward, Inference, TrainForward, TrainBackward and SetAdapter all take tensors from the wire and block ranges
for the same blocks; decoding them, checking them against the model config and this peer's span, and the
status codes of the refusals (docs/architecture.md, "Wire format and validation") are the same for all, so
they are written once here. A check raises a `PeerError` and changes nothing; the caller has not yet
touched the blocks.

Every tensor is bounded by what its request may hold (the token limit, the hidden size, the shape of the
hidden states it goes with) on its declared shape, before any of its data is copied or inflated: the codec's
own limit, 512 MiB, is far more than a request needs, and zlib reaches it from half a MiB.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch
from transformers import LlamaConfig

from tsotsa.codec import FLOAT_DTYPES, WireError, check_header, decode
from tsotsa.spans import SpanSpec, position_ids_from_mask
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.peer.errors import PeerError

INDEX_DTYPES = ("int64", "int32")
MASK_DTYPES = ("int64", "int32", "bool")


class RequestChecker:
    """Validates requests for the model `model_id` (`config`, `num_model_blocks` blocks in all), of which this
    peer serves `served`. `max_forward_tokens` caps the tokens of one stateless pass (Forward, TrainForward)."""

    def __init__(self, model_id: str, config: LlamaConfig, num_model_blocks: int, served: SpanSpec,
                 max_forward_tokens: int) -> None:
        self.model_id, self.config, self.num_model_blocks = model_id, config, num_model_blocks
        self.served, self.max_forward_tokens = served, max_forward_tokens

    # ------------------------------------------------------------ what a request asks for

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            # the id cut short: details of more than a few KiB do not fit in the status's trailer
            raise PeerError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"this peer serves model {self.model_id}, not {model_id[:80]!r}")

    def check_blocks(self, start: int, end: int) -> None:
        """Blocks [start, end) are a non-empty range of the model, all of them served here."""
        num_blocks = self.num_model_blocks
        if not start < end:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"empty block range {start}:{end}")
        if end > num_blocks:
            raise PeerError(grpc.StatusCode.OUT_OF_RANGE, f"blocks {start}:{end} are outside the model's {num_blocks}")
        if start < self.served.start or end > self.served.end:
            raise PeerError(grpc.StatusCode.OUT_OF_RANGE,
                            f"blocks {start}:{end} are not served here (this peer serves {self.served})")

    def check_tokens(self, batch: int, length: int, per: str) -> None:
        """One stateless pass of `batch` x `length` tokens; `per` names the pass in the refusal."""
        if batch * length > self.max_forward_tokens:
            raise PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{batch * length} tokens exceed this peer's limit of {self.max_forward_tokens} per {per}")

    def check_session(self, batch_size: int, max_length: int) -> None:
        """The shape of a session's KV cache: at least one row, and no more positions than the model has."""
        if batch_size < 1:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be at least 1")
        limit = self.config.max_position_embeddings
        if not 1 <= max_length <= limit:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in 1..{limit}")

    # ------------------------------------------------------------------ tensors it carries

    @staticmethod
    def tensor(message: pb.Tensor, what: str, *, ndim: int, allowed: tuple[str, ...],
               last_dim: int | None = None, check_shape: Callable[[tuple[int, ...]], None] | None = None
               ) -> torch.Tensor:
        """`codec.decode`, a malformed tensor refused as INVALID_ARGUMENT; `check_shape` (which raises a
        `PeerError` of its own) sees the declared shape before any data is inflated."""
        try:
            return decode(message, what=what, ndim=ndim, last_dim=last_dim, allowed=allowed, check_shape=check_shape)
        except WireError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    @staticmethod
    def header(message: pb.Tensor, what: str, *, ndim: int, allowed: tuple[str, ...],
               check_shape: Callable[[tuple[int, ...]], None] | None = None) -> None:
        """What `tensor` checks before it decodes (`codec.check_header`, then `check_shape`), without decoding:
        a request of many tensors is checked whole before the first is inflated."""
        try:
            _, shape, _ = check_header(message, what=what, ndim=ndim, allowed=allowed)
        except WireError as error:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if check_shape is not None:
            check_shape(shape)

    def states(self, message: pb.Tensor, what: str,
               check_shape: Callable[[tuple[int, ...]], None] | None = None) -> torch.Tensor:
        """Float [batch, length, hidden_size]: hidden states, or a gradient with respect to them."""
        return self.tensor(message, what, ndim=3, last_dim=self.config.hidden_size, allowed=FLOAT_DTYPES,
                           check_shape=check_shape)

    def hidden(self, message: pb.Tensor, per: str, fits: Callable[[int, int], None] | None = None
               ) -> torch.Tensor:
        """A request's hidden states: at least one token of one row, `fits(batch, length)` (the caller's own
        bounds, e.g. a session's batch), at most `max_forward_tokens` per `per` (a Forward, a micro-batch, an
        inference step) and no longer than the model's positions, all checked on the declared shape before
        anything is inflated. The length bound is the one a session's `max_length` has: past it the positions
        mean nothing to the model, and the attention of one long row grows with the square of its length."""

        def check(shape: tuple[int, ...]) -> None:
            batch, length = shape[:2]
            if batch < 1 or length < 1:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden_states shape {list(shape)} is empty")
            if fits is not None:
                fits(batch, length)
            self.check_tokens(batch, length, per)
            limit = self.config.max_position_embeddings
            if length > limit:
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hidden_states length {length} exceeds the model's {limit} positions")

        return self.states(message, "hidden_states", check)

    def mask(self, message, batch: int, length: int) -> torch.Tensor:
        """`message.attention_mask` as 0/1 longs of [batch, length]; all ones when the message has none."""
        if not message.HasField("attention_mask"):
            return torch.ones(batch, length, dtype=torch.long)
        mask = self._index(message.attention_mask, "attention_mask", batch, length, MASK_DTYPES)
        if ((mask != 0) & (mask != 1)).any():
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "attention_mask must hold only 0 and 1")
        return mask.long()

    def positions(self, message, batch: int, length: int, mask: torch.Tensor) -> torch.Tensor:
        """`message.position_ids` within the model's positions; when the message has none, those `mask`
        implies (left padding skipped, as transformers does)."""
        if not message.HasField("position_ids"):
            return position_ids_from_mask(mask)
        positions = self._index(message.position_ids, "position_ids", batch, length, INDEX_DTYPES).long()
        limit = self.config.max_position_embeddings
        if ((positions < 0) | (positions >= limit)).any():
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, f"position_ids must be in 0..{limit - 1}")
        return positions

    def _index(self, message: pb.Tensor, what: str, batch: int, length: int, allowed: tuple[str, ...]
               ) -> torch.Tensor:
        """A [batch, length] tensor of the hidden states it goes with; the shape is checked before decoding."""

        def check(shape: tuple[int, ...]) -> None:
            if shape != (batch, length):
                raise PeerError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{what} shape {list(shape)} does not match hidden_states ({batch}, {length})")

        return self.tensor(message, what, ndim=2, allowed=allowed, check_shape=check)
