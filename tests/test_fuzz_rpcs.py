"""Every RPC of the peer and of the coordinator, fuzzed: malformed, truncated, oversized, type-confused and
compressed-bomb requests all end with a gRPC status, no process dies or grows without bound, and each RPC
still serves a valid request afterwards.

The RPCs are read from the proto's service descriptors, so an RPC added later is fuzzed too. Requests go as
raw bytes through a generic channel (`unary_unary(method)` and friends without serializers), so they may be
anything: garbage, a well-typed message cut short or with bytes flipped, a message of another type, one with
a few MiB of unknown field, or a well-typed message built from the input type's fields by hypothesis. The
typed ones start, half the time, from a valid request of the RPC with one field given a wrong value (the
model id, a block range, a tensor's dtype, shape, bytes or codec, a zlib bomb of 512 MiB in half a MiB, a
LoRA setting, a run's config...), which reaches the checks deep inside the services; the other half are built
field by field. Most calls carry the swarm token (and, for UploadData, CreateRun and StopRun, the admin token; for a
peer's training RPCs, the coordinator's credential for the run they name, signed with its key as the
coordinator does); the rest carry none or a wrong one and must be refused as UNAUTHENTICATED
(PERMISSION_DENIED for a missing admin token or run credential).

Judged, for each call: it ends (a per-call deadline; DEADLINE_EXCEEDED counts as a hang) with OK and a reply
that parses, or with a refusal code (INVALID_ARGUMENT, NOT_FOUND, ...). INTERNAL is accepted only as gRPC's
own answer to bytes that are not a message of the input type ("Exception deserializing request!"): from a
service it means an unexpected exception, and UNKNOWN an unhandled one. After each RPC's examples: both
processes are alive, their peak RSS (VmHWM) grew by less than `MAX_GROWTH` since the module's start, and a
valid request of that RPC succeeds.

Bounded: `EXAMPLES` examples per RPC, derandomized (the same examples every run, so CI does not flake on a
new find; set TSOTSA_FUZZ_SEED to explore others), no hypothesis database, no shrinking deadline. A
CreateRun never starts a run: its training data always ends in a line that is not UTF-8, checked after the
config and the name. One real run (1 round of 1 step) is created by the fixture and fuzzed by name.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from finetune_oracle import write_color_task

from rpc_checks import peak_rss
from coordinator_role import coordinator_signer  # peers take training calls from the coordinator only
from tsotsa.auth import CallDetails
from tsotsa.codec import encode
from tsotsa.local_swarm import LocalSwarm
from tsotsa.run_credentials import METADATA_KEY as CREDENTIAL_KEY
from tsotsa.training.lora import LLAMA_LINEARS
from tsotsa.v1 import tsotsa_pb2 as pb

TOKEN = "fuzz-swarm-token"
ADMIN = "fuzz-admin-token"
HIDDEN, BLOCKS = 64, 4
EXAMPLES = int(os.environ.get("TSOTSA_FUZZ_EXAMPLES", 100))  # more, with TSOTSA_FUZZ_SEED, to explore
CALL_TIMEOUT = 30.0       # seconds one call may take before it counts as a hang
MAX_GROWTH = 300 << 20    # peak RSS growth allowed per process over the whole module
PEER_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"]
COORDINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
ALL_MESSAGES = list(pb.DESCRIPTOR.message_types_by_name.values())
Code = grpc.StatusCode
# What a refused request may get. INTERNAL only with gRPC's own deserialization message (see `judge`).
REFUSALS = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.NOT_FOUND, Code.ALREADY_EXISTS,
            Code.RESOURCE_EXHAUSTED, Code.PERMISSION_DENIED}
UNDECODABLE = "Exception deserializing request!"
SPEC = pb.LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], seed=7, lr=1e-2, beta1=0.9, beta2=0.999,
                   eps=1e-8)
RUN = "fuzz"            # the peer's run, opened by the `peer_run` fixture
FINISHED = "fuzz-done"  # the coordinator's run, trained to the end by the `finished_run` fixture


def zlib_bomb(size: int = 512 << 20) -> bytes:
    """zlib.compress(bytes(size)), made a MiB at a time so the test never holds `size` bytes."""
    deflater = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join(deflater.compress(chunk) for _ in range(size >> 20)) + deflater.flush()


BOMB = zlib_bomb()
# hypothesis describes strategies that hold BOMB and long strings at length; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


# ----------------------------------------------------------------------------------------- the swarm


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory) -> Iterator[LocalSwarm]:
    """A private swarm (swarm and admin tokens) of one peer serving all 4 blocks, with small session caps."""
    with LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN, admin_token=ADMIN) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:4"], "--max-sessions", "8", "--cache-mib", "16", "--open-timeout", "5",
                        "--admission-wait", "0")  # refused at once when full: fuzzing opens many
        yield swarm


SIGN = "x-fuzz-sign"  # how `SignRuns` signs a call: "run" (its own run), "none", "other" (another run's)


class SignRuns(grpc.UnaryUnaryClientInterceptor):
    """Adds, to a peer's training call of raw bytes, the coordinator's credential for the run those bytes name
    (as the coordinator would), or none, or one for another run, as the call's SIGN metadata says."""

    def __init__(self, signer, model_id: str) -> None:
        self.signer, self.model_id = signer, model_id

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [(key, value) for key, value in details.metadata or () if key != SIGN]
        how = dict(details.metadata or ()).get(SIGN, "run")
        method = PEER_SERVICE.methods_by_name.get(details.method.rsplit("/", 1)[-1])
        if method is not None and "run" in method.input_type.fields_by_name and how != "none":
            try:
                run = GetMessageClass(method.input_type).FromString(request).run
            except DecodeError:
                run = ""
            run = run[:128] + ("-other" if how == "other" else "")  # the coordinator signs only short names
            metadata.append((CREDENTIAL_KEY, self.signer.credential(self.model_id, run)))
        return continuation(CallDetails(details, metadata), request)


def trains(method: MethodDescriptor) -> bool:
    """A peer's training RPC, which needs the coordinator's credential for the run it names."""
    return method in PEER_SERVICE.methods and "run" in method.input_type.fields_by_name


@dataclass
class Target:
    """One process under fuzzing: its gRPC channel and its peak RSS when the module started."""
    name: str
    address: str
    pid: int
    channel: grpc.Channel
    baseline: int = 0

    def alive(self, swarm: LocalSwarm) -> bool:
        process = swarm.coordinator if self.name == "coordinator" else swarm.peers[0].process
        return process.process.poll() is None


@pytest.fixture(scope="module")
def targets(swarm) -> Iterator[dict[str, Target]]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20),
               ("grpc.enable_http_proxy", 0)]
    peer_channel = grpc.intercept_channel(grpc.insecure_channel(swarm.peers[0].address, options=options),
                                          SignRuns(coordinator_signer(swarm), swarm.model_id))
    found = {
        "Peer": Target("peer", swarm.peers[0].address, swarm.peers[0].process.pid, peer_channel),
        "Coordinator": Target("coordinator", swarm.coordinator_address, swarm.coordinator.pid,
                              grpc.insecure_channel(swarm.coordinator_address, options=options)),
    }
    yield found
    for target in found.values():
        target.channel.close()


def path(service, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


def metadata(auth: str = "token", admin: str = "admin", sign: str = "run") -> list[tuple[str, str]]:
    pairs = {"token": [("authorization", f"Bearer {TOKEN}")], "none": [],
             "wrong": [("authorization", "Bearer not-the-token")]}[auth]
    pairs += {"admin": [("x-tsotsa-admin", ADMIN)], "none": [], "wrong": [("x-tsotsa-admin", "not-admin")]}[admin]
    return pairs + [(SIGN, sign)]


class Sent(list):
    """The request bytes of one call, shown short: hypothesis prints a failing example, which may hold MiBs."""

    def __repr__(self) -> str:
        return f"Sent({[(len(data), data[:120]) for data in self]})"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes] = field(default_factory=list)


def call(channel: grpc.Channel, service, method: MethodDescriptor, requests: list[bytes],
         md: list[tuple[str, str]]) -> Outcome:
    """Sends raw request bytes (one, or a stream) and collects the raw replies; the call's own status."""
    name = path(service, method)
    try:
        if method.client_streaming and method.server_streaming:
            replies = list(channel.stream_stream(name)(iter(requests), timeout=CALL_TIMEOUT, metadata=md))
        elif method.server_streaming:
            replies = list(channel.unary_stream(name)(requests[0], timeout=CALL_TIMEOUT, metadata=md))
        elif method.client_streaming:
            replies = [channel.stream_unary(name)(iter(requests), timeout=CALL_TIMEOUT, metadata=md)]
        else:
            replies = [channel.unary_unary(name)(requests[0], timeout=CALL_TIMEOUT, metadata=md)]
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")
    return Outcome(Code.OK, "", replies)


def judge(method: MethodDescriptor, outcome: Outcome, auth: str, admin: str, sign: str = "run") -> str | None:
    """What is wrong with how the call ended, or None."""
    if auth != "token":
        return None if outcome.code == Code.UNAUTHENTICATED else f"{outcome.code} without the swarm token"
    if "metadata size exceeds" in outcome.details:
        # the client could not read the status the server sent: its details quote too much of the request
        return f"a status whose details do not fit in its trailer ({outcome.code.name}: {outcome.details})"
    if outcome.code == Code.INTERNAL and outcome.details == UNDECODABLE:
        return None  # gRPC's own answer to bytes that are no message of the input type
    if admin != "admin" and method.name in ADMIN_RPCS and outcome.code != Code.PERMISSION_DENIED:
        return f"{outcome.code} without the admin token"
    if sign != "run" and trains(method) and outcome.code != Code.PERMISSION_DENIED:
        return f"{outcome.code} without the coordinator's credential for the run ({sign})"
    if outcome.code == Code.OK:
        reply_type = GetMessageClass(method.output_type)
        for reply in outcome.replies:
            try:
                reply_type.FromString(reply)
            except DecodeError as error:
                return f"OK with a reply that is no {method.output_type.name}: {error}"
        return None
    if outcome.code in REFUSALS:
        return None
    return f"{outcome.code.name}: {outcome.details[:500]}"


ADMIN_RPCS = {"UploadData", "CreateRun", "StopRun"}


# --------------------------------------------------------------------------------------- strategies


@dataclass
class Context:
    """What the swarm is, for requests that are right in all but one field."""
    model_id: str
    adapter: dict[str, pb.Tensor]  # the peer run's adapter, as SetAdapter takes it
    peer_id: str = ""


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1), FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1), FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}
DTYPES = ["float32", "bfloat16", "float16", "int64", "int32", "bool"]
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
# Shapes a request could mean, shapes near them, and shapes of 512 MiB (the codec's own ceiling).
SHAPES = [[1, 3, HIDDEN], [2, 5, HIDDEN], [1, 1, HIDDEN], [1, 3, HIDDEN - 1], [0, 3, HIDDEN], [1, 0, HIDDEN],
          [1, 3], [2, 5], [1, 1], [64, 4], [4, 64], [3, HIDDEN], [], [1], [1, 1, 1, HIDDEN], [1, 2049, HIDDEN],
          [1, 8193, HIDDEN]]
HUGE_SHAPES = [[1, (1 << 21), HIDDEN], [2048, 1024, HIDDEN], [1, 1 << 26], [1 << 20, 128], [(1 << 58) + 1, 1, HIDDEN]]


def _tensor(shape: list[int], dtype: str, codec: int, fill: bytes) -> pb.Tensor:
    """A tensor whose bytes match its shape and dtype (the fill repeated), raw or compressed."""
    size = math.prod(shape) * ELEMENT.get(dtype, 4)
    data = (fill * (size // max(len(fill), 1) + 1))[:size] if fill else bytes(size)
    if codec == pb.Tensor.ZLIB:
        data = zlib.compress(data, 1)
    return pb.Tensor(dtype=dtype, shape=shape, data=data, codec=codec)


def tensors() -> st.SearchStrategy[pb.Tensor]:
    """Well-formed tensors of plausible and implausible shapes, zlib bombs, and anything at all."""
    fills = st.sampled_from([b"", b"\x01", b"\x01\x00\x00\x00\x00\x00\x00\x00", b"\x00\x00\x80\x3f", b"\xff"])
    well_formed = st.builds(_tensor, st.sampled_from(SHAPES), st.sampled_from(DTYPES),
                            st.sampled_from([pb.Tensor.RAW, pb.Tensor.ZLIB]), fills | st.binary(max_size=8))
    bomb = st.builds(lambda shape, dtype: pb.Tensor(dtype=dtype, shape=shape, data=BOMB, codec=pb.Tensor.ZLIB),
                     st.sampled_from(SHAPES + HUGE_SHAPES), st.sampled_from(DTYPES))
    wild = st.builds(pb.Tensor, dtype=st.sampled_from([*DTYPES, "float8", "", "FLOAT32"]) | st.text(max_size=8),
                     shape=st.lists(st.integers(-2, 70) | st.integers(-(1 << 63), (1 << 63) - 1), max_size=5),
                     data=st.binary(max_size=64), codec=st.integers(-3, 5))
    return st.one_of(well_formed, bomb, wild)


def strings(name: str, ctx: Context) -> st.SearchStrategy[str]:
    """Strings a field of this name could hold, right or nearly, and long or odd ones."""
    near = {
        "model_id": [ctx.model_id, ctx.model_id + "x", ""],
        "run": [RUN, FINISHED, "fuzz-other", "", "-bad", "a" * 65, "../../etc"],
        "name": [RUN, FINISHED, "fuzz-new", "", "../x", *list(ctx.adapter)[:2]],
        "session_id": ["s", "", "x" * 129],
        "micro_batch": ["m", "held", ""],
        "adapter": [RUN, FINISHED, "nope", ""],
        "target_modules": [*LLAMA_LINEARS, "lm_head", "", "q_proj "],
        "tensor_prefixes": ["model.norm.", "model.layers.0.", "model.layers.", "lm_head.", "", "../", "model."],
        "file_names": ["tokenizer.json", "config.json", "../config.json", "/etc/passwd", "", "model.safetensors"],
        "lr_schedule": ["constant", "linear", "cosine", "", "exp"],
        "out_dir": ["", "fuzz-out", "/proc/self/x"],
        "dtype": DTYPES,
        "peer_id": [ctx.peer_id, ctx.peer_id + "é", "", "x" * 129],
    }.get(name, [])
    long_ones = st.sampled_from(["x" * 70_000, "é" * 1000, "\x00", "a\nb"])
    return st.one_of(st.sampled_from(near), st.text(max_size=12), long_ones) if near else st.one_of(
        st.text(max_size=12), long_ones)


def scalars(fd: FieldDescriptor, ctx: Context) -> st.SearchStrategy:
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        return strings(fd.name, ctx)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=32), st.sampled_from([BOMB, bytes(1 << 20), b"\xff" * 100]))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from([0.0, -1.0, 1e-3, 0.5, 0.9999, 1.0, math.nan, math.inf, -math.inf, 1e30]),
                         st.floats(width=width))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 4)
    low, high = _INT_RANGES[kind]
    return st.one_of(st.integers(max(low, -2), 9), st.sampled_from([low, high, 2048, 2049, 8193, 1 << 20]),
                     st.integers(low, high))


def values(fd: FieldDescriptor, ctx: Context, depth: int) -> st.SearchStrategy:
    """A value for one field: a list of up to 4 for a repeated field."""
    if fd.message_type is not None:
        one = tensors() if fd.message_type.name == "Tensor" else messages(fd.message_type, ctx, depth + 1)
    else:
        one = scalars(fd, ctx)
    return st.lists(one, max_size=4) if fd.is_repeated else one


def build(cls: type[Message], fields: dict) -> Message:
    message = cls()
    for name, value in fields.items():
        fd = cls.DESCRIPTOR.fields_by_name[name]
        if fd.is_repeated:
            getattr(message, name).extend(value)
        elif fd.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def messages(descriptor: Descriptor, ctx: Context, depth: int = 0) -> st.SearchStrategy[Message]:
    """Well-typed messages of `descriptor`, field by field, any subset of the fields set."""
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {fd.name: st.deferred(lambda fd=fd: values(fd, ctx, depth)) for fd in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda fields: build(cls, fields))


def one_field_wrong(template: Message, ctx: Context) -> st.SearchStrategy[Message]:
    """`template` (a valid request) with one field, possibly nested, given another value."""
    paths: list[tuple[str, ...]] = []

    def walk(descriptor: Descriptor, prefix: tuple[str, ...]) -> None:
        for fd in descriptor.fields:
            paths.append((*prefix, fd.name))
            if fd.message_type is not None and not fd.is_repeated and len(prefix) < 2:
                walk(fd.message_type, (*prefix, fd.name))

    walk(template.DESCRIPTOR, ())

    def with_value(where: tuple[str, ...], value) -> Message:
        message = type(template)()
        message.CopyFrom(template)
        holder = message
        for name in where[:-1]:
            holder = getattr(holder, name)
        holder.ClearField(where[-1])
        build_into(holder, where[-1], value)
        return message

    def field_of(where: tuple[str, ...]) -> FieldDescriptor:
        descriptor = template.DESCRIPTOR
        for name in where[:-1]:
            descriptor = descriptor.fields_by_name[name].message_type
        return descriptor.fields_by_name[where[-1]]

    if not paths:
        return st.just(template)
    return st.sampled_from(paths).flatmap(
        lambda where: values(field_of(where), ctx, 0).map(lambda value: with_value(where, value)))


def build_into(holder: Message, name: str, value) -> None:
    fd = holder.DESCRIPTOR.fields_by_name[name]
    if fd.is_repeated:
        getattr(holder, name).extend(value)
    elif fd.message_type is not None:
        getattr(holder, name).CopyFrom(value)
    else:
        setattr(holder, name, value)


def _unknown_field(size: int) -> bytes:
    """Field 1000, length-delimited, of `size` zero bytes: parses, and is kept as an unknown field."""
    key, length = (1000 << 3) | 2, size
    varint = bytearray()
    for number in (key, length):
        while True:
            byte, number = number & 0x7F, number >> 7
            varint.append(byte | (0x80 if number else 0))
            if not number:
                break
    return bytes(varint) + bytes(size)


def _truncated(data: bytes, cut: int) -> bytes:
    return data[:cut % max(len(data), 1)]


def _flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    if not data:
        return data
    mutable = bytearray(data)
    for where, value in flips:
        mutable[where % len(mutable)] = value
    return bytes(mutable)


def request_bytes(descriptor: Descriptor, templates: list[Message], ctx: Context) -> st.SearchStrategy[bytes]:
    """Bytes sent as one request for an RPC whose input is `descriptor`."""
    # mostly one field wrong, which reaches the checks deepest; sometimes the valid request itself (the state
    # it leaves is the next request's starting point), sometimes a message built field by field
    typed = st.one_of(*(one_field_wrong(t, ctx) for t in templates for _ in range(3)), st.sampled_from(templates),
                      messages(descriptor, ctx))
    typed_bytes = typed.map(lambda message: message.SerializeToString())
    return st.one_of(
        typed_bytes, typed_bytes,  # twice as likely as each of the others
        st.builds(_truncated, typed_bytes, st.integers(0, 1 << 16)),
        st.builds(_flipped, typed_bytes, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                  min_size=1, max_size=4)),
        st.binary(max_size=64),
        st.sampled_from(ALL_MESSAGES).flatmap(lambda other: messages(other, ctx)).map(
            lambda message: message.SerializeToString()),
        st.builds(lambda data, size: data + _unknown_field(size), typed_bytes, st.sampled_from([1 << 20, 8 << 20])),
    )


# ---------------------------------------------------------------------- valid requests, per RPC


def _hidden(batch: int = 1, length: int = 3) -> pb.Tensor:
    return encode(torch.randn(batch, length, HIDDEN))


def _config() -> pb.RunConfig:
    return pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=2, grad_accum=1, seq_len=32, lora_r=4,
                        lora_alpha=8.0, target_modules=["q_proj", "v_proj"], lr=1e-2, seed=1)


def templates(method: str, ctx: Context) -> list[Message] | list[list[Message]]:
    """Valid requests of each RPC (for Inference: valid streams), the starting points of `one_field_wrong`."""
    ones = encode(torch.ones(1, 3, dtype=torch.long))
    forward = pb.ForwardRequest(model_id=ctx.model_id, start_block=0, end_block=BLOCKS, hidden_states=_hidden(),
                                attention_mask=ones, position_ids=encode(torch.arange(3)[None]))
    opened = pb.InferenceRequest(session_id="s", open=pb.OpenSession(model_id=ctx.model_id, start_block=1, end_block=3,
                                                                      batch_size=1, max_length=16))
    stepped = pb.InferenceRequest(session_id="s", step=pb.InferenceStep(hidden_states=_hidden(), attention_mask=ones))
    adapter = [pb.NamedTensor(name=name, tensor=tensor) for name, tensor in sorted(ctx.adapter.items())]
    jsonl = b'{"text": "the color of the sky is blue"}\n'
    valid = {  # built on demand: each is only for the RPC it names
        "Info": lambda: [pb.InfoRequest()],
        "Forward": lambda: [forward, pb.ForwardRequest(
            model_id=ctx.model_id, start_block=2, end_block=3,
            hidden_states=_tensor([2, 5, HIDDEN], "float32", pb.Tensor.ZLIB, b""))],
        "Inference": lambda: [[opened, stepped, stepped]],
        # a valid link whose step names no open session: answered, per step, NOT_FOUND
        "Link": lambda: [[pb.LinkRequest(open=pb.LinkOpen(model_id=ctx.model_id, link_key=bytes(range(16)))),
                          pb.LinkRequest(steps=pb.LinkSteps(steps=[pb.LinkedStep(
                              session_id="s", step=pb.InferenceStep(hidden_states=_hidden(length=1)))]))]],
        "OpenTraining": lambda: [pb.OpenTrainingRequest(model_id=ctx.model_id, run="fuzz-open", lora=SPEC)],
        "TrainForward": lambda: [pb.TrainForwardRequest(run=RUN, micro_batch="m", hidden_states=_hidden(),
                                                        attention_mask=ones)],
        "TrainBackward": lambda: [pb.TrainBackwardRequest(run=RUN, micro_batch="held", grad_output=_hidden(),
                                                          want_grad_input=True)],
        "Step": lambda: [pb.StepRequest(run=RUN, samples=1, lr=1e-3)],
        "Discard": lambda: [pb.DiscardRequest(run=RUN)],
        "GetAdapter": lambda: [pb.GetAdapterRequest(run=RUN)],
        "SetAdapter": lambda: [pb.SetAdapterRequest(run=RUN, tensors=adapter)],
        "CloseTraining": lambda: [pb.CloseTrainingRequest(run="fuzz-close", keep=False)],
        "GetModelInfo": lambda: [pb.ModelInfoRequest()],
        "SwarmStatus": lambda: [pb.SwarmStatusRequest()],
        "ReportPeer": lambda: [pb.PeerReport(model_id=ctx.model_id, peer_id=ctx.peer_id or "Qm", start_block=0,
                                             end_block=BLOCKS, reason="a fuzzing test's report")],
        "Fetch": lambda: [pb.FetchRequest(model_id=ctx.model_id, tensor_prefixes=["model.norm."],
                                          file_names=["tokenizer.json"])],
        # never starts a run: the last line of its data is not UTF-8 (the config and the name are checked first)
        "CreateRun": lambda: [pb.CreateRunRequest(name="fuzz-new", config=_config(), train_name="train.jsonl",
                                                  train_data=jsonl + b"\xff\n", eval_data=jsonl)],
        # valid streams: one chunk, and two (name and size first, sha256 last); each leaves an upload kept
        # until the coordinator's cap on pending uploads drops the oldest
        "UploadData": lambda: [_upload(jsonl * 3, 1 << 20), _upload(jsonl * 3, len(jsonl))],
        "StopRun": lambda: [pb.RunRequest(name=FINISHED)],
        "GetRun": lambda: [pb.RunRequest(name=FINISHED)],
        "ListRuns": lambda: [pb.ListRunsRequest()],
        "WatchRun": lambda: [pb.RunRequest(name=FINISHED)],
        "CoordinatorGetAdapter": lambda: [pb.AdapterRequest(run=FINISHED, start_block=1, end_block=3)],
    }
    return valid[method]() if method in valid else []


def _upload(data: bytes, chunk: int) -> list[pb.DataChunk]:
    """A valid UploadData stream of DATA in chunks of CHUNK bytes."""
    chunks = [pb.DataChunk(data=data[first:first + chunk]) for first in range(0, len(data), chunk)]
    chunks[0].name, chunks[0].total_bytes = "fuzz.jsonl", len(data)
    chunks[-1].sha256 = hashlib.sha256(data).hexdigest()
    return chunks


def never_starts_a_run(data: bytes) -> bytes:
    """A CreateRun whose training data parses as far as it may, and fails on its last line."""
    request = pb.CreateRunRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return data
    request.train_data += b"\n\xff"
    return request.SerializeToString()


# ------------------------------------------------------------------------------- run fixtures


@pytest.fixture(scope="module")
def peer_run(swarm, targets) -> Context:
    """The peer's run RUN, open throughout, and what the strategies need to know of the swarm."""
    channel = targets["Peer"].channel
    state = GetMessageClass(pb.TrainingState.DESCRIPTOR)
    opened = call(channel, PEER_SERVICE, PEER_SERVICE.methods_by_name["OpenTraining"],
                  [pb.OpenTrainingRequest(model_id=swarm.model_id, run=RUN, lora=SPEC).SerializeToString()], metadata())
    assert opened.code == Code.OK, opened.details
    assert state.FromString(opened.replies[0]).trainable_parameters > 0
    got = call(channel, PEER_SERVICE, PEER_SERVICE.methods_by_name["GetAdapter"],
               [pb.GetAdapterRequest(run=RUN).SerializeToString()], metadata())
    assert got.code == Code.OK, got.details
    adapter = {item.name: item.tensor for item in pb.AdapterState.FromString(got.replies[0]).tensors}
    assert adapter
    return Context(swarm.model_id, adapter, swarm.peers[0].peer_id)


@pytest.fixture(scope="module")
def finished_run(swarm, targets, peer_run, tmp_path_factory) -> str:
    """FINISHED, a real run of one round of one step on the swarm, waited for to the end through WatchRun."""
    data = write_color_task(tmp_path_factory.mktemp("fuzz-data") / "colors.jsonl").read_bytes()
    channel = targets["Coordinator"].channel
    created = call(channel, COORDINATOR_SERVICE, COORDINATOR_SERVICE.methods_by_name["CreateRun"],
                   [pb.CreateRunRequest(name=FINISHED, config=_config(), train_name="colors.jsonl",
                                        train_data=data).SerializeToString()], metadata())
    assert created.code == Code.OK, created.details
    watched = call(channel, COORDINATOR_SERVICE, COORDINATOR_SERVICE.methods_by_name["WatchRun"],
                   [pb.RunRequest(name=FINISHED).SerializeToString()], metadata())
    assert watched.code == Code.OK, watched.details
    got = call(channel, COORDINATOR_SERVICE, COORDINATOR_SERVICE.methods_by_name["GetRun"],
               [pb.RunRequest(name=FINISHED).SerializeToString()], metadata())
    info = pb.RunInfo.FromString(got.replies[0])
    assert info.state == "finished", info.message
    return FINISHED


# ---------------------------------------------------------------------------------- preparing


def prepare(method: str, channel: grpc.Channel, ctx: Context) -> None:
    """Before each example: what the RPC's valid request needs on the peer (a micro-batch to backward, a run
    to close), so that a one-field-wrong request meets the checks after those."""
    def unary(name: str, request: Message) -> Outcome:
        return call(channel, PEER_SERVICE, PEER_SERVICE.methods_by_name[name], [request.SerializeToString()],
                    metadata())

    if method == "TrainBackward":
        outcome = unary("TrainForward", pb.TrainForwardRequest(run=RUN, micro_batch="held", hidden_states=_hidden()))
        assert outcome.code in (Code.OK, Code.ALREADY_EXISTS), outcome.details
    elif method == "CloseTraining":
        outcome = unary("OpenTraining", pb.OpenTrainingRequest(model_id=ctx.model_id, run="fuzz-close", lora=SPEC))
        assert outcome.code == Code.OK, outcome.details
    elif method in ("Step", "TrainForward"):  # a step must not wait on pending work; "m" may be forwarded again
        assert unary("Discard", pb.DiscardRequest(run=RUN)).code == Code.OK


def cleanup(channel: grpc.Channel, ctx: Context, opened: set[str]) -> None:
    """After an RPC's examples: the runs the fuzzing opened on the peer are closed, so they hold no memory, and
    RUN is open again (a CloseTraining may have closed it; reopened, its adapter has the same shapes)."""
    close = PEER_SERVICE.methods_by_name["CloseTraining"]
    for run in sorted((opened | {"fuzz-open", "fuzz-close"}) - {RUN}):
        outcome = call(channel, PEER_SERVICE, close, [pb.CloseTrainingRequest(run=run).SerializeToString()], metadata())
        assert outcome.code in (Code.OK, Code.NOT_FOUND), outcome.details
    reopened = call(channel, PEER_SERVICE, PEER_SERVICE.methods_by_name["OpenTraining"],
                    [pb.OpenTrainingRequest(model_id=ctx.model_id, run=RUN, lora=SPEC).SerializeToString()], metadata())
    assert reopened.code == Code.OK, reopened.details


# ------------------------------------------------------------------------------------- the fuzzing


def fuzz(service, method: MethodDescriptor, target: Target, swarm: LocalSwarm, ctx: Context) -> None:
    key = "CoordinatorGetAdapter" if service is COORDINATOR_SERVICE and method.name == "GetAdapter" else method.name
    valid = templates(key, ctx)
    opened: set[str] = set()
    seen: Counter[str] = Counter()
    if method.client_streaming:
        streams = valid or [[]]
        one = request_bytes(method.input_type, [m for stream in streams for m in stream], ctx)
        requests = st.lists(one, min_size=1, max_size=4) | st.builds(
            lambda stream, where, replacement: [m.SerializeToString() for m in stream[:where]] + [replacement] + [
                m.SerializeToString() for m in stream[where + 1:]],
            st.sampled_from(streams), st.integers(0, max(len(s) for s in streams) - 1), one)
    else:
        requests = request_bytes(method.input_type, valid, ctx).map(lambda data: [data])
    auths = st.sampled_from(["token"] * 8 + ["none", "wrong"])
    admins = st.sampled_from(["admin"] * 4 + ["none", "wrong"]) if method.name in ADMIN_RPCS else st.just("admin")
    signs = st.sampled_from(["run"] * 8 + ["none", "other"]) if trains(method) else st.just("run")

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("TSOTSA_FUZZ_SEED"),
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(requests=requests.map(Sent), auth=auths, admin=admins, sign=signs)
    def example(requests: Sent, auth: str, admin: str, sign: str) -> None:
        if method.name == "CreateRun":
            requests = Sent(never_starts_a_run(data) for data in requests)
        prepare(method.name if service is PEER_SERVICE else "", target.channel, ctx)
        outcome = call(target.channel, service, method, requests, metadata(auth, admin, sign))
        seen[outcome.code.name] += 1
        if os.environ.get("TSOTSA_FUZZ_LOG"):
            with open(os.environ["TSOTSA_FUZZ_LOG"], "a") as log:
                log.write(f"{method.name} {auth}/{admin}/{sign} {outcome.code.name} {outcome.details[:150]!r}\n")
        problem = judge(method, outcome, auth, admin, sign)
        assert problem is None, f"{method.name} ({auth}, {admin}, {sign}) with {requests!r}: {problem}"
        assert target.alive(swarm), f"{target.name} died:\n" + (
            swarm.coordinator.output() if target.name == "coordinator" else swarm.peers[0].process.output())
        if method.name == "OpenTraining" and outcome.code == Code.OK:
            opened.add(pb.TrainingState.FromString(outcome.replies[0]).run)

    if os.environ.get("TSOTSA_FUZZ_SEED"):
        example = seed(int(os.environ["TSOTSA_FUZZ_SEED"]))(example)
    try:
        example()
        print(f"{service.name}.{method.name}: {dict(seen.most_common())}")  # shown by pytest -s or -rP
    finally:
        if service is PEER_SERVICE:
            cleanup(target.channel, ctx, opened)


def assert_valid_request_succeeds(service, method: MethodDescriptor, target: Target, ctx: Context) -> None:
    key = "CoordinatorGetAdapter" if service is COORDINATOR_SERVICE and method.name == "GetAdapter" else method.name
    valid = templates(key, ctx)
    assert valid, f"no valid request of {method.name} to check it with: add one to `templates`"
    request = valid[0]
    if method.name == "CreateRun":
        # a real one: a new run of one round, watched to its end (its data fine this time)
        request = pb.CreateRunRequest(name="fuzz-after", config=_config(), train_data=b'{"text": "red blue"}\n' * 8)
    prepare(method.name if service is PEER_SERVICE else "", target.channel, ctx)
    stream = request if isinstance(request, list) else [request]
    outcome = call(target.channel, service, method, [m.SerializeToString() for m in stream], metadata())
    assert outcome.code == Code.OK, f"valid {method.name} after fuzzing: {outcome.code}: {outcome.details}"
    assert judge(method, outcome, "token", "admin") is None
    if method.name == "CreateRun":
        watched = call(target.channel, service, service.methods_by_name["WatchRun"],
                       [pb.RunRequest(name="fuzz-after").SerializeToString()], metadata())
        assert watched.code == Code.OK, watched.details
        events = [pb.RunEvent.FromString(reply) for reply in watched.replies]
        assert events[-1].state == "finished", events[-1].message
    if service is PEER_SERVICE:
        cleanup(target.channel, ctx, set())


def assert_bounded(target: Target) -> None:
    growth = peak_rss(target.pid) - target.baseline
    assert growth < MAX_GROWTH, f"the {target.name}'s peak RSS grew by {growth >> 20} MiB"


@pytest.fixture(scope="module")
def baselines(targets, peer_run, finished_run) -> dict[str, Target]:
    """Peak RSS of both processes once the swarm has served and trained (the fixtures' real run)."""
    for target in targets.values():
        target.baseline = peak_rss(target.pid)
    return targets


def test_every_rpc_is_fuzzed() -> None:
    """The lists below come from the proto: an RPC added later is fuzzed, and needs a valid request here."""
    ctx = Context("m", {})
    for service in (PEER_SERVICE, COORDINATOR_SERVICE):
        for method in service.methods:
            key = "CoordinatorGetAdapter" if service is COORDINATOR_SERVICE and method.name == "GetAdapter" \
                else method.name
            assert templates(key, ctx), f"{service.name}.{method.name} has no valid request in `templates`"


@pytest.mark.parametrize("name", [method.name for method in PEER_SERVICE.methods])
def test_fuzz_peer(name: str, swarm, baselines, peer_run) -> None:
    method, target = PEER_SERVICE.methods_by_name[name], baselines["Peer"]
    fuzz(PEER_SERVICE, method, target, swarm, peer_run)
    assert_bounded(target)
    assert_valid_request_succeeds(PEER_SERVICE, method, target, peer_run)


@pytest.mark.parametrize("name", [method.name for method in COORDINATOR_SERVICE.methods])
def test_fuzz_coordinator(name: str, swarm, baselines, peer_run, finished_run) -> None:
    method, target = COORDINATOR_SERVICE.methods_by_name[name], baselines["Coordinator"]
    fuzz(COORDINATOR_SERVICE, method, target, swarm, peer_run)
    assert_bounded(target)
    assert_valid_request_succeeds(COORDINATOR_SERVICE, method, target, peer_run)


@pytest.mark.parametrize("service", [PEER_SERVICE, COORDINATOR_SERVICE], ids=lambda s: s.name)
def test_message_over_the_limit(service, baselines, swarm) -> None:
    """65 MiB, past the servers' 64 MiB: refused by gRPC itself, and the process is none the bigger for it."""
    target = baselines[service.name]
    method = service.methods[0]
    outcome = call(target.channel, service, method, [_unknown_field(65 << 20)], metadata())
    assert outcome.code == Code.RESOURCE_EXHAUSTED, outcome.details
    assert target.alive(swarm)
    assert_bounded(target)


LONG = "x" * 70_000  # past the client's 16 KiB limit on a status's details


def _overflowing_refusals(model_id: str) -> dict[str, tuple[object, str, Message, grpc.StatusCode]]:
    """name: (service, RPC, request quoting LONG, the code the refusal should have): refusals that once
    quoted a request string whole, making a status the client could not read."""
    bad_data = b'{"text": "a"}\n\xff'
    config = _config()
    config.target_modules.append(LONG)
    schedule = _config()
    schedule.lr_schedule = LONG
    coordinator = COORDINATOR_SERVICE
    cases = {
        "Fetch model id": (coordinator, "Fetch", pb.FetchRequest(model_id=LONG), Code.FAILED_PRECONDITION),
        "Fetch tensor prefix": (coordinator, "Fetch", pb.FetchRequest(model_id=model_id, tensor_prefixes=[LONG]),
                                Code.INVALID_ARGUMENT),
        "Fetch file name": (coordinator, "Fetch", pb.FetchRequest(model_id=model_id, file_names=[LONG]),
                            Code.NOT_FOUND),
        "CreateRun target module": (coordinator, "CreateRun",
                                    pb.CreateRunRequest(name="long", config=config, train_data=bad_data),
                                    Code.INVALID_ARGUMENT),
        "CreateRun schedule": (coordinator, "CreateRun",
                               pb.CreateRunRequest(name="long", config=schedule, train_data=bad_data),
                               Code.INVALID_ARGUMENT),
        "CreateRun train name": (coordinator, "CreateRun", pb.CreateRunRequest(
            name="long", config=_config(), train_name=LONG, train_data=bad_data), Code.INVALID_ARGUMENT),
    }
    # signed for the name's first 128 characters, as `SignRuns` does
    cases["peer run credential"] = (PEER_SERVICE, "Discard", pb.DiscardRequest(run=LONG), Code.PERMISSION_DENIED)
    return cases


@pytest.mark.parametrize("case", list(_overflowing_refusals("m")))
def test_refusals_fit_in_a_status(case: str, swarm, targets) -> None:
    service, name, request, code = _overflowing_refusals(swarm.model_id)[case]
    outcome = call(targets[service.name].channel, service, service.methods_by_name[name],
                   [request.SerializeToString()], metadata())
    assert outcome.code == code, f"{outcome.code}: {outcome.details[:300]}"


def test_processes_survived_without_tracebacks(swarm) -> None:
    """Refusals are expected: neither process logged a stack trace for any of them."""
    for name, process in [("coordinator", swarm.coordinator), ("peer", swarm.peers[0].process)]:
        assert process.process.poll() is None, process.output()
        log = "\n".join(process.lines)
        assert "Traceback" not in log, f"{name}:\n{log[-5000:]}"
