"""A peer refuses every malformed or unserviceable request with a precise status code and keeps serving.

One swarm of two peers (blocks 0:2 and 2:4 of the tiny 4-block, hidden-64 model) with tight limits: 2
sessions, a 1 MiB KV-cache budget, a 2 s session timeout and 2 s for a new stream to open its session, so
that every limit can be hit cheaply. Each
case sends one bad request straight to a peer over gRPC, checks the status code and that the details
name the problem, then checks that the next valid request on the same peer succeeds: a refusal must not
leave state behind (a leaked session, a half-filled cache) nor take the process down.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import start_swarm

from tsotsa.client.streams import STATUS_CODES
from tsotsa.codec import decode, encode
from tsotsa.local_swarm import LocalSwarm
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from peer_stream import Stream

HIDDEN = 64
SESSION_TIMEOUT = 2.0
OPEN_TIMEOUT = 2.0
ADMISSION_WAIT = 1.0  # seconds an open waits in line at the session cap (less than SESSION_TIMEOUT)
MAX_MESSAGE = 64 << 20            # the server's grpc.max_receive_message_length
MAX_FORWARD_TOKENS = 8192         # PeerLimits.max_forward_tokens (no CLI flag: the default)
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def swarm(tiny_model, tmp_path_factory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tiny_model, ["0:2", "2:4"], "--max-sessions", "2", "--cache-mib", "1",
                        "--session-timeout", str(SESSION_TIMEOUT), "--open-timeout", str(OPEN_TIMEOUT),
                        "--admission-wait", str(ADMISSION_WAIT),
                        cache_dir=tmp_path_factory.mktemp("cache"))
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def stub(swarm) -> Iterator[pb_grpc.PeerStub]:
    """A stub for the first peer (blocks 0:2); the client may send messages past the server's limit."""
    with grpc.insecure_channel(swarm.peers[0].address, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield pb_grpc.PeerStub(channel)


# ------------------------------------------------------------------------------------------ helpers


def hidden(batch: int = 1, length: int = 3, dim: int = HIDDEN, dtype: torch.dtype = torch.float32) -> pb.Tensor:
    return encode(torch.randn(batch, length, dim).to(dtype))


def with_data(tensor: pb.Tensor, data: bytes) -> pb.Tensor:
    """A copy of `tensor` whose bytes no longer match its shape and dtype."""
    return pb.Tensor(dtype=tensor.dtype, shape=tensor.shape, data=data, codec=tensor.codec)


def forward(model_id: str, start: int = 0, end: int = 2, hidden_states: pb.Tensor | None = None,
            **tensors: pb.Tensor) -> pb.ForwardRequest:
    return pb.ForwardRequest(model_id=model_id, start_block=start, end_block=end,
                             hidden_states=hidden() if hidden_states is None else hidden_states, **tensors)


def open_session(model_id: str, session_id: str = "s", start: int = 0, end: int = 2, batch_size: int = 1,
                 max_length: int = 16, link_key: bytes = b"") -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, open=pb.OpenSession(
        model_id=model_id, start_block=start, end_block=end, batch_size=batch_size, max_length=max_length,
        link_key=link_key))


def step(session_id: str = "s", hidden_states: pb.Tensor | None = None, **tensors: pb.Tensor) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.InferenceStep(
        hidden_states=hidden() if hidden_states is None else hidden_states, **tensors))


def assert_refused(call: Callable[[], object], code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert text in error.details()


def run_stream(stub: pb_grpc.PeerStub, requests: list[pb.InferenceRequest]) -> list[pb.InferenceResponse]:
    return list(stub.Inference(iter(requests), timeout=30))


def assert_stream_refused(stub: pb_grpc.PeerStub, requests: list, code: grpc.StatusCode, text: str,
                          rpc: str = "Inference") -> None:
    """Every request but the last is answered; the last one ends the stream (of `rpc`) with `code`."""
    answered: list = []

    def consume() -> None:
        for response in getattr(stub, rpc)(iter(requests), timeout=30):
            answered.append(response)

    assert_refused(consume, code, text)
    assert len(answered) == len(requests) - 1


def assert_serves(stub: pb_grpc.PeerStub, model_id: str) -> None:
    """The next valid requests succeed: a Forward, and an inference session that opens and steps."""
    reply = stub.Forward(forward(model_id, hidden_states=hidden(2, 5)), timeout=30)
    assert list(reply.hidden_states.shape) == [2, 5, HIDDEN]
    opened, stepped = run_stream(stub, [open_session(model_id, "valid"), step("valid")])
    assert opened.cache_length == 0
    assert list(stepped.hidden_states.shape) == [1, 3, HIDDEN] and stepped.cache_length == 3


# ---------------------------------------------------------------------------------------- Forward

_tensor = hidden()
_overflow = pb.Tensor(dtype="float32", shape=[(1 << 58) + 1, 1, HIDDEN], data=bytes(256))  # wraps to 64 in int64
_mask_ones = encode(torch.ones(1, 3, dtype=torch.long))

BAD_FORWARDS = {
    # name: (request fields beyond the model id, status code, text in the details)
    "hidden size 63": (dict(hidden_states=hidden(dim=63)), Code.INVALID_ARGUMENT, "last dimension must be 64"),
    "int64 hidden": (dict(hidden_states=encode(torch.zeros(1, 3, HIDDEN, dtype=torch.long))),
                     Code.INVALID_ARGUMENT, "dtype int64 not allowed"),
    "unknown dtype": (dict(hidden_states=pb.Tensor(dtype="float8", shape=[1, 3, HIDDEN], data=bytes(192))),
                      Code.INVALID_ARGUMENT, "dtype float8 not allowed"),
    "two dims": (dict(hidden_states=encode(torch.zeros(3, HIDDEN))), Code.INVALID_ARGUMENT, "expected 3 dimensions"),
    "four dims": (dict(hidden_states=encode(torch.zeros(1, 1, 3, HIDDEN))), Code.INVALID_ARGUMENT,
                  "expected 3 dimensions"),
    "empty batch": (dict(hidden_states=hidden(batch=0)), Code.INVALID_ARGUMENT, "is empty"),
    "negative dim": (dict(hidden_states=pb.Tensor(dtype="float32", shape=[1, -3, HIDDEN])), Code.INVALID_ARGUMENT,
                     "negative dimension"),
    "element count overflows int64": (dict(hidden_states=_overflow), Code.INVALID_ARGUMENT, "exceeds"),
    "missing hidden": (dict(hidden_states=pb.Tensor()), Code.INVALID_ARGUMENT, "hidden_states: missing"),
    "oversized bytes": (dict(hidden_states=with_data(_tensor, _tensor.data + bytes(4))), Code.INVALID_ARGUMENT,
                        f"{len(_tensor.data) + 4} bytes for shape"),
    "truncated bytes": (dict(hidden_states=with_data(_tensor, _tensor.data[:-1])), Code.INVALID_ARGUMENT,
                        f"{len(_tensor.data) - 1} bytes for shape"),
    "corrupt zlib": (dict(hidden_states=pb.Tensor(dtype="float32", shape=[1, 3, HIDDEN], data=b"junk",
                                                  codec=pb.Tensor.ZLIB)), Code.INVALID_ARGUMENT, "corrupt zlib"),
    "unknown codec": (dict(hidden_states=pb.Tensor(dtype="float32", shape=[1, 3, HIDDEN], data=bytes(768), codec=7)),
                      Code.INVALID_ARGUMENT, "unknown codec"),
    "mask shape": (dict(attention_mask=encode(torch.ones(1, 4, dtype=torch.long))), Code.INVALID_ARGUMENT,
                   "attention_mask shape [1, 4] does not match"),
    "mask values": (dict(attention_mask=encode(torch.tensor([[1, 2, 1]]))), Code.INVALID_ARGUMENT, "only 0 and 1"),
    "mask dtype": (dict(attention_mask=encode(torch.ones(1, 3))), Code.INVALID_ARGUMENT, "dtype float32 not allowed"),
    "mask bytes": (dict(attention_mask=with_data(_mask_ones, _mask_ones.data[:-8])), Code.INVALID_ARGUMENT,
                   "attention_mask: 16 bytes"),
    "positions shape": (dict(position_ids=encode(torch.arange(3))), Code.INVALID_ARGUMENT, "expected 2 dimensions"),
    "positions batch": (dict(position_ids=encode(torch.arange(3).repeat(2, 1))), Code.INVALID_ARGUMENT,
                        "position_ids shape [2, 3] does not match"),
    "negative positions": (dict(position_ids=encode(torch.tensor([[-1, 0, 1]]))), Code.INVALID_ARGUMENT,
                           "position_ids must be in 0..2047"),
    "positions past the model": (dict(position_ids=encode(torch.tensor([[2046, 2047, 2048]]))),
                                 Code.INVALID_ARGUMENT, "position_ids must be in 0..2047"),
    "blocks outside the model": (dict(start=2, end=5), Code.OUT_OF_RANGE, "outside the model's 4"),
    "blocks not served here": (dict(start=2, end=4), Code.OUT_OF_RANGE, "not served here"),
    "blocks partly served": (dict(start=1, end=3), Code.OUT_OF_RANGE, "not served here"),
    "empty block range": (dict(start=1, end=1), Code.INVALID_ARGUMENT, "empty block range 1:1"),
    "reversed block range": (dict(start=2, end=1), Code.INVALID_ARGUMENT, "empty block range 2:1"),
    "too many tokens": (dict(hidden_states=hidden(1, MAX_FORWARD_TOKENS + 1)), Code.RESOURCE_EXHAUSTED,
                        f"{MAX_FORWARD_TOKENS + 1} tokens exceed"),
    "too many tokens over the batch": (dict(hidden_states=hidden(2, MAX_FORWARD_TOKENS // 2 + 1)),
                                       Code.RESOURCE_EXHAUSTED, f"{MAX_FORWARD_TOKENS + 2} tokens exceed"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_bad_forward(stub, swarm, case: str) -> None:
    fields, code, text = BAD_FORWARDS[case]
    assert_refused(lambda: stub.Forward(forward(swarm.model_id, **fields), timeout=30), code, text)
    assert_serves(stub, swarm.model_id)


def test_forward_for_another_model(stub, swarm) -> None:
    assert_refused(lambda: stub.Forward(forward("other-model"), timeout=30), Code.FAILED_PRECONDITION,
                   "not 'other-model'")
    assert_serves(stub, swarm.model_id)


def test_message_over_the_server_limit(stub, swarm) -> None:
    """grpc itself refuses it before the service sees it; 65 MiB once is the cheapest way to hit the limit."""
    too_big = pb.Tensor(dtype="float32", shape=[1, 1, HIDDEN], data=bytes(MAX_MESSAGE + (1 << 20)))
    assert_refused(lambda: stub.Forward(forward(swarm.model_id, hidden_states=too_big), timeout=60),
                   Code.RESOURCE_EXHAUSTED, "larger than max")
    assert_serves(stub, swarm.model_id)


def test_second_peer_refuses_blocks_it_does_not_serve(swarm) -> None:
    with grpc.insecure_channel(swarm.peers[1].address) as channel:
        other = pb_grpc.PeerStub(channel)
        assert_refused(lambda: other.Forward(forward(swarm.model_id, 0, 2), timeout=30), Code.OUT_OF_RANGE,
                       "not served here (this peer serves 2:4)")
        reply = other.Forward(forward(swarm.model_id, 2, 4), timeout=30)
        assert list(reply.hidden_states.shape) == [1, 3, HIDDEN]


# -------------------------------------------------------------------------------------- Inference

_bad_hidden = with_data(_tensor, _tensor.data[:-1])

BAD_STREAMS = {
    # name: (requests built from the model id, status code, text); only the last request is refused
    "open for another model": (lambda m: [open_session("other-model")], Code.FAILED_PRECONDITION,
                               "not 'other-model'"),
    "open blocks outside the model": (lambda m: [open_session(m, start=0, end=5)], Code.OUT_OF_RANGE,
                                      "outside the model's 4"),
    "open blocks not served here": (lambda m: [open_session(m, start=2, end=4)], Code.OUT_OF_RANGE,
                                    "not served here"),
    "open empty block range": (lambda m: [open_session(m, start=1, end=1)], Code.INVALID_ARGUMENT,
                               "empty block range"),
    "open batch 0": (lambda m: [open_session(m, batch_size=0)], Code.INVALID_ARGUMENT, "batch_size"),
    "open max_length 0": (lambda m: [open_session(m, max_length=0)], Code.INVALID_ARGUMENT,
                          "max_length must be in 1..2048"),
    "open max_length past the model": (lambda m: [open_session(m, max_length=2049)], Code.INVALID_ARGUMENT,
                                       "max_length must be in 1..2048"),
    "open without a session id": (lambda m: [open_session(m, session_id="")], Code.INVALID_ARGUMENT,
                                  "session id must have"),
    "open with a too long session id": (lambda m: [open_session(m, session_id="x" * 129)], Code.INVALID_ARGUMENT,
                                        "session id must have"),
    "KV cache over the budget": (lambda m: [open_session(m, batch_size=8, max_length=2048)],
                                 Code.RESOURCE_EXHAUSTED, "does not fit"),
    "second open on a stream": (lambda m: [open_session(m), open_session(m, "t")], Code.FAILED_PRECONDITION,
                                "already has a session"),
    "neither open nor step": (lambda m: [pb.InferenceRequest(session_id="s")], Code.INVALID_ARGUMENT,
                              "neither open nor step"),
    "step before any open": (lambda m: [step("never")], Code.NOT_FOUND, "unknown session 'never'"),
    "step for an unknown session": (lambda m: [open_session(m), step("never")], Code.NOT_FOUND,
                                    "unknown session 'never'"),
    "step with a wrong hidden size": (lambda m: [open_session(m), step(hidden_states=hidden(dim=32))],
                                      Code.INVALID_ARGUMENT, "last dimension must be 64"),
    "step with int32 hidden": (lambda m: [open_session(m), step(hidden_states=encode(torch.zeros(1, 3, HIDDEN,
                                                                                               dtype=torch.int32)))],
                            Code.INVALID_ARGUMENT, "dtype int32 not allowed"),
    "step with truncated bytes": (lambda m: [open_session(m), step(hidden_states=_bad_hidden)],
                                  Code.INVALID_ARGUMENT, "bytes for shape"),
    "step with another batch": (lambda m: [open_session(m), step(hidden_states=hidden(batch=2))],
                                Code.INVALID_ARGUMENT, "batch 2 differs from the session's 1"),
    "step with a wrong mask": (lambda m: [open_session(m), step(attention_mask=encode(torch.ones(1, 2,
                                                                                              dtype=torch.long)))],
                               Code.INVALID_ARGUMENT, "attention_mask shape [1, 2] does not match"),
    "step with wrong positions": (lambda m: [open_session(m), step(position_ids=encode(torch.tensor([[0, 1, 5000]])))],
                                  Code.INVALID_ARGUMENT, "position_ids must be in 0..2047"),
    "steps beyond max_length": (lambda m: [open_session(m, max_length=4), step(), step(hidden_states=hidden(1, 2))],
                                Code.OUT_OF_RANGE, "3 + 2 tokens exceed the session's max_length 4"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_inference(stub, swarm, case: str) -> None:
    requests, code, text = BAD_STREAMS[case]
    assert_stream_refused(stub, requests(swarm.model_id), code, text)
    assert_serves(stub, swarm.model_id)


def test_sessions_belong_to_their_stream(stub, swarm) -> None:
    """Another stream's session can be neither stepped (FAILED_PRECONDITION) nor opened again (ALREADY_EXISTS)."""
    with Stream(stub) as owner:
        owner.send(open_session(swarm.model_id, "mine"))
        assert_stream_refused(stub, [step("mine")], Code.FAILED_PRECONDITION, "not opened on this stream")
        assert_stream_refused(stub, [open_session(swarm.model_id), step("mine")], Code.FAILED_PRECONDITION,
                              "not opened on this stream")
        assert_stream_refused(stub, [open_session(swarm.model_id, "mine")], Code.ALREADY_EXISTS, "already open")
        assert owner.send(step("mine")).cache_length == 3  # the owner's session is untouched
    assert_serves(stub, swarm.model_id)


def test_too_many_sessions(stub, swarm) -> None:
    with Stream(stub) as first, Stream(stub) as second:
        first.send(open_session(swarm.model_id, "first"))
        second.send(open_session(swarm.model_id, "second"))
        assert_stream_refused(stub, [open_session(swarm.model_id, "third")], Code.RESOURCE_EXHAUSTED,
                              f"limit of 2 concurrent sessions; waited {ADMISSION_WAIT:g} s in line, retry later")
        assert first.send(step("first")).cache_length == 3
    assert_serves(stub, swarm.model_id)  # closing the streams gave both slots back


def test_an_open_waits_in_line_for_a_slot(stub, swarm) -> None:
    """At the session cap a new open waits (up to --admission-wait) instead of failing, and takes the first
    slot that frees."""
    with Stream(stub) as first, Stream(stub) as second:
        first.send(open_session(swarm.model_id, "first"))
        second.send(open_session(swarm.model_id, "second"))
        answers: queue.SimpleQueue = queue.SimpleQueue()
        third = Stream(stub)

        def open_third() -> None:
            try:
                answers.put(third.send(open_session(swarm.model_id, "third")))
            except grpc.RpcError as error:
                answers.put(error)

        threading.Thread(target=open_third, daemon=True).start()
        with pytest.raises(queue.Empty):
            answers.get(timeout=0.3)  # in line: neither refused nor admitted yet
        first.close()
        admitted = answers.get(timeout=30)
        assert isinstance(admitted, pb.InferenceResponse) and admitted.session_id == "third", admitted
        third.close()
    assert_serves(stub, swarm.model_id)


def test_expired_sessions(stub, swarm) -> None:
    """An idle session expires whether its own next step finds it idle or another open reclaims it first."""
    with Stream(stub) as idle, Stream(stub) as reclaimed:
        idle.send(open_session(swarm.model_id, "idle"))
        reclaimed.send(open_session(swarm.model_id, "reclaimed"))
        time.sleep(SESSION_TIMEOUT + 0.5)
        assert_refused(lambda: idle.send(step("idle")), Code.NOT_FOUND, "session idle expired")
        with Stream(stub) as newcomer:  # its open reclaims "reclaimed", which would otherwise fill the table
            newcomer.send(open_session(swarm.model_id, "newcomer"))
            assert_refused(lambda: reclaimed.send(step("reclaimed")), Code.NOT_FOUND, "session reclaimed expired")
            assert newcomer.send(step("newcomer")).cache_length == 3
    assert_serves(stub, swarm.model_id)


def test_idle_sessions_are_reclaimed_on_a_timer(stub, swarm) -> None:
    """No other session has to open: the peer's heartbeat gives an idle session's KV cache back."""
    with Stream(stub) as idle:
        idle.send(open_session(swarm.model_id, "forgotten"))
        deadline = time.monotonic() + 60
        while (info := stub.Info(pb.InfoRequest(), timeout=10)).open_sessions:
            assert time.monotonic() < deadline, f"{info.open_sessions} sessions still open after 60 s"
            time.sleep(0.5)
        assert info.cache_bytes_used == 0
        assert_refused(lambda: idle.send(step("forgotten")), Code.NOT_FOUND, "session forgotten expired")
    assert_serves(stub, swarm.model_id)


def test_a_stream_that_never_opens_a_session_is_closed(stub, swarm) -> None:
    """It would hold one of the peer's workers for ever; it is cancelled after the open timeout."""
    began = time.monotonic()
    requests: queue.SimpleQueue = queue.SimpleQueue()  # nothing is put in until the test ends
    silent = stub.Inference(iter(requests.get, None), timeout=60)
    try:
        with pytest.raises(grpc.RpcError) as closed:
            next(silent)
    finally:
        requests.put(None)  # lets gRPC's request thread of this call end
    assert closed.value.code() == Code.CANCELLED
    assert time.monotonic() - began < 30  # the open timeout, not the client's own 60 s deadline
    assert_serves(stub, swarm.model_id)


# -------------------------------------------------------------------------------------------- Link

KEY = bytes(range(16))


def link_open(model_id: str, key: bytes = KEY) -> pb.LinkRequest:
    return pb.LinkRequest(open=pb.LinkOpen(model_id=model_id, link_key=key))


def linked(*steps: tuple[str, pb.Tensor]) -> pb.LinkRequest:
    return pb.LinkRequest(steps=pb.LinkSteps(steps=[pb.LinkedStep(session_id=session_id, step=pb.InferenceStep(
        hidden_states=tensor)) for session_id, tensor in steps]))


BAD_LINKS = {
    # name: (requests given the model id, status code, text in the details)
    "steps before open": (lambda m: [linked(("s", hidden(1, 1)))], Code.FAILED_PRECONDITION, "open the link"),
    "empty request": (lambda m: [pb.LinkRequest()], Code.INVALID_ARGUMENT, "neither open nor steps"),
    "short key": (lambda m: [link_open(m, bytes(15))], Code.INVALID_ARGUMENT, "link_key must have 16..64 bytes"),
    "long key": (lambda m: [link_open(m, bytes(65))], Code.INVALID_ARGUMENT, "link_key must have 16..64 bytes"),
    "another model": (lambda m: [link_open("other-model")], Code.FAILED_PRECONDITION, "not 'other-model'"),
    "opened twice": (lambda m: [link_open(m), link_open(m)], Code.FAILED_PRECONDITION, "already open"),
    "no steps": (lambda m: [link_open(m), pb.LinkRequest(steps=pb.LinkSteps())], Code.INVALID_ARGUMENT,
                 "holds no steps"),
    "a session twice": (lambda m: [link_open(m), linked(("s", hidden(1, 1)), ("s", hidden(1, 1)))],
                        Code.INVALID_ARGUMENT, "steps a session twice"),
    "more steps than sessions": (lambda m: [link_open(m), linked(*[(f"s{i}", hidden(1, 1)) for i in range(3)])],
                                 Code.INVALID_ARGUMENT, "3 steps exceed this peer's limit of 2 sessions"),
}


@pytest.mark.parametrize("case", list(BAD_LINKS))
def test_bad_link(stub, swarm, case: str) -> None:
    requests, code, text = BAD_LINKS[case]
    assert_stream_refused(stub, requests(swarm.model_id), code, text, rpc="Link")
    assert_serves(stub, swarm.model_id)


def test_bad_session_open_key(stub, swarm) -> None:
    assert_stream_refused(stub, [open_session(swarm.model_id, link_key=bytes(8))], Code.INVALID_ARGUMENT,
                          "link_key must have 16..64 bytes")


def test_linked_steps_are_refused_one_by_one_and_the_link_serves_on(stub, swarm) -> None:
    """Each step of a Link message that may not run gets its own code; the others run, the link stays open,
    and a refused session is untouched: its own stream (and then the link) step it as before."""
    prompt, token = hidden(1, 3), hidden(1, 1)
    with Stream(stub) as owner, Stream(stub) as plain, Stream(stub, rpc="Link") as link, \
            Stream(stub, rpc="Link") as stranger:
        owner.send(open_session(swarm.model_id, "linked", link_key=KEY))
        plain.send(open_session(swarm.model_id, "plain"))
        link.send(link_open(swarm.model_id))
        stranger.send(link_open(swarm.model_id, bytes(16)))
        early = link.send(linked(("linked", token))).results
        assert STATUS_CODES[early[0].code] == Code.FAILED_PRECONDITION, early[0]
        assert "must follow the session's first step" in early[0].details
        owner.send(step("linked", prompt))
        plain.send(step("plain", prompt))
        refused = link.send(linked(("linked", hidden(1, 2)), ("plain", token))).results
        assert [(STATUS_CODES[r.code], r.session_id) for r in refused] == [(Code.INVALID_ARGUMENT, "linked"),
                                                                   (Code.FAILED_PRECONDITION, "plain")]
        assert "one token per row" in refused[0].details and "not opened for this link" in refused[1].details
        for bad, text in [(hidden(2, 1), "differs from the session's 1"), (hidden(dim=63, length=1), "must be 64")]:
            result = link.send(linked(("linked", bad))).results[0]
            assert STATUS_CODES[result.code] == Code.INVALID_ARGUMENT and text in result.details, result
        unknown = link.send(linked(("nobody", token))).results[0]
        assert STATUS_CODES[unknown.code] == Code.NOT_FOUND and "unknown session" in unknown.details
        foreign = stranger.send(linked(("linked", token))).results[0]
        assert STATUS_CODES[foreign.code] == Code.FAILED_PRECONDITION and "not opened for this link" in foreign.details
        done = link.send(linked(("linked", token))).results[0]
        assert done.code == 0 and done.cache_length == 4 and list(done.hidden_states.shape) == [1, 1, HIDDEN]
        alone = plain.send(step("plain", token))  # the same inputs on a stream: the same answer
        assert torch.equal(decode(done.hidden_states), decode(alone.hidden_states))
        assert owner.send(step("linked", token)).cache_length == 5  # its own stream steps it still
    assert_serves(stub, swarm.model_id)


def test_links_are_capped_and_a_refused_one_holds_no_slot(stub, swarm) -> None:
    """32 Link streams per peer (PeerLimits.max_links); more are refused, each refusal leaving the count
    as it was, and a closed link's slot is free again."""
    links = [Stream(stub, rpc="Link") for _ in range(32)]
    try:
        for link in links:
            link.send(link_open(swarm.model_id))
        for _ in range(2):
            assert_stream_refused(stub, [link_open(swarm.model_id)], Code.RESOURCE_EXHAUSTED, "limit of 32 links",
                                  rpc="Link")
        links.pop().close()
        with Stream(stub, rpc="Link") as again:
            assert again.send(link_open(swarm.model_id)) == pb.LinkResponse()
    finally:
        for link in links:
            link.close()
    assert_serves(stub, swarm.model_id)


def test_peers_survived_without_tracebacks(swarm) -> None:
    """Refusals are expected user errors: the peers log no stack trace for them and keep running."""
    for peer in swarm.peers:
        assert peer.process.process.poll() is None, peer.process.output()
        log = "\n".join(peer.process.lines)
        assert "Traceback" not in log and "Exception" not in log, log
