"""Tensors on the wire: torch <-> `tsotsa.v1.Tensor`, with every size, shape and dtype checked before use.

Decoding never trusts the sender: a tensor whose byte count does not match its shape and dtype, whose
dtype is not allowed, or whose shape the caller did not expect is rejected with `WireError`, which the
services turn into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import zlib

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


class WireError(ValueError):
    """A tensor message that is malformed or does not fit what the receiver expects."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


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


def decode(
    message: pb.Tensor,
    *,
    what: str = "tensor",
    ndim: int | None = None,
    last_dim: int | None = None,
    allowed: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """Deserializes and validates; `what` names the field in error messages."""
    if not message.dtype:
        raise WireError(f"{what}: missing")
    if allowed is not None and message.dtype not in allowed:
        raise WireError(f"{what}: dtype {message.dtype} not allowed here; expected one of {list(allowed)}")
    dtype = dtype_from_name(message.dtype)
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise WireError(f"{what}: negative dimension in shape {list(shape)}")
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"{what}: expected {ndim} dimensions, got shape {list(shape)}")
    if last_dim is not None and (not shape or shape[-1] != last_dim):
        raise WireError(f"{what}: last dimension must be {last_dim}, got shape {list(shape)}")
    element_size = torch.empty((), dtype=dtype).element_size()
    # Python ints: a product in int64 could wrap around to a small count that a short message matches.
    expected = math.prod(shape) * element_size
    if expected > MAX_TENSOR_BYTES:
        raise WireError(f"{what}: {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    data = message.data
    if message.codec == pb.Tensor.ZLIB:
        try:
            inflater = zlib.decompressobj()
            data = inflater.decompress(data, expected + 1)
        except zlib.error as exc:
            raise WireError(f"{what}: corrupt zlib data ({exc})") from None
    elif message.codec != pb.Tensor.RAW:
        raise WireError(f"{what}: unknown codec {message.codec}")
    if len(data) != expected:
        raise WireError(f"{what}: {len(data)} bytes for shape {list(shape)} of {message.dtype} (need {expected})")
    return tensor_from_bytes(data, dtype, shape)
