"""Compressed tensors cannot make a peer allocate what their request could never hold, SetAdapter checks a
whole adapter's names and shapes before it decodes any of it, and the other bounds the fuzzing
(tests/test_fuzz_rpcs.py) showed were missing: a row's length, the number of runs, a micro-batch's name, and
refusals whose details quote so much of the request that the client cannot read the status.

Half a MiB of zlib inflates to 512 MiB of zeros, the codec's own ceiling. A peer must refuse such a "bomb"
with INVALID_ARGUMENT (or with the code of the limit its declared shape breaks) without inflating it: the
codec inflates only up to the bytes the declared shape allows, and the peer bounds the declared shape by
what the request may hold (the token limit, the session's batch and length, the forwarded micro-batch, the
adapter's parameters) before it inflates anything. Memory is judged on the peer process's own peak RSS
(VmHWM in /proc/<pid>/status) across the bombs: a generous bound, far below what one inflated bomb costs.

One peer serving blocks 0:2 of the tiny 4-block, hidden-64 model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import swarm_fixture

from tsotsa.codec import MAX_TENSOR_BYTES, WireError, decode, encode
from tsotsa.peer.training import MAX_MICRO_BATCH_ID
from tsotsa.peer.training_rpcs import MAX_PENDING_TOKENS, MAX_RUNS
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from peer_stream import Stream

from rpc_checks import assert_refused, peak_rss
from coordinator_role import coordinator_channel  # peers take training calls from the coordinator only

HIDDEN = 64
TIMEOUT = 60
MAX_GROWTH = 200 << 20   # peak RSS growth allowed over all the bombs; one inflated bomb alone is 512 MiB
Code = grpc.StatusCode
SPEC = pb.LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], seed=7, lr=1e-2, beta1=0.9, beta2=0.999,
                   eps=1e-8)
Q_B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"   # [64, 4]
Q_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"   # [4, 64]

swarm = swarm_fixture(["0:2"])


def zlib_bomb(size: int = MAX_TENSOR_BYTES) -> bytes:
    """zlib.compress(bytes(size)), made a MiB at a time so the test itself never holds `size` bytes."""
    deflater = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [deflater.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + deflater.flush()


BOMB = zlib_bomb()
# A declared shape of exactly MAX_TENSOR_BYTES bytes: the codec's own ceiling lets it through.
HUGE_HIDDEN = [1, MAX_TENSOR_BYTES // (4 * HIDDEN), HIDDEN]


def bomb(shape: list[int], dtype: str = "float32") -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=BOMB, codec=pb.Tensor.ZLIB)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def stub(swarm) -> Iterator[pb_grpc.PeerStub]:
    address = swarm.peers[0].address
    channel = coordinator_channel(swarm, address)
    yield pb_grpc.PeerStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def run(stub, swarm) -> Iterator[str]:
    """An open run with one micro-batch of [1, 3, 64] forwarded, and every RPC warmed up once."""
    stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run="bombs", lora=SPEC), timeout=TIMEOUT)
    assert_serves(stub, swarm.model_id, "bombs")
    stub.TrainForward(pb.TrainForwardRequest(run="bombs", micro_batch="held",
                                             hidden_states=encode(randn(1, 3, HIDDEN))), timeout=TIMEOUT)
    yield "bombs"
    stub.CloseTraining(pb.CloseTrainingRequest(run="bombs"), timeout=TIMEOUT)


def forward(model_id: str, hidden_states: pb.Tensor, **tensors: pb.Tensor) -> pb.ForwardRequest:
    return pb.ForwardRequest(model_id=model_id, start_block=0, end_block=2, hidden_states=hidden_states, **tensors)


def open_session(model_id: str, session_id: str) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, open=pb.OpenSession(
        model_id=model_id, start_block=0, end_block=2, batch_size=1, max_length=16))


def step(session_id: str, hidden_states: pb.Tensor, **tensors: pb.Tensor) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.InferenceStep(hidden_states=hidden_states, **tensors))


def adapter_of(stub, run: str) -> tuple[pb.TrainingState, dict[str, torch.Tensor]]:
    reply = stub.GetAdapter(pb.GetAdapterRequest(run=run), timeout=TIMEOUT)
    return reply.state, {item.name: decode(item.tensor) for item in reply.tensors}


def set_adapter(stub, run: str, tensors: dict[str, pb.Tensor]) -> pb.TrainingState:
    return stub.SetAdapter(pb.SetAdapterRequest(run=run, tensors=[
        pb.NamedTensor(name=name, tensor=tensor) for name, tensor in tensors.items()]), timeout=TIMEOUT)


def assert_serves(stub, model_id: str, run: str) -> None:
    """A Forward, an inference step, a training forward and backward, and a SetAdapter all succeed."""
    x = encode(randn(1, 3, HIDDEN))
    assert list(stub.Forward(forward(model_id, x), timeout=TIMEOUT).hidden_states.shape) == [1, 3, HIDDEN]
    with Stream(stub, TIMEOUT) as stream:
        stream.send(open_session(model_id, "valid"))
        assert stream.send(step("valid", x)).cache_length == 3
    stub.TrainForward(pb.TrainForwardRequest(run=run, micro_batch="valid", hidden_states=x), timeout=TIMEOUT)
    reply = stub.TrainBackward(pb.TrainBackwardRequest(run=run, micro_batch="valid", grad_output=x,
                                                       want_grad_input=True), timeout=TIMEOUT)
    assert list(reply.grad_input.shape) == [1, 3, HIDDEN]
    _, adapter = adapter_of(stub, run)
    set_adapter(stub, run, {name: encode(tensor) for name, tensor in adapter.items()})


# ------------------------------------------------------------------------------------ the codec alone


def test_decode_inflates_no_more_than_the_declared_shape() -> None:
    with pytest.raises(WireError, match="inflates past the 768 bytes of its shape"):
        decode(bomb([1, 3, HIDDEN]))


def test_decode_checks_the_declared_shape_before_inflating() -> None:
    """`check_shape` refuses a shape before a byte is inflated: corrupt data is never even looked at."""

    def refuse(shape: tuple[int, ...]) -> None:
        raise ValueError(f"refused {list(shape)}")

    corrupt = pb.Tensor(dtype="float32", shape=HUGE_HIDDEN, data=b"not zlib", codec=pb.Tensor.ZLIB)
    with pytest.raises(ValueError, match=r"refused \[1, 2097152, 64\]"):
        decode(corrupt, check_shape=refuse)


def test_decode_wants_one_whole_zlib_stream() -> None:
    x = torch.arange(12, dtype=torch.float32)
    whole = zlib.compress(x.numpy().tobytes())
    assert torch.equal(decode(pb.Tensor(dtype="float32", shape=[12], data=whole, codec=pb.Tensor.ZLIB)), x)
    with pytest.raises(WireError, match="4 bytes after the end of the zlib stream"):
        decode(pb.Tensor(dtype="float32", shape=[12], data=whole + b"junk", codec=pb.Tensor.ZLIB))
    with pytest.raises(WireError, match="truncated"):  # every byte of data but not the stream's end (checksum)
        decode(pb.Tensor(dtype="float32", shape=[12], data=whole[:-4], codec=pb.Tensor.ZLIB))


# ------------------------------------------------------------------------------------ bombs at a peer


def bombs(model_id: str, run: str, adapter: dict[str, torch.Tensor]
          ) -> dict[str, tuple[Callable[[pb_grpc.PeerStub], object], Code, str]]:
    """name: (a call carrying a bomb, status code, text in the details); `adapter` is the run's."""
    x = encode(randn(1, 3, HIDDEN))
    good = {name: encode(tensor) for name, tensor in adapter.items()}

    def in_session(name: str, *requests: pb.InferenceRequest) -> Callable[[pb_grpc.PeerStub], object]:
        def call(stub):
            with Stream(stub, TIMEOUT) as stream:
                stream.send(open_session(model_id, name))
                for request in requests:
                    stream.send(request)
        return call

    def train_forward(hidden_states: pb.Tensor, **tensors: pb.Tensor):
        return lambda stub: stub.TrainForward(pb.TrainForwardRequest(
            run=run, micro_batch="bomb", hidden_states=hidden_states, **tensors), timeout=TIMEOUT)

    def train_backward(grad: pb.Tensor):
        return lambda stub: stub.TrainBackward(pb.TrainBackwardRequest(run=run, micro_batch="held", grad_output=grad),
                                               timeout=TIMEOUT)

    inflates_past = "inflates past the 768 bytes of its shape"
    return {
        # the declared shape fits the request: the codec stops inflating one byte past it
        "Forward hidden": (lambda stub: stub.Forward(forward(model_id, bomb([1, 3, HIDDEN])), timeout=TIMEOUT),
                           Code.INVALID_ARGUMENT, f"hidden_states: zlib data {inflates_past}"),
        "Forward mask": (lambda stub: stub.Forward(forward(model_id, x, attention_mask=bomb([1, 3], "int64")),
                                                   timeout=TIMEOUT),
                         Code.INVALID_ARGUMENT, "attention_mask: zlib data inflates past the 24 bytes"),
        "Forward positions": (lambda stub: stub.Forward(forward(model_id, x, position_ids=bomb([1, 3], "int64")),
                                                        timeout=TIMEOUT),
                              Code.INVALID_ARGUMENT, "position_ids: zlib data inflates past the 24 bytes"),
        "Inference step": (in_session("small", step("small", bomb([1, 3, HIDDEN]))), Code.INVALID_ARGUMENT,
                           inflates_past),
        "TrainForward": (train_forward(bomb([1, 3, HIDDEN])), Code.INVALID_ARGUMENT, inflates_past),
        "TrainBackward": (train_backward(bomb([1, 3, HIDDEN])), Code.INVALID_ARGUMENT, inflates_past),
        "SetAdapter": (lambda stub: set_adapter(stub, run, {**good, Q_B0: bomb([64, 4])}), Code.INVALID_ARGUMENT,
                       f"{Q_B0}: zlib data inflates past the 1024 bytes"),
        # the declared shape claims the codec's whole 512 MiB: the request's own bounds refuse it unread
        "Forward of 512 MiB": (lambda stub: stub.Forward(forward(model_id, bomb(HUGE_HIDDEN)), timeout=TIMEOUT),
                               Code.RESOURCE_EXHAUSTED, "2097152 tokens exceed this peer's limit of 8192 per Forward"),
        "Forward mask of 512 MiB": (lambda stub: stub.Forward(forward(
            model_id, x, attention_mask=bomb([1, MAX_TENSOR_BYTES // 8], "int64")), timeout=TIMEOUT),
            Code.INVALID_ARGUMENT, "attention_mask shape [1, 67108864] does not match hidden_states (1, 3)"),
        "Inference step of 512 MiB": (in_session("huge", step("huge", bomb(HUGE_HIDDEN))), Code.OUT_OF_RANGE,
                                      "0 + 2097152 tokens exceed the session's max_length 16"),
        "Inference batch of 512 MiB": (in_session("wide", step("wide", bomb([2048, 1024, HIDDEN]))),
                                       Code.INVALID_ARGUMENT, "hidden_states batch 2048 differs from the session's 1"),
        "Inference mask of 512 MiB": (in_session("mask", step("mask", x, attention_mask=bomb(
            [1, MAX_TENSOR_BYTES // 8], "int64"))), Code.INVALID_ARGUMENT, "attention_mask shape [1, 67108864]"),
        "TrainForward of 512 MiB": (train_forward(bomb(HUGE_HIDDEN)), Code.RESOURCE_EXHAUSTED,
                                    "2097152 tokens exceed this peer's limit of 8192 per micro-batch"),
        "TrainBackward of 512 MiB": (train_backward(bomb(HUGE_HIDDEN)), Code.INVALID_ARGUMENT,
                                     "grad_output shape [1, 2097152, 64] differs from the forwarded [1, 3, 64]"),
        "SetAdapter of 512 MiB": (lambda stub: set_adapter(stub, run, {**good, Q_B0: bomb([1 << 20, 128])}),
                                  Code.INVALID_ARGUMENT, f"{Q_B0} has shape [1048576, 128], expected [64, 4]"),
    }


def test_bombs_are_refused_without_inflating(stub, swarm, run) -> None:
    """Every bomb at once, so that their peak RSS is judged together; then the peer still serves and trains."""
    assert len(BOMB) < 1 << 20  # what travels: half a MiB
    pid = swarm.peers[0].process.pid
    before_state, before = adapter_of(stub, run)
    peak_before = peak_rss(pid)
    for name, (call, code, text) in bombs(swarm.model_id, run, before).items():
        with pytest.raises(grpc.RpcError) as caught:
            call(stub)
        assert (caught.value.code(), text in caught.value.details()) == (code, True), \
            f"{name}: {caught.value.code()}: {caught.value.details()}"
    growth = peak_rss(pid) - peak_before
    assert growth < MAX_GROWTH, f"the peer's peak RSS grew by {growth >> 20} MiB"
    after_state, after = adapter_of(stub, run)
    assert after_state == before_state  # nothing forwarded, backwarded or loaded
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert_serves(stub, swarm.model_id, run)


# ------------------------------------------------------------------ SetAdapter checks before decoding


def _corrupt(shape: list[int]) -> pb.Tensor:
    """A tensor whose header is right and whose data is not zlib: refused the moment it is decoded."""
    return pb.Tensor(dtype="float32", shape=shape, data=b"not zlib", codec=pb.Tensor.ZLIB)


def _set_adapter_cases(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, pb.Tensor], str]]:
    """name: (tensors, text in the details); every case puts a corrupt tensor first, which must not be decoded."""
    rest = {name: encode(tensor) for name, tensor in sorted(adapter.items()) if name != Q_A0}
    first = {Q_A0: _corrupt([4, HIDDEN])}
    other_block = Q_B0.replace("layers.0", "layers.2")
    return {
        "unknown name": ({**first, **rest, other_block: encode(adapter[Q_B0])},
                         f"missing [], unexpected ['{other_block}']"),
        "other run's name": ({**first, **rest, "x" * 10_000: encode(adapter[Q_B0])},
                             "unexpected ['" + "x" * 160 + "']"),
        "missing name": ({**first, **{k: v for k, v in rest.items() if k != Q_B0}},
                         f"missing ['{Q_B0}'], unexpected []"),
        "wrong shape": ({**first, **rest, Q_B0: encode(adapter[Q_B0].t().contiguous())},
                        f"{Q_B0} has shape [4, 64], expected [64, 4]"),
        "wrong dtype": ({**first, **rest, Q_B0: encode(adapter[Q_B0].long())}, f"{Q_B0}: dtype int64 not allowed"),
        "three dims": ({**first, **rest, Q_B0: encode(adapter[Q_B0][None])}, f"{Q_B0}: expected 2 dimensions"),
        "unknown codec": ({**first, **rest, Q_B0: pb.Tensor(dtype="float32", shape=[64, 4], data=bytes(1024),
                                                            codec=9)}, f"{Q_B0}: unknown codec 9"),
    }


@pytest.mark.parametrize("case", list(_set_adapter_cases({Q_A0: torch.zeros(4, HIDDEN), Q_B0: torch.zeros(64, 4)})))
def test_set_adapter_checks_names_and_shapes_before_decoding(stub, swarm, run, case: str) -> None:
    """The refusal is about the names or shapes, not about the corrupt tensor before them, and changes nothing."""
    before_state, before = adapter_of(stub, run)
    tensors, text = _set_adapter_cases(before)[case]
    assert_refused(lambda: set_adapter(stub, run, tensors), Code.INVALID_ARGUMENT, text)
    after_state, after = adapter_of(stub, run)
    assert after_state == before_state
    assert all(torch.equal(before[key], after[key]) for key in before)
    # the corrupt tensor is refused for what it is once everything else is right
    good = {name: encode(tensor) for name, tensor in before.items()}
    assert_refused(lambda: set_adapter(stub, run, {**good, Q_A0: _corrupt([4, HIDDEN])}), Code.INVALID_ARGUMENT,
                   f"{Q_A0}: corrupt zlib data")
    assert_serves(stub, swarm.model_id, run)




# ----------------------------------------------------------------------------- other bounds


def test_rows_longer_than_the_model_are_refused(stub, swarm, run) -> None:
    """Like a session's max_length: positions past the model's mean nothing, and attention grows with length²."""
    too_long = encode(torch.zeros(1, 2049, HIDDEN))
    text = "hidden_states length 2049 exceeds the model's 2048 positions"
    assert_refused(lambda: stub.Forward(forward(swarm.model_id, too_long), timeout=TIMEOUT), Code.INVALID_ARGUMENT,
                   text)
    assert_refused(lambda: stub.TrainForward(pb.TrainForwardRequest(
        run=run, micro_batch="long", hidden_states=too_long), timeout=TIMEOUT), Code.INVALID_ARGUMENT, text)
    reply = stub.Forward(forward(swarm.model_id, encode(torch.zeros(1, 2048, HIDDEN))), timeout=TIMEOUT)
    assert list(reply.hidden_states.shape) == [1, 2048, HIDDEN]
    assert_serves(stub, swarm.model_id, run)


def test_runs_per_peer_are_capped(stub, swarm, run) -> None:
    """Each run holds an adapter and an optimizer: a peer refuses the one past MAX_RUNS and changes nothing."""
    extra = [f"cap-{i}" for i in range(MAX_RUNS - 1)]  # with `run`, MAX_RUNS in all
    try:
        for name in extra:
            stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run=name, lora=SPEC), timeout=TIMEOUT)
        assert_refused(lambda: stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run="one-more",
                                                                         lora=SPEC), timeout=TIMEOUT),
                       Code.RESOURCE_EXHAUSTED, f"this peer trains {MAX_RUNS} runs already")
        assert_refused(lambda: stub.GetAdapter(pb.GetAdapterRequest(run="one-more"), timeout=TIMEOUT), Code.NOT_FOUND,
                       "run 'one-more' is not open")
        # reopening one that is open is no new run
        assert stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run=extra[0], lora=SPEC),
                                 timeout=TIMEOUT).run == extra[0]
    finally:
        for name in extra:
            stub.CloseTraining(pb.CloseTrainingRequest(run=name), timeout=TIMEOUT)
    stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run="one-more", lora=SPEC), timeout=TIMEOUT)
    stub.CloseTraining(pb.CloseTrainingRequest(run="one-more"), timeout=TIMEOUT)
    assert_serves(stub, swarm.model_id, run)


def test_pending_activations_are_capped_per_peer(stub, swarm, run) -> None:
    """Micro-batches awaiting backward keep their activations: past MAX_PENDING_TOKENS over all runs a peer
    refuses more (busy, not wrong) until some are backwarded or discarded."""
    batch, length = 4, 2048
    full = MAX_PENDING_TOKENS // (batch * length)
    other = "pending-cap"
    stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run=other, lora=SPEC), timeout=TIMEOUT)
    try:
        for index in range(full):  # spread over two runs: the cap is the peer's, not a run's
            stub.TrainForward(pb.TrainForwardRequest(run=(run, other)[index % 2], micro_batch=f"p{index}",
                                                     hidden_states=encode(randn(batch, length, HIDDEN))),
                              timeout=TIMEOUT)
        one_more = lambda: stub.TrainForward(pb.TrainForwardRequest(  # noqa: E731
            run=run, micro_batch="one-more", hidden_states=encode(randn(1, 8, HIDDEN))), timeout=TIMEOUT)
        assert_refused(one_more, Code.RESOURCE_EXHAUSTED, "await backward on this peer")
        stub.Discard(pb.DiscardRequest(run=other), timeout=TIMEOUT)
        one_more()  # room again
    finally:
        stub.Discard(pb.DiscardRequest(run=run), timeout=TIMEOUT)
        stub.CloseTraining(pb.CloseTrainingRequest(run=other), timeout=TIMEOUT)


@pytest.mark.parametrize("name", ["", "m" * (MAX_MICRO_BATCH_ID + 1)])
def test_micro_batch_names_are_bounded(stub, swarm, run, name: str) -> None:
    """A name is kept until its backward, 64 per run: 1..128 characters, as a session id."""
    before = adapter_of(stub, run)[0].pending
    assert_refused(lambda: stub.TrainForward(pb.TrainForwardRequest(run=run, micro_batch=name,
                                                                    hidden_states=encode(randn(1, 3, HIDDEN))),
                                             timeout=TIMEOUT),
                   Code.INVALID_ARGUMENT, f"a micro-batch's name must have 1..{MAX_MICRO_BATCH_ID} characters")
    assert adapter_of(stub, run)[0].pending == before
    assert_serves(stub, swarm.model_id, run)


def test_repeated_fields_are_counted_before_they_are_read(stub, swarm, run) -> None:
    """Millions of one-letter names in a few MiB would be millions of Python strings: refused by their count."""
    spec = pb.LoraSpec()
    spec.CopyFrom(SPEC)
    spec.target_modules.extend(["q_proj"] * 8)
    assert_refused(lambda: stub.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run="many", lora=spec),
                                             timeout=TIMEOUT), Code.INVALID_ARGUMENT, "at most 7 target modules, not 10")
    _, adapter = adapter_of(stub, run)
    many = [pb.NamedTensor()] * (2 * len(adapter) + 1)
    assert_refused(lambda: stub.SetAdapter(pb.SetAdapterRequest(run=run, tensors=many), timeout=TIMEOUT),
                   Code.INVALID_ARGUMENT, f"{2 * len(adapter) + 1} adapter tensors; this peer's blocks have "
                   f"{len(adapter)}")
    assert_serves(stub, swarm.model_id, run)


LONG = "x" * 70_000  # the client reads a status's details up to 16 KiB; past that it sees RESOURCE_EXHAUSTED


def _long_requests(model_id: str, run: str) -> dict[str, tuple[Callable[[pb_grpc.PeerStub], object], Code, str]]:
    x = encode(randn(1, 3, HIDDEN))
    many_dims = pb.Tensor(dtype="float32", shape=[1] * 100_000, data=bytes(4))
    long_spec = pb.LoraSpec()
    long_spec.CopyFrom(SPEC)
    long_spec.target_modules.append(LONG)

    def in_session(*requests):
        def call(stub):
            with Stream(stub, TIMEOUT) as stream:
                for request in requests:
                    stream.send(request)
        return call

    return {
        "Forward model id": (lambda stub: stub.Forward(forward(LONG, x), timeout=TIMEOUT), Code.FAILED_PRECONDITION,
                             "this peer serves model"),
        "Forward dtype": (lambda stub: stub.Forward(forward(model_id, pb.Tensor(dtype=LONG, shape=[1, 3, HIDDEN])),
                                                    timeout=TIMEOUT), Code.INVALID_ARGUMENT, "not allowed here"),
        "Forward dimensions": (lambda stub: stub.Forward(forward(model_id, many_dims), timeout=TIMEOUT),
                               Code.INVALID_ARGUMENT, "(100000 dimensions)"),
        "session id": (in_session(open_session(model_id, "ok"), step(LONG, x)), Code.NOT_FOUND, "unknown session"),
        "micro-batch": (lambda stub: stub.TrainBackward(pb.TrainBackwardRequest(run=run, micro_batch=LONG,
                                                                                grad_output=x), timeout=TIMEOUT),
                        Code.NOT_FOUND, "was not forwarded here"),
        "OpenTraining model id": (lambda stub: stub.OpenTraining(pb.OpenTrainingRequest(
            model_id=LONG, run="long", lora=SPEC), timeout=TIMEOUT), Code.FAILED_PRECONDITION,
            "this peer serves model"),
        "OpenTraining target module": (lambda stub: stub.OpenTraining(pb.OpenTrainingRequest(
            model_id=model_id, run="long", lora=long_spec), timeout=TIMEOUT), Code.INVALID_ARGUMENT,
            "target modules ['xxx"),
    }


@pytest.mark.parametrize("case", list(_long_requests("m", "r")))
def test_refusals_fit_in_a_status(stub, swarm, run, case: str) -> None:
    """A refusal that quotes the request quotes a bounded part of it: the client reads the peer's own status."""
    call, code, text = _long_requests(swarm.model_id, run)[case]
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()[:300]}"
    assert text in error.details() and len(error.details()) < 2048, error.details()[:300]


def test_peer_survived_without_tracebacks(swarm) -> None:
    peer = swarm.peers[0]
    assert peer.process.process.poll() is None, peer.process.output()
    assert "Traceback" not in "\n".join(peer.process.lines), peer.process.output()
