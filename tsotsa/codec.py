"""Tensors on the wire: torch <-> `tsotsa.v1.Tensor`, with every size, shape and dtype checked before use.

Decoding never trusts the sender: a tensor whose byte count does not match its shape and dtype, whose
dtype is not allowed, or whose shape the caller did not expect is rejected with `WireError`, which the
services turn into INVALID_ARGUMENT. Every check on the declared dtype and shape comes before a byte of
data is copied or inflated, and compressed data is inflated only up to the byte count the declared shape
allows: half a MiB of zlib can claim 512 MiB of zeros.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch

from tsotsa.v1 import tsotsa_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Hidden states may be compressed; past this many decompressed bytes a message is refused.
MAX_TENSOR_BYTES = 512 * 1024 * 1024
# More dimensions than any tensor of the protocol has; checked before the shape is read into Python ints.
MAX_DIMS = 8


class WireError(ValueError):
    """A tensor message that is malformed or does not fit what the receiver expects."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(f"unsupported dtype {name[:32]!r}; expected one of {sorted(DTYPES)}") from None


def _shape_text(shape) -> str:
    """A shape for an error message, cut short: the details of a status must fit in its trailer (a few KiB)."""
    dims = list(shape[:MAX_DIMS])
    return str(dims) if len(shape) <= MAX_DIMS else f"{str(dims)[:-1]}, ... ({len(shape)} dimensions)]"


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The row-major bytes of a tensor (any dtype, bfloat16 and bool included), on the CPU."""
    # flattened first: a 0-d tensor cannot be viewed as bytes
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `tensor_bytes`; the caller has checked that the sizes agree."""
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return buffer.view(dtype).reshape(shape)


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None, compress: bool = False) -> pb.Tensor:
    """Serializes a tensor, optionally cast to `dtype` for the wire (e.g. bf16 to halve the bytes)."""
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    raw = tensor_bytes(tensor)
    codec = pb.Tensor.RAW
    if compress:
        raw, codec = zlib.compress(raw, 1), pb.Tensor.ZLIB
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=raw, codec=codec)


def check_header(
    message: pb.Tensor,
    *,
    what: str = "tensor",
    ndim: int | None = None,
    last_dim: int | None = None,
    allowed: tuple[str, ...] | None = None,
) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte count a tensor message declares, checked, without reading its data: a
    receiver can check every tensor of a request before it decodes the first."""
    if not message.dtype:
        raise WireError(f"{what}: missing")
    if allowed is not None and message.dtype not in allowed:
        raise WireError(f"{what}: dtype {message.dtype[:32]} not allowed here; expected one of {list(allowed)}")
    dtype = dtype_from_name(message.dtype)
    if ndim is not None and len(message.shape) != ndim:
        raise WireError(f"{what}: expected {ndim} dimensions, got shape {_shape_text(message.shape)}")
    if len(message.shape) > MAX_DIMS:
        raise WireError(f"{what}: shape {_shape_text(message.shape)} has more than {MAX_DIMS} dimensions")
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise WireError(f"{what}: negative dimension in shape {list(shape)}")
    if last_dim is not None and (not shape or shape[-1] != last_dim):
        raise WireError(f"{what}: last dimension must be {last_dim}, got shape {list(shape)}")
    element_size = torch.empty((), dtype=dtype).element_size()
    # Python ints: a product in int64 could wrap around to a small count that a short message matches.
    expected = math.prod(shape) * element_size
    if expected > MAX_TENSOR_BYTES:
        raise WireError(f"{what}: {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    if message.codec not in (pb.Tensor.RAW, pb.Tensor.ZLIB):
        raise WireError(f"{what}: unknown codec {message.codec}")
    return dtype, shape, expected


def decode(
    message: pb.Tensor,
    *,
    what: str = "tensor",
    ndim: int | None = None,
    last_dim: int | None = None,
    allowed: tuple[str, ...] | None = None,
    check_shape: Callable[[tuple[int, ...]], None] | None = None,
) -> torch.Tensor:
    """Deserializes and validates; `what` names the field in error messages.

    `check_shape` gets the declared shape once `check_header` passed and before any data is inflated or
    copied, so a receiver bounds a tensor by what the request may hold (its token limit, a session's batch,
    an adapter's parameter), not only by `MAX_TENSOR_BYTES`; it refuses by raising."""
    dtype, shape, expected = check_header(message, what=what, ndim=ndim, last_dim=last_dim, allowed=allowed)
    if check_shape is not None:
        check_shape(shape)
    data = message.data
    if message.codec == pb.Tensor.ZLIB:
        data = _inflate(data, expected, what)
    if len(data) != expected:
        raise WireError(f"{what}: {len(data)} bytes for shape {list(shape)} of {message.dtype} (need {expected})")
    return tensor_from_bytes(data, dtype, shape)


def _inflate(data: bytes, expected: int, what: str) -> bytes:
    """At most `expected + 1` bytes of the zlib stream `data` (max_length 0 would mean no limit: the + 1
    keeps it positive and shows a stream that holds more than its shape); the stream must end there."""
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(data, expected + 1)
    except zlib.error as exc:
        raise WireError(f"{what}: corrupt zlib data ({exc})") from None
    if len(inflated) > expected:
        raise WireError(f"{what}: zlib data inflates past the {expected} bytes of its shape")
    if not inflater.eof:
        raise WireError(f"{what}: zlib data ends before its stream does (truncated)")
    if inflater.unused_data:
        raise WireError(f"{what}: {len(inflater.unused_data)} bytes after the end of the zlib stream")
    return inflated
