"""Fine-tuning data as people have it: OpenAI chat, ShareGPT and Alpaca rows, and data files streamed to the
coordinator in chunks.

The rows: for each format, the tokens and labels the coordinator builds (coordinator/data.py) equal those the
oracle (tests/finetune_oracle.py) builds on its own, from the chat template's text and character offsets
rather than from rendered prefixes; every kind of bad row fails naming its line. The runs: through a real
swarm (a coordinator and two peers of the tiny model carrying Llama-2-chat's template), a few rows of each
format train a step whose loss, and the evaluation after it, equal single-process PEFT's on the oracle's
tokens. The uploads: an in-process coordinator (the real service, upload store and gRPC server, with small
limits and a clock the test moves) for the protocol's refusals and bounds; the real swarm for a 3 MiB file
sent by the client, and the CLI for one-line refusals (a bad row, a model without a chat template).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import cli, finish, start_swarm
from finetune_oracle import batch, chat_tokens, eval_loss, examples, stream, train_locally
from tsotsa.auth import ADMIN_METADATA
from tsotsa.checkpoint import Checkpoint
from tsotsa.client.swarm import Swarm
from tsotsa.coordinator.data import DataError, Row, load_examples, parse_jsonl, tokenize
from tsotsa.coordinator.runs import RunManager
from tsotsa.coordinator.server import base_model
from tsotsa.coordinator.service import CoordinatorService
from tsotsa.coordinator.store import RunStore
from tsotsa.coordinator.uploads import CHUNK_BYTES, UploadStore
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.dht import start_dht
from tsotsa.errors import SwarmError
from tsotsa.rpc import open_channel, start_server
from tsotsa.run_credentials import RunSigner
from tsotsa.tiny_model import make_tiny_model
from tsotsa.training.loss import IGNORE_INDEX
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

ADMIN = "formats-admin"
Code = grpc.StatusCode
LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"), seed=7)
MICRO_BATCH, LR, SEQ_LEN = 2, 1e-2, 256
WAIT = 60.0

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "You answer with one color."},
                  {"role": "user", "content": "the color of snow?"}, {"role": "assistant", "content": "white"},
                  {"role": "user", "content": "and of coal?"}, {"role": "assistant", "content": " black "}]},
    {"messages": [{"role": "user", "content": "the color of the sky?"}, {"role": "assistant", "content": "blue"}],
     "id": 2},
    {"messages": [{"role": "user", "content": "grass?"}, {"role": "assistant", "content": "green, mostly"},
                  {"role": "user", "content": "thanks"}]},  # a last user turn: rendered, never learned
    {"messages": [{"role": "user", "content": "a lemon?"}, {"role": "assistant", "content": "yellow"}]},
]
SHAREGPT_ROWS = [
    {"conversations": [{"from": "system", "value": "Colors only."}, {"from": "human", "value": "plum?"},
                       {"from": "gpt", "value": "purple"}]},
    {"conversations": [{"from": "user", "value": "carrot?"}, {"from": "assistant", "value": "orange"},
                       {"from": "human", "value": "and a rose?"}, {"from": "gpt", "value": "pink"}]},
    {"conversations": [{"from": "human", "value": "soil?"}, {"from": "gpt", "value": "brown"}], "source": "x"},
]
ALPACA_ROWS = [
    {"instruction": "Name the color of the sea.", "input": "", "output": "blue"},
    {"instruction": "Name the color of this thing.", "input": "milk", "output": "white"},
    {"instruction": "Answer with a color.", "output": "green"},  # no "input" at all
    {"instruction": "Name the color.", "input": None, "output": "black"},  # null: no input either
]


def jsonl(rows: list[object]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def write(path: Path, rows: list[object]) -> Path:
    path.write_bytes(jsonl(rows))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The session's tiny model (same seed and shape), with Llama-2-chat's template in chat_template.jinja."""
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "model", layers=4, hidden=64, heads=4, vocab=512,
                           seed=1, chat_template="llama-2")


@pytest.fixture(scope="module")
def tokenizer(chat_model: Path):
    return AutoTokenizer.from_pretrained(chat_model)


# ------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("rows", [CHAT_ROWS, SHAREGPT_ROWS, ALPACA_ROWS], ids=["chat", "sharegpt", "alpaca"])
def test_each_format_learns_the_tokens_the_oracle_finds(rows, tokenizer, tmp_path: Path) -> None:
    data = write(tmp_path / "rows.jsonl", rows)
    built = load_examples(data, tokenizer, SEQ_LEN)
    expected = examples(data, tokenizer, SEQ_LEN)
    assert [(e.input_ids, e.labels) for e in built] == expected
    for example in built:  # not vacuous: every row learns something and ignores something
        assert any(label != IGNORE_INDEX for label in example.labels[1:])
        assert example.labels[0] == IGNORE_INDEX and IGNORE_INDEX in example.labels


def test_chat_labels_are_the_templates_assistant_text(tokenizer) -> None:
    """Spelled out for one conversation: the learned tokens decode to what Llama-2-chat's template writes for
    the assistant turns (" " + content.strip() + " </s>"), and the whole row is the template's own tokens."""
    [row] = parse_jsonl(jsonl(CHAT_ROWS[:1]), "d")
    [example] = tokenize([row], tokenizer, SEQ_LEN, "d")
    assert example.input_ids == tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"], return_dict=False)
    learned = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " white </s> black </s>"
    assert example.labels == chat_tokens(CHAT_ROWS[0]["messages"], tokenizer)[1]


def test_sharegpt_rows_are_chat_rows() -> None:
    parsed = parse_jsonl(jsonl([SHAREGPT_ROWS[0]]), "d")
    assert parsed == [Row(1, {"messages": [{"role": "system", "content": "Colors only."},
                                           {"role": "user", "content": "plum?"},
                                           {"role": "assistant", "content": "purple"}]})]


def test_alpaca_rows_are_stanfords_prompts() -> None:
    rows = parse_jsonl(jsonl(ALPACA_ROWS[:2]), "d")
    assert rows[0].fields == {"prompt": "Below is an instruction that describes a task. Write a response that "
                                        "appropriately completes the request.\n\n### Instruction:\nName the color "
                                        "of the sea.\n\n### Response:", "completion": "blue"}
    assert rows[1].fields["prompt"].startswith("Below is an instruction that describes a task, paired with an "
                                               "input that provides further context.")
    assert rows[1].fields["prompt"].endswith("### Instruction:\nName the color of this thing.\n\n### Input:\nmilk"
                                             "\n\n### Response:")


GOOD = {"text": "a good first row"}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "ho"}


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": "hi"}, r'"messages" must be a list, got str'),
    ({"messages": []}, r'"messages" is empty'),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object, got str"),
    ({"messages": [USER]}, r'"messages" has no assistant turn'),
    ({"messages": [{"role": "system", "content": "s"}]}, r'"messages" holds only a system turn'),
    ({"messages": [ASSISTANT, USER]}, r"messages\[0\]: expected user, got assistant \(after an optional system"),
    ({"messages": [USER, USER, ASSISTANT]}, r"messages\[1\]: expected assistant, got user"),
    ({"messages": [USER, ASSISTANT, {"role": "system", "content": "late"}]}, r"messages\[2\]: expected user, got sys"),
    ({"messages": [{"role": "tool", "content": "x"}, ASSISTANT]}, r"messages\[0\]: role 'tool' is not one of system"),
    ({"messages": [{"content": "x"}, ASSISTANT]}, r'messages\[0\]: "role" is missing'),
    ({"messages": [USER, {"role": "assistant", "content": None}]}, r'messages\[1\]: "content" must be a string, got '
                                                                   r"NoneType"),
    ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, r"messages\[1\]: an assistant turn with empty"),
    ({"messages": [USER, ASSISTANT], "text": "x"}, r'has both "text" and "messages"; use one format a row'),
    ({"messages": [USER, ASSISTANT], "conversations": []}, r'has both "messages" and "conversations"'),
    ({"conversations": {"from": "human"}}, r'"conversations" must be a list, got dict'),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]: \"from\" 'bot' is not one of system, "
                                                         r"human, gpt"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}, r'conversations\[1\]: "value" is missing'),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]},
     r"conversations\[1\]: expected gpt, got human"),
    ({"instruction": "x"}, r'"output" is missing'),
    ({"input": "x", "output": "y"}, r'"instruction" is missing'),
    ({"instruction": "x", "output": ""}, r'"output" is empty'),
    ({"instruction": 3, "output": "y"}, r'"instruction" must be a string, got int'),
    ({"instruction": "x", "input": ["a"], "output": "y"}, r'"input" must be a string, got list'),
    ({"instruction": "x", "output": "y", "completion": "z"}, r'has both "prompt"/"completion" and '
                                                             r'"instruction"/"input"/"output"'),
    ({"mesages": []}, r'needs "text", "prompt" and "completion", "messages", "conversations", or "instruction" and '
                      r'"output"$'),
])
def test_bad_rows_name_their_line(row: dict, message: str) -> None:
    with pytest.raises(DataError, match=rf"^d line 2: {message}"):
        parse_jsonl(jsonl([GOOD, row]), "d")


def test_a_model_without_a_chat_template_refuses_chat_rows(tiny_model: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_model)
    rows = parse_jsonl(jsonl([GOOD, SHAREGPT_ROWS[2]]), "d")
    with pytest.raises(DataError, match=r"^d line 2: the model has no chat template; chat rows"):
        tokenize(rows, plain, SEQ_LEN, "d")
    assert len(tokenize(rows[:1], plain, SEQ_LEN, "d")) == 1  # the other formats need none


def with_template(tokenizer, template: str):
    """A copy of the tokenizer with another chat template (the module's is not changed)."""
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = template
    return other


def test_a_template_whose_prefixes_are_not_token_prefixes_is_refused(tokenizer) -> None:
    """This template starts with the number of messages, so no prefix of a conversation renders as a prefix of
    it: which tokens are the assistant's cannot be known, and the row is refused rather than guessed."""
    counting = with_template(tokenizer, "{{ messages | length }}{% for m in messages %} {{ m['role'] }}: "
                                        "{{ m['content'] }}{% endfor %}")
    rows = parse_jsonl(jsonl([GOOD, CHAT_ROWS[1]]), "d")
    with pytest.raises(DataError, match=r"^d line 2: the chat template's tokens for messages\[:1\] are not a prefix "
                                        r"of its tokens for messages\[:2\], so the tokens of assistant turn 1"):
        tokenize(rows, counting, SEQ_LEN, "d")


def test_the_templates_own_refusal_names_the_line(tokenizer) -> None:
    strict = with_template(tokenizer, "{% for m in messages %}{% if m['content'] == 'forbidden' %}"
                                      "{{ raise_exception('no forbidden words') }}{% endif %}{{ m['content'] }}"
                                      "{% endfor %}")
    rows = parse_jsonl(jsonl([GOOD, {"messages": [{"role": "user", "content": "forbidden"}, ASSISTANT]}]), "d")
    with pytest.raises(DataError, match=r"^d line 2: the chat template refused the conversation: .*no forbidden words"):
        tokenize(rows, strict, SEQ_LEN, "d")


def test_a_conversation_longer_than_seq_len_is_refused(tokenizer) -> None:
    rows = parse_jsonl(jsonl(CHAT_ROWS), "d")
    longest = max(len(e.input_ids) for e in tokenize(rows, tokenizer, SEQ_LEN, "d"))
    with pytest.raises(DataError, match=rf"^d line \d: {longest} tokens exceed --seq-len {longest - 1}$"):
        tokenize(rows, tokenizer, longest - 1, "d")


# ------------------------------------------------------------------ an in-process coordinator


class Clock:
    """The upload store's time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Local:
    uploads: UploadStore
    clock: Clock
    stub: pb_grpc.CoordinatorStub
    directory: Path


ADMIN_MD = ((ADMIN_METADATA, ADMIN),)
TTL, MAX_BYTES, MAX_PENDING, IDLE = 600.0, 2 << 20, 3, 1.0


@pytest.fixture(scope="module")
def local(chat_model: Path, tmp_path_factory) -> Iterator[Local]:
    """The real CoordinatorService on a gRPC server in this process, without peers (runs it creates wait for
    them), with uploads of at most 2 MiB, 3 at once, 4 MiB together, a 1 s idle limit and a test clock."""
    checkpoint = Checkpoint.open(chat_model)
    state_dir = tmp_path_factory.mktemp("coordinator")
    dht = start_dht([])
    swarm = Swarm(dht, checkpoint.model_id, 4)
    store = RunStore(state_dir / "coordinator.sqlite")
    runs = RunManager(store, state_dir, base_model(checkpoint), swarm, RunSigner(state_dir / "run-signing.key"))
    clock = Clock()
    (state_dir / "uploads").mkdir()
    (state_dir / "uploads" / "left-by-a-killed-coordinator.part").write_bytes(b"x")
    uploads = UploadStore(state_dir / "uploads", max_upload_bytes=MAX_BYTES, max_store_bytes=2 * MAX_BYTES,
                          max_pending=MAX_PENDING, ttl=TTL, sweep_every=0.05, clock=clock)
    service = CoordinatorService(checkpoint, checkpoint.model_id, dht, runs, ADMIN, uploads=uploads,
                                 upload_idle_timeout=IDLE)
    server, port = start_server(lambda s: pb_grpc.add_CoordinatorServicer_to_server(service, s), "127.0.0.1", 0,
                                None, workers=16)
    channel = open_channel(f"127.0.0.1:{port}", None)
    try:
        yield Local(uploads, clock, pb_grpc.CoordinatorStub(channel), state_dir / "uploads")
    finally:
        channel.close()
        server.stop(0)
        runs.shutdown()
        uploads.close()
        store.close()
        swarm.close()
        dht.shutdown()


def chunks_of(data: bytes, name: str = "data.jsonl", size: int | None = None, sha: str | None = None,
              chunk: int = CHUNK_BYTES) -> list[pb.DataChunk]:
    """DataChunks as the protocol wants them, or with a declared size or sha256 that lies."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    out = [pb.DataChunk(data=piece) for piece in pieces]
    out[0].name, out[0].total_bytes = name, len(data) if size is None else size
    out[-1].sha256 = hashlib.sha256(data).hexdigest() if sha is None else sha
    return out


def upload(local: Local, chunks: list[pb.DataChunk], metadata=ADMIN_MD) -> pb.DataUpload:
    return local.stub.UploadData(iter(chunks), metadata=metadata, timeout=WAIT)


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def files(local: Local) -> list[str]:
    return sorted(path.name for path in local.directory.iterdir())


def create(local: Local, name: str, **data) -> pb.RunInfo:
    config = pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=1, seq_len=SEQ_LEN)
    return local.stub.CreateRun(pb.CreateRunRequest(name=name, config=config, **data), metadata=ADMIN_MD,
                                timeout=WAIT)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:g} s"
        time.sleep(0.02)


def test_an_upload_in_chunks_is_checked_used_once_and_deleted(local: Local) -> None:
    assert "left-by-a-killed-coordinator.part" not in files(local)  # a new store starts empty
    data = jsonl([{"text": f"row {n} of an upload in chunks"} for n in range(40_000)])[:CHUNK_BYTES + 100_000]
    data = data[:data.rindex(b"\n") + 1]  # whole rows, past one chunk
    receipt = upload(local, chunks_of(data, "chats.jsonl"))
    assert len(chunks_of(data)) == 2
    assert (receipt.total_bytes, receipt.sha256, receipt.expires_in) == (len(data), hashlib.sha256(data).hexdigest(),
                                                                         TTL)
    assert files(local) == [f"{receipt.upload_id}.jsonl"]
    assert (local.directory / files(local)[0]).read_bytes() == data
    # the same upload as training and evaluation data: its rows counted, then the upload is gone
    info = create(local, "uploaded", train_upload=receipt.upload_id, eval_upload=receipt.upload_id)
    assert (info.name, info.train_examples, info.eval_examples) == ("uploaded", data.count(b"\n"), data.count(b"\n"))
    assert files(local) == []
    code, details = refused(lambda: create(local, "again", train_upload=receipt.upload_id))
    assert code == Code.NOT_FOUND and details.startswith(f"no data upload '{receipt.upload_id}' to use: unknown")


def test_a_refused_run_keeps_its_upload_for_another_try(local: Local) -> None:
    receipt = upload(local, chunks_of(jsonl([GOOD, {"messages": [USER]}]), "mine.jsonl"))
    for _ in range(2):  # the second time the upload is still there: the same refusal, not NOT_FOUND
        code, details = refused(lambda: create(local, "bad-rows", train_upload=receipt.upload_id))
        assert (code, details) == (Code.INVALID_ARGUMENT, 'mine.jsonl line 2: "messages" has no assistant turn: '
                                                          "nothing to learn")
    code, details = refused(lambda: create(local, "both", train_upload=receipt.upload_id, train_data=b"{}"))
    assert (code, details) == (Code.INVALID_ARGUMENT, "both train_data and train_upload are set: send the train data "
                                                      "one way")
    local.clock.now += TTL + 1  # unused for longer than it is kept: the sweeper deletes it
    wait_until(lambda: files(local) == [], "the expired upload's deletion")
    code, details = refused(lambda: create(local, "late", train_upload=receipt.upload_id))
    assert code == Code.NOT_FOUND and "expired (unused uploads are kept 600 s)" in details


@pytest.mark.parametrize(("chunks", "code", "message"), [
    (chunks_of(b"x" * 3000, size=5000), Code.INVALID_ARGUMENT, r"^data.jsonl: truncated: 3000 of the 5000 bytes "
                                                               r"declared arrived$"),
    (chunks_of(b"x" * 3000, sha="0" * 64), Code.INVALID_ARGUMENT,
     r"^data.jsonl: sha256 mismatch: the 3000 bytes received hash to [0-9a-f]{64}, the upload says 0{64}$"),
    (chunks_of(b"x" * 3000, sha=""), Code.INVALID_ARGUMENT, r"^data.jsonl: the upload ended without the sha256 its "
                                                            r"last chunk must carry \(3000 of 3000 bytes arrived\)$"),
    (chunks_of(b"x" * 3000, sha="abc"), Code.INVALID_ARGUMENT, r"^data.jsonl: the sha256 'abc' is not 64 hex"),
    (chunks_of(b"x" * 3000, size=2000), Code.INVALID_ARGUMENT, r"^data.jsonl: chunk 0 goes past the 2000 bytes the "
                                                               r"first chunk declared$"),
    (chunks_of(b"x" * (CHUNK_BYTES + 1), chunk=CHUNK_BYTES + 1), Code.INVALID_ARGUMENT,
     rf"^data.jsonl: chunk 0 holds {CHUNK_BYTES + 1} bytes; a chunk holds at most {CHUNK_BYTES}$"),
    (chunks_of(b"x" * 3000, chunk=1000)[:1] + [pb.DataChunk(data=b"x" * 1000, sha256="0" * 64),
                                              pb.DataChunk(data=b"x" * 1000)], Code.INVALID_ARGUMENT,
     r"^data.jsonl: chunk 2 follows the chunk that carried the sha256 \(it must be the last\)$"),
    (chunks_of(b"x" * 3000, chunk=1000)[:1] + [pb.DataChunk(name="other", data=b"x" * 2000)], Code.INVALID_ARGUMENT,
     r"^data.jsonl: chunk 1 names another file or size"),
    ([], Code.INVALID_ARGUMENT, r"^UploadData got no chunks$"),
    ([pb.DataChunk(name="huge.jsonl", total_bytes=MAX_BYTES + 1)], Code.RESOURCE_EXHAUSTED,
     rf"^huge.jsonl: {MAX_BYTES + 1} bytes is more than an upload may hold \({MAX_BYTES} bytes\)$"),
], ids=["truncated", "sha-mismatch", "no-sha", "bad-sha", "past-size", "big-chunk", "after-sha", "renamed", "empty",
        "over-cap"])
def test_bad_uploads_are_refused_precisely_and_leave_nothing(local: Local, chunks, code, message) -> None:
    got_code, details = refused(lambda: upload(local, chunks))
    assert got_code == code and re.search(message, details), (got_code, details)
    assert files(local) == [] and local.uploads.pending() == []


@pytest.mark.parametrize("metadata", [(), ((ADMIN_METADATA, "wrong"),)], ids=["none", "wrong"])
def test_uploads_need_the_admin_token(local: Local, metadata) -> None:
    assert refused(lambda: upload(local, chunks_of(b"x"), metadata)) == (Code.PERMISSION_DENIED,
                                                                         "missing or wrong admin token")
    assert files(local) == []


class HeldUpload:
    """An upload that sends its first chunk and then, until released, a byte every 0.2 s (a slow client) or
    nothing (a stuck one)."""

    def __init__(self, local: Local, size: int = 1000, trickle: bool = True) -> None:
        self.release = threading.Event()
        first = pb.DataChunk(name="held", total_bytes=size, data=b"x" * 10)

        def chunks() -> Iterator[pb.DataChunk]:
            yield first
            while not self.release.wait(0.2 if trickle else WAIT):
                yield pb.DataChunk(data=b"x")

        self.future = local.stub.UploadData.future(chunks(), metadata=ADMIN_MD, timeout=WAIT)


def receiving(local: Local) -> int:
    return sum(not upload.complete for upload in local.uploads.pending())


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(local: Local) -> None:
    held = HeldUpload(local)
    wait_until(lambda: receiving(local) == 1 and len(files(local)) == 1, "the upload's start")
    assert files(local)[0].endswith(".part")
    held.future.cancel()
    held.release.set()
    wait_until(lambda: files(local) == [] and local.uploads.pending() == [], "the cancelled upload's removal")


def test_a_client_that_stops_sending_is_cancelled(local: Local) -> None:
    held = HeldUpload(local, trickle=False)
    with pytest.raises(grpc.RpcError) as caught:
        held.future.result(timeout=WAIT)  # the coordinator gives up after IDLE seconds without a chunk
    held.release.set()
    assert caught.value.code() == Code.CANCELLED
    wait_until(lambda: files(local) == [] and local.uploads.pending() == [], "the idle upload's removal")


def test_pending_uploads_are_bounded(local: Local) -> None:
    """Complete, unused uploads make room for new ones, oldest first; uploads in progress are never dropped, so
    when they fill the store a new one is refused."""
    def kept() -> list[str]:
        return sorted(name.removesuffix(".jsonl") for name in files(local))

    small = [upload(local, chunks_of(b"%d" % n * 1000)).upload_id for n in range(4)]  # 3 at most: the oldest goes
    assert kept() == sorted(small[1:])
    big = [upload(local, chunks_of(b"%d" % n * (MAX_BYTES - 10))).upload_id for n in range(2)]
    # the first big one made room by count (the second small one went), the second by bytes, 4 MiB together
    # at most: two more small ones went although three uploads were allowed
    assert kept() == sorted(big)
    assert refused(lambda: create(local, "dropped", train_upload=small[0]))[0] == Code.NOT_FOUND

    held = [HeldUpload(local, MAX_BYTES) for _ in range(2)]
    try:
        wait_until(lambda: receiving(local) == 2, "two uploads in progress")
        assert [name.endswith(".part") for name in files(local)] == [True, True]  # they took the big ones' room
        code, details = refused(lambda: upload(local, chunks_of(b"z" * 1000)))
        assert code == Code.RESOURCE_EXHAUSTED and details.startswith(
            f"data.jsonl: the coordinator is receiving or using 2 uploads ({2 * MAX_BYTES} bytes), its limit")
    finally:
        for each in held:
            each.future.cancel()
            each.release.set()
    wait_until(lambda: receiving(local) == 0, "the held uploads' end")
    local.clock.now += TTL + 1
    wait_until(lambda: files(local) == [], "the rest's expiry")


# ------------------------------------------------------------------------------- a real swarm


@pytest.fixture(scope="module")
def swarm(chat_model: Path):
    swarm = start_swarm(chat_model, ["0:2", "2:4"], admin_token=ADMIN)
    yield swarm
    swarm.stop()


def first_batch_loss(model_dir: Path, data: Path, labels_of: Callable[[list[int], list[int]], list[int]]) -> float:
    """The base model's loss on the run's first micro-batch, with labels LABELS_OF(input_ids, labels)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = examples(data, tokenizer, SEQ_LEN)
    picked = [rows[i] for i in stream(len(rows), LORA["seed"], MICRO_BATCH)]
    input_ids, mask, labels = batch([(ids, labels_of(ids, labels)) for ids, labels in picked], tokenizer.pad_token_id)
    with torch.no_grad():
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()


@pytest.mark.parametrize("rows", [CHAT_ROWS, SHAREGPT_ROWS, ALPACA_ROWS], ids=["chat", "sharegpt", "alpaca"])
def test_each_format_trains_through_the_swarm_as_peft_does(rows, swarm, chat_model: Path, tmp_path: Path,
                                                           request) -> None:
    """One optimizer step through two peers: its loss is PEFT's on the oracle's tokens and labels, and so is
    the evaluation of the adapter after it on every row; a loss on every token would have been another."""
    data = write(tmp_path / f"{request.node.callspec.id}.jsonl", rows)
    name = f"format-{request.node.callspec.id}"
    config = pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, lora_r=LORA["r"],
                          lora_alpha=LORA["alpha"], target_modules=list(LORA["target_modules"]), lr=LR,
                          seed=LORA["seed"])
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        created = client.create_run(name, config, data, data)
        assert (created.train_examples, created.eval_examples) == (len(rows), len(rows))
        info = finish(client, name)
    model, losses = train_locally(chat_model, data, LORA, steps=1, micro_batch=MICRO_BATCH, grad_accum=1, lr=LR,
                                  seq_len=SEQ_LEN)
    [done] = info.rounds
    assert abs(done.train_loss - losses[0]) <= 1e-4, (done.train_loss, losses)
    assert abs(done.eval_loss - eval_loss(model, chat_model, data, SEQ_LEN, MICRO_BATCH)) <= 1e-4
    every_token = first_batch_loss(chat_model, data, lambda ids, labels: ids)
    assert abs(first_batch_loss(chat_model, data, lambda ids, labels: labels) - losses[0]) <= 1e-5
    assert abs(every_token - done.train_loss) > 1e-2, (every_token, done.train_loss)


def test_a_file_of_several_chunks_is_uploaded_and_parsed(swarm, tmp_path: Path) -> None:
    """3 MiB of rows through the client: streamed in 1 MiB chunks, every row counted, the run's copy the same
    bytes, nothing left in the uploads directory, and the run trains."""
    rows = [{"text": f"row {n}: the swarm pools ordinary lab machines " * 8} for n in range(8000)]
    data = write(tmp_path / "big.jsonl", rows)
    assert data.stat().st_size > 3 * CHUNK_BYTES
    config = pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=MICRO_BATCH, seq_len=512, lora_r=4,
                          target_modules=["q_proj"], lr=LR)
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as client:
        created = client.create_run("big-upload", config, data, None)
        assert (created.train_examples, created.eval_examples) == (len(rows), 0)
        finish(client, "big-upload")
    state = Path(swarm.state_dir)
    assert (state / "runs" / "big-upload" / "train.jsonl").read_bytes() == data.read_bytes()
    assert list((state / "uploads").iterdir()) == []
    with CoordinatorClient(swarm.coordinator_address) as outsider:  # no admin token: refused at the upload
        with pytest.raises(SwarmError, match="^missing or wrong admin token$"):
            outsider.create_run("no-admin", config, data, None)


def coordinator_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSOTSA_ADMIN_TOKEN": ADMIN}
    return subprocess.run([*cli("tsotsa-coordinator"), *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_refuses_a_bad_row_in_one_line_naming_it(swarm, tmp_path: Path) -> None:
    bad = write(tmp_path / "chats.jsonl", [CHAT_ROWS[1], SHAREGPT_ROWS[0], {"messages": [USER, USER]}])
    done = coordinator_cli("finetune", "--coordinator", swarm.coordinator_address, "--name", "refused-row",
                           "--data", str(bad))
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: chats.jsonl line 3: messages[1]: expected assistant, got user (after an "
                                   "optional system turn, user and assistant turns alternate, starting with user)")
    with CoordinatorClient(swarm.coordinator_address) as client:
        with pytest.raises(SwarmError, match="no run named"):
            client.run("refused-row")


def test_a_model_without_a_chat_template_refuses_chat_data_at_create_run(tiny_model: Path, tmp_path: Path) -> None:
    """A coordinator of the plain tiny model (no chat template): `finetune` with chat rows fails before any
    round, in one line naming the file and line."""
    plain = start_swarm(tiny_model, [], admin_token=ADMIN)
    try:
        data = write(tmp_path / "chat.jsonl", [{"text": "fine"}, CHAT_ROWS[0]])
        done = coordinator_cli("finetune", "--coordinator", plain.coordinator_address, "--name", "no-template",
                               "--data", str(data))
    finally:
        plain.stop()
    assert done.returncode == 1
    assert done.stderr.startswith("error: chat.jsonl line 2: the model has no chat template; chat rows")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
