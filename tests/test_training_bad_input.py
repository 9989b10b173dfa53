"""A peer refuses every malformed or out-of-order training request with a precise status code and keeps training.

One swarm of two peers (blocks 0:2 and 2:4 of the tiny 4-block, hidden-64 model). Each case sends requests
straight to a peer over gRPC (OpenTraining … CloseTraining, and Forward / Inference with an adapter), checks
the status code and that the details name the problem, then checks that the refusal changed nothing (the
run's pending micro-batches, its counters, its adapter) and that the next valid request succeeds.

Gradient checkpointing is judged here too: with the same inputs a run that recomputes in Backward gives the
same gradients and the same adapter as one that keeps its activations; and (in one process, where the RNG
can be seeded) the recompute reuses the forward's LoRA dropout masks.

The regression tests at the end reproduce bugs this file found: serving between a micro-batch's forward and
backward lost its gradients, a refused SetAdapter dropped pending work, non-finite settings got through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import start_swarm
from rpc_checks import assert_refused
from coordinator_role import coordinator_channel

from tsotsa.checkpoint import Checkpoint, block_prefix
from tsotsa.codec import decode, encode
from tsotsa.local_swarm import LocalSwarm
from tsotsa.peer.adapters import Adapters
from tsotsa.peer.training import MAX_PENDING, TrainingRun

from tsotsa.spans import BlockSpan, SpanSpec
from tsotsa.training.lora import LoraSettings, OptimizerSettings
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from peer_stream import Stream

HIDDEN = 64
MAX_FORWARD_TOKENS = 8192  # PeerLimits.max_forward_tokens (the default)
TIMEOUT = 60
Code = grpc.StatusCode
SPEC = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=7, lr=1e-2, weight_decay=0.0,
            beta1=0.9, beta2=0.999, eps=1e-8)
# r=4 on q_proj and v_proj (64 -> 64 each, 4 heads without GQA): B is 64x4 per module, 2 modules, 2 blocks
TRAINABLE = 2 * 2 * 64 * 4
Q_B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def swarm(tiny_model, tmp_path_factory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tiny_model, ["0:2", "2:4"], cache_dir=tmp_path_factory.mktemp("cache"))
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def stubs(swarm) -> Iterator[list[pb_grpc.PeerStub]]:
    channels = [coordinator_channel(swarm, peer.address) for peer in swarm.peers]
    yield [pb_grpc.PeerStub(channel) for channel in channels]
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def stub(stubs) -> pb_grpc.PeerStub:
    """The first peer (blocks 0:2)."""
    return stubs[0]


@pytest.fixture
def runs(swarm, stub) -> Iterator[Callable[..., pb.TrainingState]]:
    """Opens runs (on the first peer unless told) and closes those still open when the test ends."""
    opened: list[tuple[pb_grpc.PeerStub, str]] = []

    def open_run(name: str, on: pb_grpc.PeerStub | None = None, **overrides) -> pb.TrainingState:
        target = on or stub
        state = open_training(target, swarm.model_id, name, **overrides)
        opened.append((target, name))
        return state

    yield open_run
    for target, name in opened:
        try:
            target.CloseTraining(pb.CloseTrainingRequest(run=name), timeout=TIMEOUT)
        except grpc.RpcError as error:
            assert error.code() == Code.NOT_FOUND, error.details()  # the test closed it itself


# ------------------------------------------------------------------------------------------ helpers


def spec(**overrides) -> pb.LoraSpec:
    return pb.LoraSpec(**{**SPEC, **overrides})


def open_training(stub: pb_grpc.PeerStub, model_id: str, run: str, **overrides) -> pb.TrainingState:
    return stub.OpenTraining(pb.OpenTrainingRequest(model_id=model_id, run=run, lora=spec(**overrides)),
                             timeout=TIMEOUT)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hidden(batch: int = 1, length: int = 3, dim: int = HIDDEN, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> pb.Tensor:
    return encode(randn(batch, length, dim, seed=seed).to(dtype))


def with_data(tensor: pb.Tensor, data: bytes) -> pb.Tensor:
    """A copy of `tensor` whose bytes no longer match its shape and dtype."""
    return pb.Tensor(dtype=tensor.dtype, shape=tensor.shape, data=data, codec=tensor.codec)


def train_forward(stub, run: str, micro_batch: str, hidden_states: pb.Tensor | None = None,
                  **fields) -> torch.Tensor:
    reply = stub.TrainForward(pb.TrainForwardRequest(
        run=run, micro_batch=micro_batch, hidden_states=hidden() if hidden_states is None else hidden_states,
        **fields), timeout=TIMEOUT)
    return decode(reply.hidden_states)


def train_backward(stub, run: str, micro_batch: str, grad_output: pb.Tensor | None = None,
                   want_grad_input: bool = True) -> pb.TrainBackwardResponse:
    return stub.TrainBackward(pb.TrainBackwardRequest(
        run=run, micro_batch=micro_batch, grad_output=hidden(seed=99) if grad_output is None else grad_output,
        want_grad_input=want_grad_input), timeout=TIMEOUT)


def cycle(stub, run: str, micro_batch: str, x: torch.Tensor, grad: torch.Tensor,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TrainForward then TrainBackward of one micro-batch, nothing in between: (output, grad_input)."""
    fields = {} if mask is None else dict(attention_mask=encode(mask))
    output = train_forward(stub, run, micro_batch, encode(x), **fields)
    reply = train_backward(stub, run, micro_batch, encode(grad))
    return output, decode(reply.grad_input)


def step(stub, run: str, samples: int = 1, lr: float | None = None) -> pb.TrainingState:
    """One optimizer step at `lr` (None: the run's own)."""
    request = pb.StepRequest(run=run, samples=samples) if lr is None else pb.StepRequest(run=run, samples=samples, lr=lr)
    return stub.Step(request, timeout=TIMEOUT)


def get_adapter(stub, run: str) -> tuple[pb.TrainingState, dict[str, torch.Tensor]]:
    reply = stub.GetAdapter(pb.GetAdapterRequest(run=run), timeout=TIMEOUT)
    return reply.state, {item.name: decode(item.tensor) for item in reply.tensors}


def state_of(stub, run: str) -> pb.TrainingState:
    return get_adapter(stub, run)[0]


def set_adapter(stub, run: str, tensors: list[tuple[str, torch.Tensor | pb.Tensor]]) -> pb.TrainingState:
    return stub.SetAdapter(pb.SetAdapterRequest(run=run, tensors=[
        pb.NamedTensor(name=name, tensor=t if isinstance(t, pb.Tensor) else encode(t)) for name, t in tensors]),
        timeout=TIMEOUT)


def forward(stub, model_id: str, x: torch.Tensor, adapter: str = "", start: int = 0, end: int = 2) -> torch.Tensor:
    reply = stub.Forward(pb.ForwardRequest(model_id=model_id, start_block=start, end_block=end,
                                           hidden_states=encode(x), adapter=adapter), timeout=TIMEOUT)
    return decode(reply.hidden_states)


def assert_same_adapter(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        assert left[key].shape == right[key].shape, key
        assert torch.allclose(left[key], right[key], rtol=0, atol=atol), (key, (left[key] - right[key]).abs().max())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_trains(stub, run: str) -> None:
    """A valid forward and backward of a new micro-batch succeed and leave the pending count as it was."""
    before = state_of(stub, run).pending
    name = f"valid-{before}"
    output = train_forward(stub, run, name, hidden(2, 3))
    assert list(output.shape) == [2, 3, HIDDEN]
    reply = train_backward(stub, run, name, hidden(2, 3, seed=5))
    assert list(reply.grad_input.shape) == [2, 3, HIDDEN]
    assert state_of(stub, run).pending == before


def assert_serves(stub, model_id: str) -> None:
    assert list(forward(stub, model_id, randn(1, 3, HIDDEN)).shape) == [1, 3, HIDDEN]


def open_session(model_id: str, adapter: str = "", session_id: str = "s") -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, open=pb.OpenSession(
        model_id=model_id, start_block=0, end_block=2, batch_size=1, max_length=16, adapter=adapter))


def session_step(x: torch.Tensor, session_id: str = "s") -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.InferenceStep(hidden_states=encode(x)))


# ------------------------------------------------------------------------------------ OpenTraining


def test_open_training_state(runs, stubs) -> None:
    state = runs("state")
    assert (state.run, state.start_block, state.end_block) == ("state", 0, 2)
    assert (state.trainable_parameters, state.steps, state.samples, state.pending) == (TRAINABLE, 0, 0, 0)
    other = runs("state", on=stubs[1])
    assert (other.start_block, other.end_block, other.trainable_parameters) == (2, 4, TRAINABLE)


def test_open_training_for_another_model(stub, swarm, runs) -> None:
    assert_refused(lambda: open_training(stub, "other-model", "other"), Code.FAILED_PRECONDITION,
                   f"this peer serves model {swarm.model_id}, not 'other-model'")
    assert_refused(lambda: state_of(stub, "other"), Code.NOT_FOUND, "run 'other' is not open on this peer")
    assert runs("other").run == "other"


BAD_RUN_NAMES = {
    "empty": "",
    "65 characters": "x" * 65,
    "parent directory": "../x",
    "path": "a/b",
    "leading dot": ".hidden",
    "a dot, which peft refuses in adapter names": "v1.2",
    "leading dash": "-x",
    "space": "a b",
    "non-ascii": "r\u00e9sum\u00e9",
}


@pytest.mark.parametrize("case", list(BAD_RUN_NAMES))
def test_bad_run_name(stub, swarm, runs, case: str) -> None:
    name = BAD_RUN_NAMES[case]
    assert_refused(lambda: open_training(stub, swarm.model_id, name), Code.INVALID_ARGUMENT, "bad run name")
    assert runs("x" * 64).run == "x" * 64  # the longest name there may be


BAD_SPECS = {
    # name: (LoraSpec fields, text in the details)
    "rank 0": (dict(r=0), "LoRA rank must be in 1..1024, not 0"),
    "rank past the cap": (dict(r=4_000_000_000), "LoRA rank must be in 1..1024"),
    "alpha 0": (dict(alpha=0.0), "LoRA alpha must be a positive number"),
    "dropout 1.0": (dict(dropout=1.0), "LoRA dropout must be in [0, 1), not 1.0"),
    "negative dropout": (dict(dropout=-0.5), "LoRA dropout must be in [0, 1), not -0.5"),
    "lm_head": (dict(target_modules=["lm_head"]), "target modules ['lm_head'] are not Llama linears"),
    "one unknown among known": (dict(target_modules=["q_proj", "embed_tokens"]),
                                "target modules ['embed_tokens'] are not Llama linears"),
    "no target modules": (dict(target_modules=[]), "target modules (none) are not Llama linears"),
    "lr 0": (dict(lr=0.0), "optimizer settings need finite lr > 0"),
    "negative lr": (dict(lr=-1e-3), "optimizer settings need finite lr > 0"),
    "NaN lr": (dict(lr=math.nan), "optimizer settings need finite lr > 0"),
    "negative weight decay": (dict(weight_decay=-0.1), "weight_decay >= 0"),
    "beta1 1.0": (dict(beta1=1.0), "betas in [0, 1)"),
    "negative beta2": (dict(beta2=-0.1), "betas in [0, 1)"),
    "eps 0": (dict(eps=0.0), "eps > 0"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_lora_spec(stub, swarm, runs, case: str) -> None:
    fields, text = BAD_SPECS[case]
    assert_refused(lambda: open_training(stub, swarm.model_id, "refused", **fields), Code.INVALID_ARGUMENT, text)
    # nothing was attached: no run, no servable adapter of that name
    assert_refused(lambda: state_of(stub, "refused"), Code.NOT_FOUND, "run 'refused' is not open")
    assert_refused(lambda: forward(stub, swarm.model_id, randn(1, 3, HIDDEN), adapter="refused"), Code.NOT_FOUND,
                   "adapter 'refused' is not loaded on this peer")
    # the same name with a valid spec opens (the refused spec was not remembered)
    assert runs("refused").trainable_parameters == TRAINABLE


def test_reopening_a_run(stub, swarm, runs) -> None:
    """The same spec again is a no-op returning the run's current state; another spec is refused."""
    runs("again")
    cycle(stub, "again", "m", randn(1, 3, HIDDEN), randn(1, 3, HIDDEN, seed=1))
    stepped = step(stub, "again", samples=2)
    _, adapter = get_adapter(stub, "again")
    assert open_training(stub, swarm.model_id, "again") == stepped
    for changed in (dict(r=8), dict(alpha=4.0), dict(dropout=0.1), dict(target_modules=["q_proj"]), dict(seed=8),
                    dict(lr=2e-2), dict(weight_decay=0.01), dict(beta2=0.99), dict(eps=1e-6),
                    dict(gradient_checkpointing=True)):
        assert_refused(lambda: open_training(stub, swarm.model_id, "again", **changed), Code.FAILED_PRECONDITION,
                       "run 'again' is already open here with other settings")
    state, after = get_adapter(stub, "again")
    assert state == stepped
    assert_same_adapter(adapter, after)
    assert_trains(stub, "again")


# ------------------------------------------------------------------------------------ TrainForward

_tensor = hidden()

BAD_TRAIN_FORWARDS = {
    # name: (TrainForwardRequest fields, status code, text in the details)
    "hidden size 63": (dict(hidden_states=hidden(dim=63)), Code.INVALID_ARGUMENT,
                       "hidden_states: last dimension must be 64"),
    "two dims": (dict(hidden_states=encode(torch.zeros(3, HIDDEN))), Code.INVALID_ARGUMENT,
                 "hidden_states: expected 3 dimensions"),
    "four dims": (dict(hidden_states=encode(torch.zeros(1, 1, 3, HIDDEN))), Code.INVALID_ARGUMENT,
                  "hidden_states: expected 3 dimensions"),
    "int64 hidden": (dict(hidden_states=encode(torch.zeros(1, 3, HIDDEN, dtype=torch.long))), Code.INVALID_ARGUMENT,
                     "hidden_states: dtype int64 not allowed"),
    "unknown dtype": (dict(hidden_states=pb.Tensor(dtype="float8", shape=[1, 3, HIDDEN], data=bytes(192))),
                      Code.INVALID_ARGUMENT, "hidden_states: dtype float8 not allowed"),
    "missing hidden": (dict(hidden_states=pb.Tensor()), Code.INVALID_ARGUMENT, "hidden_states: missing"),
    "empty batch": (dict(hidden_states=hidden(batch=0)), Code.INVALID_ARGUMENT, "is empty"),
    "truncated bytes": (dict(hidden_states=with_data(_tensor, _tensor.data[:-1])), Code.INVALID_ARGUMENT,
                        f"hidden_states: {len(_tensor.data) - 1} bytes for shape [1, 3, 64]"),
    "oversized bytes": (dict(hidden_states=with_data(_tensor, _tensor.data + bytes(4))), Code.INVALID_ARGUMENT,
                        f"hidden_states: {len(_tensor.data) + 4} bytes for shape [1, 3, 64]"),
    "mask shape": (dict(attention_mask=encode(torch.ones(1, 4, dtype=torch.long))), Code.INVALID_ARGUMENT,
                   "attention_mask shape [1, 4] does not match hidden_states (1, 3)"),
    "mask with a 2": (dict(attention_mask=encode(torch.tensor([[1, 2, 1]]))), Code.INVALID_ARGUMENT,
                      "attention_mask must hold only 0 and 1"),
    "float mask": (dict(attention_mask=encode(torch.ones(1, 3))), Code.INVALID_ARGUMENT,
                   "attention_mask: dtype float32 not allowed"),
    "too many tokens": (dict(hidden_states=hidden(1, 9000)), Code.RESOURCE_EXHAUSTED,
                        f"9000 tokens exceed this peer's limit of {MAX_FORWARD_TOKENS} per micro-batch"),
    "too many tokens over the batch": (dict(hidden_states=hidden(2, MAX_FORWARD_TOKENS // 2 + 1)),
                                       Code.RESOURCE_EXHAUSTED, f"{MAX_FORWARD_TOKENS + 2} tokens exceed"),
}


@pytest.fixture(scope="module")
def forward_run(swarm, stub) -> Iterator[str]:
    """A run with one micro-batch pending throughout, which no refusal may disturb."""
    open_training(stub, swarm.model_id, "fwd")
    train_forward(stub, "fwd", "held")
    yield "fwd"
    stub.CloseTraining(pb.CloseTrainingRequest(run="fwd"), timeout=TIMEOUT)


@pytest.mark.parametrize("case", list(BAD_TRAIN_FORWARDS))
def test_bad_train_forward(stub, forward_run, case: str) -> None:
    fields, code, text = BAD_TRAIN_FORWARDS[case]
    fields = {"hidden_states": hidden(), **fields}
    assert_refused(lambda: stub.TrainForward(pb.TrainForwardRequest(run=forward_run, micro_batch=case, **fields),
                                             timeout=TIMEOUT), code, text)
    assert state_of(stub, forward_run).pending == 1  # only "held": the refused micro-batch was not kept
    assert_refused(lambda: train_backward(stub, forward_run, case), Code.NOT_FOUND,
                   f"micro-batch {case!r} was not forwarded here")
    assert_trains(stub, forward_run)


def test_train_forward_for_an_unknown_run(stub, forward_run) -> None:
    assert_refused(lambda: train_forward(stub, "nope", "m"), Code.NOT_FOUND, "run 'nope' is not open on this peer")
    assert_trains(stub, forward_run)


def test_same_micro_batch_twice(stub, runs) -> None:
    runs("twice")
    first = train_forward(stub, "twice", "m", hidden(seed=1))
    assert_refused(lambda: train_forward(stub, "twice", "m", hidden(seed=2)), Code.ALREADY_EXISTS,
                   "micro-batch 'm' is already forwarded")
    assert state_of(stub, "twice").pending == 1
    # the kept micro-batch is the first one: its backward has the first one's shape and succeeds
    assert list(decode(train_backward(stub, "twice", "m").grad_input).shape) == list(first.shape)
    assert state_of(stub, "twice").pending == 0
    assert list(train_forward(stub, "twice", "m").shape) == [1, 3, HIDDEN]  # a backwarded name may be reused


def test_too_many_pending_micro_batches(stub, runs) -> None:
    runs("full")
    for i in range(MAX_PENDING):
        train_forward(stub, "full", f"m{i}", hidden(1, 1, seed=i))
    assert state_of(stub, "full").pending == MAX_PENDING
    assert_refused(lambda: train_forward(stub, "full", "one-more", hidden(1, 1)), Code.RESOURCE_EXHAUSTED,
                   f"{MAX_PENDING} micro-batches await backward on this peer; backward or discard first")
    assert state_of(stub, "full").pending == MAX_PENDING
    train_backward(stub, "full", "m0", hidden(1, 1))  # one backward frees one slot
    assert list(train_forward(stub, "full", "one-more", hidden(1, 1)).shape) == [1, 1, HIDDEN]
    assert stub.Discard(pb.DiscardRequest(run="full"), timeout=TIMEOUT).pending == 0
    assert_trains(stub, "full")


# ----------------------------------------------------------------------------------- TrainBackward


def test_backward_of_an_unknown_micro_batch(stub, runs) -> None:
    runs("bwd")
    assert_refused(lambda: train_backward(stub, "bwd", "never"), Code.NOT_FOUND,
                   "micro-batch 'never' was not forwarded here")
    assert_refused(lambda: train_backward(stub, "nope", "never"), Code.NOT_FOUND, "run 'nope' is not open")
    assert_trains(stub, "bwd")


BAD_GRADS = {
    # name: (grad_output, text in the details); the micro-batch was forwarded with shape [1, 3, 64]
    "longer": (hidden(1, 4), "grad_output shape [1, 4, 64] differs from the forwarded [1, 3, 64]"),
    "other batch": (hidden(2, 3), "grad_output shape [2, 3, 64] differs from the forwarded [1, 3, 64]"),
    "hidden size 32": (hidden(dim=32), "grad_output: last dimension must be 64"),
    "two dims": (encode(torch.zeros(3, HIDDEN)), "grad_output: expected 3 dimensions"),
    "int64": (encode(torch.zeros(1, 3, HIDDEN, dtype=torch.long)), "grad_output: dtype int64 not allowed"),
    "truncated bytes": (with_data(_tensor, _tensor.data[:-4]), "grad_output: 764 bytes for shape [1, 3, 64]"),
    "missing": (pb.Tensor(), "grad_output: missing"),
}


@pytest.mark.parametrize("case", list(BAD_GRADS))
def test_bad_grad_output(stub, runs, case: str) -> None:
    grad, text = BAD_GRADS[case]
    runs("grad")
    train_forward(stub, "grad", "m", hidden(1, 3))
    assert_refused(lambda: train_backward(stub, "grad", "m", grad), Code.INVALID_ARGUMENT, text)
    assert state_of(stub, "grad").pending == 1  # still pending: a correct backward afterwards succeeds
    reply = train_backward(stub, "grad", "m", hidden(1, 3, seed=3))
    assert list(reply.grad_input.shape) == [1, 3, HIDDEN]
    assert state_of(stub, "grad").pending == 0
    assert_refused(lambda: train_backward(stub, "grad", "m", hidden(1, 3)), Code.NOT_FOUND,
                   "micro-batch 'm' was not forwarded here")  # a micro-batch is backwarded once


def test_no_input_grad_forward_has_no_input_gradient_to_give(stub, runs) -> None:
    """The first span skips its input's gradient; its adapters' gradients are the same either way."""
    runs("skip")
    runs("full")
    x, g = randn(2, 4, HIDDEN, seed=3), randn(2, 4, HIDDEN, seed=4)
    train_forward(stub, "skip", "m", encode(x), no_input_grad=True)
    assert_refused(lambda: train_backward(stub, "skip", "m", encode(g), want_grad_input=True),
                   Code.FAILED_PRECONDITION, "no_input_grad")
    assert state_of(stub, "skip").pending == 1  # the refusal kept the micro-batch
    assert not train_backward(stub, "skip", "m", encode(g), want_grad_input=False).HasField("grad_input")
    cycle(stub, "full", "m", x, g)
    step(stub, "skip")
    step(stub, "full")
    assert_same_adapter(get_adapter(stub, "skip")[1], get_adapter(stub, "full")[1], atol=1e-7)


def test_grad_input_only_when_wanted(stub, runs) -> None:
    runs("want")
    train_forward(stub, "want", "no", hidden(2, 5))
    reply = train_backward(stub, "want", "no", hidden(2, 5, seed=1), want_grad_input=False)
    assert not reply.HasField("grad_input") and reply.grad_input.data == b""
    train_forward(stub, "want", "yes", hidden(2, 5))
    grad_input = decode(train_backward(stub, "want", "yes", hidden(2, 5, seed=1), want_grad_input=True).grad_input)
    assert grad_input.dtype == torch.float32 and list(grad_input.shape) == [2, 5, HIDDEN]
    assert torch.isfinite(grad_input).all() and grad_input.abs().max() > 0
    # the gradient comes back in the dtype of grad_output
    train_forward(stub, "want", "bf16", hidden(2, 5))
    reply = train_backward(stub, "want", "bf16", hidden(2, 5, seed=1, dtype=torch.bfloat16))
    assert reply.grad_input.dtype == "bfloat16" and list(reply.grad_input.shape) == [2, 5, HIDDEN]


# --------------------------------------------------------------------------------------------- Step


def test_step(stub, runs) -> None:
    runs("step")
    train_forward(stub, "step", "m")
    assert_refused(lambda: step(stub, "step"), Code.FAILED_PRECONDITION,
                   "1 micro-batches still await backward; no step before they do")
    state = state_of(stub, "step")
    assert (state.steps, state.samples, state.pending) == (0, 0, 1)
    train_backward(stub, "step", "m")
    state = step(stub, "step", samples=2)
    assert (state.steps, state.samples, state.pending) == (1, 2, 0)
    cycle(stub, "step", "m", randn(1, 3, HIDDEN), randn(1, 3, HIDDEN, seed=1))
    state = step(stub, "step", samples=3, lr=5e-3)
    assert (state.steps, state.samples) == (2, 5)
    _, adapter = get_adapter(stub, "step")
    for bad in (-1e-3, float("nan"), float("inf")):
        assert_refused(lambda: step(stub, "step", lr=bad), Code.INVALID_ARGUMENT, "lr must be a finite number")
    state, after = get_adapter(stub, "step")
    assert (state.steps, state.samples) == (2, 5)
    assert_same_adapter(adapter, after)
    assert_refused(lambda: step(stub, "nope"), Code.NOT_FOUND, "run 'nope' is not open on this peer")
    assert_trains(stub, "step")
    assert step(stub, "step").steps == 3


# ---------------------------------------------------------------------------------------- SetAdapter


def _bad_adapters(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[list, str]]:
    items = sorted(adapter.items())
    q_b = adapter[Q_B0]
    return {
        "missing key": ([(k, v) for k, v in items if k != Q_B0],
                        f"adapter tensors do not match this peer's blocks: missing ['{Q_B0}'], unexpected []"),
        "unexpected key": (items + [(Q_B0.replace("layers.0", "layers.2"), q_b)],
                           f"missing [], unexpected ['{Q_B0.replace('layers.0', 'layers.2')}']"),
        "renamed key": ([(k.replace("q_proj", "k_proj"), v) for k, v in items],
                        "adapter tensors do not match this peer's blocks: missing"),
        "empty": ([], "adapter tensors do not match this peer's blocks: missing"),
        "wrong shape": ([(k, v.t().contiguous() if k == Q_B0 else v) for k, v in items],
                        f"{Q_B0} has shape [4, 64], expected [64, 4]"),
        "duplicated name": (items + [(Q_B0, q_b)], "adapter tensors are named twice"),
        "three dims": ([(k, v[None] if k == Q_B0 else v) for k, v in items], f"{Q_B0}: expected 2 dimensions"),
        "int64 tensor": ([(k, v.long() if k == Q_B0 else v) for k, v in items], f"{Q_B0}: dtype int64 not allowed"),
        "truncated bytes": ([(k, with_data(encode(v), encode(v).data[:-1]) if k == Q_B0 else v) for k, v in items],
                            f"{Q_B0}: 1023 bytes for shape [64, 4]"),
    }


@pytest.fixture
def trained(stub, runs) -> str:
    """A run after one optimizer step: B is no longer zero and the counters are not."""
    runs("set")
    cycle(stub, "set", "m", randn(2, 3, HIDDEN), randn(2, 3, HIDDEN, seed=1))
    assert step(stub, "set", samples=2).steps == 1
    return "set"


@pytest.mark.parametrize("case", list(_bad_adapters({Q_B0: torch.zeros(64, 4)})))
def test_bad_set_adapter(stub, trained, case: str) -> None:
    before_state, before = get_adapter(stub, trained)
    tensors, text = _bad_adapters(before)[case]
    assert_refused(lambda: set_adapter(stub, trained, tensors), Code.INVALID_ARGUMENT, text)
    after_state, after = get_adapter(stub, trained)
    assert after_state == before_state  # steps and samples not reset
    assert_same_adapter(before, after)
    assert_trains(stub, trained)


def test_set_adapter(stub, swarm, trained) -> None:
    state, adapter = get_adapter(stub, trained)
    assert (state.steps, state.samples) == (1, 2)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)
    new = {k: (randn(*v.shape, seed=i) * 0.05 if ".lora_B." in k else v) for i, (k, v) in enumerate(sorted(
        adapter.items()))}
    new[Q_B0] = new[Q_B0].to(torch.bfloat16)  # any float dtype is accepted and converted
    state = set_adapter(stub, trained, sorted(new.items()))
    assert (state.steps, state.samples, state.pending) == (0, 0, 0)
    _, loaded = get_adapter(stub, trained)
    assert_same_adapter(loaded, {k: v.float() for k, v in new.items()})
    # zeroing B gives back the base model when served
    zero = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in adapter.items()}
    set_adapter(stub, trained, sorted(zero.items()))
    x = randn(1, 4, HIDDEN, seed=3)
    assert max_diff(forward(stub, swarm.model_id, x, adapter=trained), forward(stub, swarm.model_id, x)) <= 1e-6
    assert_trains(stub, trained)


# ------------------------------------------------------------------------------ serving an adapter


def test_forward_with_an_unknown_adapter(stub, swarm) -> None:
    x = randn(1, 3, HIDDEN)
    assert_refused(lambda: forward(stub, swarm.model_id, x, adapter="nope"), Code.NOT_FOUND,
                   "adapter 'nope' is not loaded on this peer")
    assert_serves(stub, swarm.model_id)


def test_session_with_an_unknown_adapter(stub, swarm) -> None:
    with Stream(stub, TIMEOUT) as stream:
        assert_refused(lambda: stream.send(open_session(swarm.model_id, adapter="nope")), Code.NOT_FOUND,
                       "adapter 'nope' is not loaded on this peer")
    with Stream(stub, TIMEOUT) as stream:
        assert stream.send(open_session(swarm.model_id)).cache_length == 0
        assert stream.send(session_step(randn(1, 3, HIDDEN))).cache_length == 3


def test_forward_with_the_run_adapter(stub, swarm, runs) -> None:
    runs("served")
    x = randn(1, 5, HIDDEN, seed=11)
    base = forward(stub, swarm.model_id, x)
    assert max_diff(forward(stub, swarm.model_id, x, adapter="served"), base) <= 1e-6  # B starts at zero
    cycle(stub, "served", "m", randn(2, 5, HIDDEN, seed=1), randn(2, 5, HIDDEN, seed=2))
    step(stub, "served")
    adapted = forward(stub, swarm.model_id, x, adapter="served")
    assert max_diff(adapted, base) > 1e-4
    assert max_diff(forward(stub, swarm.model_id, x), base) == 0  # the base model is untouched
    assert max_diff(forward(stub, swarm.model_id, x, adapter="served"), adapted) == 0  # no dropout when serving
    with Stream(stub, TIMEOUT) as stream:  # an inference session applies the same adapter
        stream.send(open_session(swarm.model_id, adapter="served"))
        reply = stream.send(session_step(x))
        assert max_diff(decode(reply.hidden_states), adapted) <= 1e-5


# ------------------------------------------------------------------------------------ CloseTraining


def test_close_training_without_keeping(stub, swarm, runs) -> None:
    runs("gone")
    x = randn(1, 3, HIDDEN)
    cycle(stub, "gone", "m", x, randn(1, 3, HIDDEN, seed=1))
    step(stub, "gone")
    train_forward(stub, "gone", "left")  # a pending micro-batch does not stop the close
    forward(stub, swarm.model_id, x, adapter="gone")
    stub.CloseTraining(pb.CloseTrainingRequest(run="gone", keep=False), timeout=TIMEOUT)
    for call in (lambda: state_of(stub, "gone"), lambda: train_forward(stub, "gone", "m"),
                 lambda: train_backward(stub, "gone", "left"), lambda: step(stub, "gone"),
                 lambda: stub.Discard(pb.DiscardRequest(run="gone"), timeout=TIMEOUT),
                 lambda: set_adapter(stub, "gone", []),
                 lambda: stub.CloseTraining(pb.CloseTrainingRequest(run="gone"), timeout=TIMEOUT)):
        assert_refused(call, Code.NOT_FOUND, "run 'gone' is not open on this peer")
    assert_refused(lambda: forward(stub, swarm.model_id, x, adapter="gone"), Code.NOT_FOUND,
                   "adapter 'gone' is not loaded on this peer")
    with Stream(stub, TIMEOUT) as stream:
        assert_refused(lambda: stream.send(open_session(swarm.model_id, adapter="gone")), Code.NOT_FOUND,
                       "adapter 'gone' is not loaded on this peer")
    assert_serves(stub, swarm.model_id)


def test_close_training_keeping_the_adapter(stub, swarm, runs) -> None:
    runs("kept")
    x = randn(1, 3, HIDDEN)
    base = forward(stub, swarm.model_id, x)
    cycle(stub, "kept", "m", x, randn(1, 3, HIDDEN, seed=1))
    step(stub, "kept")
    adapted = forward(stub, swarm.model_id, x, adapter="kept")
    assert max_diff(adapted, base) > 1e-4
    stub.CloseTraining(pb.CloseTrainingRequest(run="kept", keep=True), timeout=TIMEOUT)
    assert_refused(lambda: state_of(stub, "kept"), Code.NOT_FOUND, "run 'kept' is not open on this peer")
    assert_refused(lambda: train_forward(stub, "kept", "m"), Code.NOT_FOUND, "run 'kept' is not open")
    assert max_diff(forward(stub, swarm.model_id, x, adapter="kept"), adapted) == 0
    with Stream(stub, TIMEOUT) as stream:
        stream.send(open_session(swarm.model_id, adapter="kept"))
        assert max_diff(decode(stream.send(session_step(x)).hidden_states), adapted) <= 1e-5
    # opening training under the served adapter's name starts afresh (B zero again)
    state = runs("kept")
    assert (state.steps, state.samples, state.pending) == (0, 0, 0)
    assert max_diff(forward(stub, swarm.model_id, x, adapter="kept"), base) <= 1e-6


# ---------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_matches_kept_activations(stub, swarm, runs) -> None:
    """Same spec and inputs, with and without checkpointing: same outputs, grad_input and adapter."""
    runs("ckpt-on", gradient_checkpointing=True)
    runs("ckpt-off", gradient_checkpointing=False)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as batches of prompts have
    x1, g1 = randn(2, 5, HIDDEN, seed=1), randn(2, 5, HIDDEN, seed=2)
    x2, g2 = randn(2, 5, HIDDEN, seed=3), randn(2, 5, HIDDEN, seed=4)
    results = {}
    for run in ("ckpt-on", "ckpt-off"):  # each micro-batch's forward and backward back to back
        first = cycle(stub, run, "m1", x1, g1, mask)
        step(stub, run, samples=2)  # B is no longer zero: the adapter now shapes outputs and grad_input
        second = cycle(stub, run, "m2", x2, g2, mask)
        step(stub, run, samples=2)
        results[run] = first, second, get_adapter(stub, run)[1]
    (first_on, second_on, adapter_on), (first_off, second_off, adapter_off) = results["ckpt-on"], results["ckpt-off"]
    for on, off in ((first_on, first_off), (second_on, second_off)):
        assert max_diff(on[0], off[0]) <= 1e-6  # output
        assert max_diff(on[1], off[1]) <= 1e-6  # grad_input
    assert max_diff(second_on[0], forward(stub, swarm.model_id, x2)) > 1e-4  # the adapter was live in m2
    assert_same_adapter(adapter_on, adapter_off, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in adapter_on.items() if ".lora_B." in k)


def test_gradient_checkpointing_with_dropout_over_the_wire(stub, swarm, runs) -> None:
    """Dropout is live in training (two forwards of one input differ once B is not zero) and off in serving;
    every checkpointed backward succeeds with a finite gradient."""
    runs("ckpt-drop", dropout=0.1, gradient_checkpointing=True)
    x, g = randn(1, 6, HIDDEN, seed=1), randn(1, 6, HIDDEN, seed=2)
    cycle(stub, "ckpt-drop", "warm", x, g)
    step(stub, "ckpt-drop")
    a = train_forward(stub, "ckpt-drop", "a", encode(x))
    b = train_forward(stub, "ckpt-drop", "b", encode(x))
    assert max_diff(a, b) > 1e-6
    for name in ("b", "a"):  # backward in another order than forward
        grad_input = decode(train_backward(stub, "ckpt-drop", name, encode(g)).grad_input)
        assert list(grad_input.shape) == [1, 6, HIDDEN] and torch.isfinite(grad_input).all()
    assert step(stub, "ckpt-drop").steps == 2
    served = forward(stub, swarm.model_id, x, adapter="ckpt-drop")
    assert max_diff(forward(stub, swarm.model_id, x, adapter="ckpt-drop"), served) == 0


def test_checkpointing_recompute_reuses_the_dropout_masks(tiny_model) -> None:
    """In one process, where the RNG can be seeded: one forward under the same seed with and without
    checkpointing, the RNG moved on before backward, gives the same gradients. Had the recompute drawn new
    dropout masks, grad_input and B's gradients would differ."""
    checkpoint = Checkpoint.open(tiny_model)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj"), seed=7)
    x, g = randn(2, 6, HIDDEN, seed=1), randn(2, 6, HIDDEN, seed=2)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    results = {}
    for checkpointing in (False, True):
        tensors = checkpoint.read_prefixes([block_prefix(i) for i in range(2)])
        span = BlockSpan(checkpoint.config, SpanSpec(0, 2), tensors)
        adapters = Adapters(span)
        adapters.attach("r", settings)
        run = TrainingRun(span, adapters, "r", settings, OptimizerSettings(lr=1e-2), checkpointing)
        state = adapters.state("r")
        run.load({k: (randn(*v.shape, seed=i) * 0.1 if ".lora_B." in k else v)
                  for i, (k, v) in enumerate(sorted(state.items()))})  # B not zero: dropout shapes grad_input
        torch.manual_seed(1234)
        output = run.forward("m", x, mask)
        torch.rand(4096)  # other work moves the RNG on before the backward
        grad_input = run.backward("m", g, True)
        grads = {k: p.grad.clone() for k, p in adapters.tensors("r").items() if ".lora_B." in k}
        torch.manual_seed(4321)
        other_masks = run.forward("other", x, mask)
        results[checkpointing] = output, grad_input, grads, other_masks
    (out_off, gi_off, grads_off, other_off), (out_on, gi_on, grads_on, _) = results[False], results[True]
    assert max_diff(out_on, out_off) <= 1e-6
    assert max_diff(other_off, out_off) > 1e-4  # dropout is live: other masks give another output
    assert max_diff(gi_on, gi_off) <= 1e-6
    assert sorted(grads_on) == sorted(grads_off)
    for key in grads_off:
        assert max_diff(grads_on[key], grads_off[key]) <= 1e-6, key


# ------------------------------------------------- regressions of bugs this file found (now fixed)


def _interleave_base_forward(stub, model_id: str) -> None:
    forward(stub, model_id, randn(1, 3, HIDDEN))


def _interleave_other_run(stub, model_id: str) -> None:
    open_training(stub, model_id, "bystander")
    train_forward(stub, "bystander", "m")
    train_backward(stub, "bystander", "m")


@pytest.mark.parametrize("interleave", [_interleave_base_forward, _interleave_other_run],
                         ids=["base Forward", "other run's training"])
def test_serving_between_forward_and_backward_keeps_the_gradients(stub, swarm, runs, interleave) -> None:
    runs("alone")
    runs("shared")
    runs("bystander")
    x, g = randn(2, 4, HIDDEN, seed=1), randn(2, 4, HIDDEN, seed=2)
    cycle(stub, "alone", "m", x, g)
    step(stub, "alone")
    train_forward(stub, "shared", "m", encode(x))
    interleave(stub, swarm.model_id)
    train_backward(stub, "shared", "m", encode(g))
    step(stub, "shared")
    _, alone = get_adapter(stub, "alone")
    _, shared = get_adapter(stub, "shared")
    assert any(v.abs().max() > 0 for k, v in alone.items() if ".lora_B." in k)
    assert_same_adapter(shared, alone, atol=1e-6)


def test_refused_set_adapter_keeps_pending_micro_batches(stub, runs) -> None:
    runs("keep-pending")
    train_forward(stub, "keep-pending", "m")
    assert_refused(lambda: set_adapter(stub, "keep-pending", []), Code.INVALID_ARGUMENT, "missing")
    assert state_of(stub, "keep-pending").pending == 1
    train_backward(stub, "keep-pending", "m")




NON_FINITE = {
    "NaN weight decay": dict(weight_decay=math.nan),  # INTERNAL: AdamW's own check raises ValueError
    "NaN eps": dict(eps=math.nan),                    # INTERNAL: likewise
    "NaN alpha": dict(alpha=math.nan),                # accepted; reopening with the same spec is then refused
    "infinite lr": dict(lr=math.inf),                 # accepted
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_spec(stub, swarm, case: str) -> None:
    name = "nonfinite-" + case.replace(" ", "-").lower()
    try:
        assert_refused(lambda: open_training(stub, swarm.model_id, name, **NON_FINITE[case]),
                       Code.INVALID_ARGUMENT, "")
    finally:
        try:
            stub.CloseTraining(pb.CloseTrainingRequest(run=name), timeout=TIMEOUT)
        except grpc.RpcError:
            pass


def test_failed_open_training_leaves_no_adapter(stub, swarm) -> None:
    with pytest.raises(grpc.RpcError):
        open_training(stub, swarm.model_id, "leak", eps=math.nan)
    assert_refused(lambda: state_of(stub, "leak"), Code.NOT_FOUND, "run 'leak' is not open")
    assert_refused(lambda: forward(stub, swarm.model_id, randn(1, 3, HIDDEN), adapter="leak"), Code.NOT_FOUND,
                   "adapter 'leak' is not loaded on this peer")


# --------------------------------------------------------------------------------------------- logs


def test_peers_survived_without_tracebacks(swarm) -> None:
    """Refusals are expected user errors: the peers log no stack trace for them and keep running."""
    for peer in swarm.peers:
        assert peer.process.process.poll() is None, peer.process.output()
        log = "\n".join(peer.process.lines)
        assert "Traceback" not in log, log
