"""The coordinator's own faults: a locked database, a failed run whose failure cannot be written at once, a
watcher of more events than are kept, two launches of one name, a full disk under a checkpoint, and streams
that would take every worker.

The coordinator here is the real service in this process (its RunManager, RunStore, a hivemind DHT node and
a gRPC server with the 16 workers coordinator/server.py gives it), without peers: runs launched on it wait
for peers, which is what holds their watchers open. Faults come from real sources: a second sqlite3
connection holding the write lock, a data file that is gone, threads racing, an OSError(ENOSPC) from the
exporter's file write, a writer process SIGKILLed before its rename.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from tsotsa.auth import ADMIN_METADATA
from tsotsa.checkpoint import Checkpoint, load_config
from tsotsa.client.swarm import Swarm
from tsotsa.dht import start_dht
from tsotsa.records import ServerRecord, ServerState
from tsotsa.rpc import open_channel, start_server
from tsotsa.run_credentials import RunSigner
from tsotsa.training import export
from tsotsa.training.export import initial_adapter, read_adapter, write_adapter
from tsotsa.training.lora import LoraSettings
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc
from tsotsa.coordinator import trainer
from tsotsa.coordinator.runs import MAX_EVENTS, EventLog, RunManager
from tsotsa.coordinator.server import base_model
from tsotsa.coordinator.service import MAX_STREAMS, CoordinatorService
from tsotsa.coordinator.store import RunStore, StoreBusy
from tsotsa.coordinator.trainer import BaseModel, RunDriver, RunSpec

ADMIN = "admin-secret"
WORKERS = 16  # what coordinator/server.py starts the coordinator's gRPC server with
SETTINGS = LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=5)
TRAIN = b'{"text": "the color of snow is white"}\n{"text": "the color of grass is green"}\n'
CONFIG = pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=1, seq_len=64)
WAIT = 60.0  # seconds a test waits for something that should happen well before; it fails after that


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout:g} s")
        time.sleep(0.02)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> BaseModel:
    return base_model(Checkpoint.open(tiny_model))


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    """The coordinator's view of a swarm that has no peers (a lone DHT node)."""
    dht = start_dht([])
    swarm = Swarm(dht, Checkpoint.open(tiny_model).model_id, 4)
    yield swarm
    swarm.close()
    dht.shutdown()


@dataclass
class Coordinator:
    state_dir: Path
    store: RunStore
    runs: RunManager
    stub: pb_grpc.CoordinatorStub
    model_id: str

    def create_run(self, name: str, train: bytes = TRAIN) -> pb.RunInfo:
        return self.stub.CreateRun(pb.CreateRunRequest(name=name, config=CONFIG, train_name="train.jsonl",
                                                       train_data=train),
                                   metadata=((ADMIN_METADATA, ADMIN),), timeout=WAIT)

    def stop_run(self, name: str) -> None:
        self.stub.StopRun(pb.RunRequest(name=name), metadata=((ADMIN_METADATA, ADMIN),), timeout=WAIT)


@pytest.fixture(scope="module")
def coordinator(tiny_model: Path, base: BaseModel, swarm: Swarm, tmp_path_factory) -> Iterator[Coordinator]:
    checkpoint = Checkpoint.open(tiny_model)
    state_dir = tmp_path_factory.mktemp("coordinator")
    store = RunStore(state_dir / "coordinator.sqlite")
    runs = RunManager(store, state_dir, base, swarm, RunSigner(state_dir / "run-signing.key"))
    service = CoordinatorService(checkpoint, checkpoint.model_id, swarm.dht, runs, ADMIN)
    server, port = start_server(lambda s: pb_grpc.add_CoordinatorServicer_to_server(service, s), "127.0.0.1", 0,
                                None, workers=WORKERS)
    channel = open_channel(f"127.0.0.1:{port}", None)
    try:
        yield Coordinator(state_dir, store, runs, pb_grpc.CoordinatorStub(channel), checkpoint.model_id)
    finally:
        channel.close()
        server.stop(0)
        runs.shutdown()
        store.close()


@pytest.fixture
def manager(base: BaseModel, swarm: Swarm, tmp_path: Path) -> Iterator[RunManager]:
    """A RunManager of its own (its own database, so a test may lock it), on the module's swarm."""
    store = RunStore(tmp_path / "coordinator.sqlite", busy_timeout=0.05, retries=1, retry_pause=0.05)
    runs = RunManager(store, tmp_path, base, swarm, RunSigner(tmp_path / "run-signing.key"))
    yield runs
    runs.shutdown()
    store.close()


class WriteLock:
    """A second connection to the database holding its write lock (BEGIN IMMEDIATE) until `release`."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        self.conn.close()


class Released(logging.Handler):
    """Calls `action` the first time a record whose message contains `text` is logged."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.text, self.action, self.seen = text, action, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen == 1:
                self.action()


# ------------------------------------------------------ 1. a locked database


def test_a_write_waits_out_another_connections_write_lock(tmp_path: Path, caplog) -> None:
    """The lock is held, in another thread, until the store's first attempt has given up (busy timeout 0.1 s):
    without the retry the write would fail; with it the write lands once the lock is released."""
    path = tmp_path / "coordinator.sqlite"
    store = RunStore(path, busy_timeout=0.1, retries=5, retry_pause=0.05)
    store.create_run("run", {})
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        lock = WriteLock(path)
        lock.conn.execute("UPDATE runs SET message = 'written by the other connection'")
        held.set()
        release.wait(WAIT)
        lock.release()

    caplog.set_level(logging.WARNING, logger="tsotsa.coordinator.store")
    holder = threading.Thread(target=hold)
    retries = Released("is locked by another connection", release.set)
    logger = logging.getLogger("tsotsa.coordinator.store")
    logger.addHandler(retries)
    try:
        holder.start()
        assert held.wait(WAIT)
        assert store.get_run("run").message == ""  # reads go on under the lock (WAL); its write is not visible
        store.set_state("run", "running", "written after the lock")
    finally:
        release.set()
        logger.removeHandler(retries)
        holder.join()
    assert retries.seen >= 1  # the first attempt did meet the lock
    run = store.get_run("run")
    assert (run.state, run.message) == ("running", "written after the lock")  # after the other write, not lost
    store.close()


def test_a_lock_held_through_every_attempt_fails_with_one_line(tmp_path: Path, caplog) -> None:
    path = tmp_path / "coordinator.sqlite"
    store = RunStore(path, busy_timeout=0.01, retries=2, retry_pause=0.01)
    store.create_run("run", {})
    lock = WriteLock(path)
    caplog.set_level(logging.WARNING, logger="tsotsa.coordinator.store")
    retries = Released("is locked by another connection", lambda: None)
    logger = logging.getLogger("tsotsa.coordinator.store")
    logger.addHandler(retries)
    try:
        with pytest.raises(StoreBusy, match=r"stayed locked by another connection through 3 attempts") as raised:
            store.set_state("run", "running")
        assert "\n" not in str(raised.value)
        assert retries.seen == 2  # bounded: two more attempts after the first, then the error
        assert store.get_run("run").state == "queued"
    finally:
        logger.removeHandler(retries)
        lock.release()
    store.set_state("run", "running")
    assert store.get_run("run").state == "running"
    store.close()


# ------------------------------------- 2. a failure whose first write fails


def test_a_failed_run_is_reported_failed_while_the_store_refuses_the_write(manager: RunManager, tmp_path: Path,
                                                                          caplog) -> None:
    """The run fails at once (its data file is gone); the store's write lock is held by another connection,
    so recording the failure fails too. Watchers and GetRun (RunManager.get) say failed anyway, and the
    store says it once the lock goes."""
    caplog.set_level(logging.WARNING, logger="tsotsa.coordinator.trainer")
    missing = tmp_path / "gone" / "train.jsonl"
    spec = RunSpec(name="lost-data", train_file=str(missing), eval_file=None, out_dir=str(tmp_path / "out"))
    manager.store.create_run(spec.name, spec.to_dict())
    lock = WriteLock(manager.store.path)
    try:
        assert manager.resume_unfinished() == ["lost-data"]
        events = list(manager.watch("lost-data"))  # ends: the run's final state closes its log
        assert [(e.kind, e.state) for e in events] == [("state", "failed")]
        assert str(missing) in events[0].message and "cannot read" in events[0].message
        wait_until(lambda: any("cannot record its state 'failed'" in r.getMessage() for r in caplog.records),
                   "a failed write of the run's state")
        assert manager.store.get_run("lost-data").state == "queued"  # the store has not taken it
        reported = manager.get("lost-data")
        assert (reported.state, reported.message) == ("failed", events[0].message)
    finally:
        lock.release()
    driver = manager.drivers["lost-data"]
    driver.join(WAIT)
    assert not driver.alive and driver.unsaved_state is None
    stored = manager.store.get_run("lost-data")
    assert (stored.state, stored.message) == ("failed", events[0].message)
    assert manager.get("lost-data").state == "failed"


# ------------------------------------------------- 3. more events than kept


def step(i: int) -> pb.RunEvent:
    return pb.RunEvent(kind="step", round=i // 1000, steps_done=i)


def test_a_watcher_keeps_getting_events_past_the_kept_window() -> None:
    log = EventLog()
    for i in range(MAX_EVENTS):
        log.emit(step(i))
    watcher = log.follow(lambda: True)
    assert [next(watcher).steps_done for _ in range(MAX_EVENTS)] == list(range(MAX_EVENTS))
    for i in range(MAX_EVENTS, MAX_EVENTS + 5):
        log.emit(step(i))  # each one pushes the oldest out of the window
    log.emit(pb.RunEvent(kind="state", state="finished"))
    rest = list(watcher)
    assert [e.steps_done for e in rest[:-1]] == list(range(MAX_EVENTS, MAX_EVENTS + 5))
    assert (rest[-1].kind, rest[-1].state) == ("state", "finished")
    assert log.emitted == MAX_EVENTS + 6


def test_a_watcher_that_fell_behind_goes_on_from_the_oldest_kept_event() -> None:
    log = EventLog()
    watcher = log.follow(lambda: True)
    for i in range(3):
        log.emit(step(i))
    assert [next(watcher).steps_done for _ in range(3)] == [0, 1, 2]
    total = 3 + 2 * MAX_EVENTS
    for i in range(3, total):
        log.emit(step(i))
    log.emit(pb.RunEvent(kind="state", state="stopped"))
    rest = list(watcher)
    # The window holds the last MAX_EVENTS events, the final state among them.
    assert [e.steps_done for e in rest[:-1]] == list(range(total - MAX_EVENTS + 1, total))
    assert rest[-1].state == "stopped"
    late = list(log.follow(lambda: True))  # a watcher that joins now replays the same window
    assert late == rest


def test_watch_run_streams_past_the_kept_window_over_grpc(coordinator: Coordinator) -> None:
    """A real run (waiting for peers) and a real WatchRun stream; 3 * 4,000 step events go into the run's
    event log, each batch once the watcher has the one before (so it never falls behind the window)."""
    name, batch, batches = "long-watch", 4_000, 3
    coordinator.create_run(name)
    received: list[pb.RunEvent] = []
    arrived = threading.Condition()
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            for event in coordinator.stub.WatchRun(pb.RunRequest(name=name), timeout=10 * WAIT):
                with arrived:
                    received.append(event)
                    arrived.notify_all()
        except BaseException as error:  # reported by the test below
            failure.append(error)

    def have(predicate: Callable[[pb.RunEvent], bool]) -> None:
        with arrived:
            assert arrived.wait_for(lambda: failure or any(predicate(e) for e in received), WAIT), \
                (len(received), received[-1:])
        assert not failure, failure

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        have(lambda e: e.kind == "state" and e.state == "waiting")
        emit = coordinator.runs.drivers[name].emit  # the run's own event channel (EventLog.emit)
        for b in range(batches):
            for i in range(b * batch, (b + 1) * batch):
                emit(step(i))
            have(lambda e, last=(b + 1) * batch - 1: e.kind == "step" and e.steps_done == last)
    finally:
        coordinator.stop_run(name)
        watcher.join(WAIT)
    assert not watcher.is_alive() and not failure, failure
    steps = [e.steps_done for e in received if e.kind == "step"]
    assert steps == list(range(batch * batches)) and len(received) > MAX_EVENTS
    assert (received[-1].kind, received[-1].state) == ("state", "stopped")


# ------------------------------------------------ 4. two launches, one name


def test_a_run_longer_than_the_models_positions_is_refused_at_creation(coordinator: Coordinator) -> None:
    config = pb.RunConfig()
    config.CopyFrom(CONFIG)
    config.seq_len = 1 << 20
    with pytest.raises(grpc.RpcError) as refused:
        coordinator.stub.CreateRun(pb.CreateRunRequest(name="too-long", config=config, train_name="train.jsonl",
                                                       train_data=TRAIN),
                                   metadata=((ADMIN_METADATA, ADMIN),), timeout=WAIT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_position_embeddings" in refused.value.details()
    assert not (coordinator.state_dir / "runs" / "too-long").exists()


def test_fetch_sends_a_file_once_however_often_it_is_named(coordinator: Coordinator, tiny_model: Path) -> None:
    names = [name for name in ("tokenizer.json", "tokenizer_config.json") if (tiny_model / name).is_file()][:1]
    request = pb.FetchRequest(model_id=coordinator.model_id, file_names=names * 50)
    chunks = list(coordinator.stub.Fetch(request, timeout=WAIT))
    assert names and {chunk.name for chunk in chunks} == set(names)
    assert sum(1 for chunk in chunks if chunk.offset == 0) == 1


def test_two_create_runs_with_one_name_never_touch_each_others_directory(coordinator: Coordinator) -> None:
    for attempt in range(4):
        name = f"race-{attempt}"
        data = {side: f'{{"text": "{side} wrote this file, attempt {attempt}"}}\n'.encode() for side in ("a", "b")}
        start = threading.Barrier(2)
        outcome: dict[str, object] = {}

        def launch(side: str) -> None:
            start.wait()
            try:
                outcome[side] = coordinator.create_run(name, data[side])
            except grpc.RpcError as error:
                outcome[side] = error

        threads = [threading.Thread(target=launch, args=(side,)) for side in data]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [side for side, result in outcome.items() if isinstance(result, pb.RunInfo)]
        assert len(winners) == 1, outcome
        (winner,), loser = winners, "b" if winners == ["a"] else "a"
        refusal = outcome[loser]
        assert refusal.code() == grpc.StatusCode.ALREADY_EXISTS, refusal
        assert refusal.details() == f"a run named {name!r} already exists"
        run_dir = coordinator.state_dir / "runs" / name
        assert (run_dir / "train.jsonl").read_bytes() == data[winner]  # the winner's, neither removed nor overwritten
        assert coordinator.store.get_run(name).config["train_file"] == str(run_dir / "train.jsonl")
        coordinator.stop_run(name)


# -------------------------------------------------- 5. a full disk, a kill


def adapter(tiny_model: Path, seed: int) -> dict[str, torch.Tensor]:
    """The initial adapter with B as if trained, so two of them tell apart."""
    tensors = initial_adapter(load_config(tiny_model), SETTINGS)
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in tensors.items():
        if key.endswith("lora_B.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return tensors


def assert_peft_loads(tiny_model: Path, directory: Path, expected: dict[str, torch.Tensor]) -> None:
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model), directory)
    loaded = peft.get_peft_model_state_dict(model)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def full_disk(path: Path, data: bytes) -> None:
    """The exporter's file write (export.write_durably) on a disk that fills up halfway through the file."""
    Path(path).write_bytes(data[:len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_leaves_the_previous_checkpoint_loadable(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    previous, newer = adapter(tiny_model, 1), adapter(tiny_model, 2)
    out = tmp_path / "run"
    write_adapter(out / "round-000", previous, SETTINGS, str(tiny_model))
    monkeypatch.setattr(export, "write_durably", full_disk)
    for target in ("round-001", "round-000"):  # the next round's directory, and replacing the previous one
        with pytest.raises(OSError) as raised:
            write_adapter(out / target, newer, SETTINGS, str(tiny_model))
        assert raised.value.errno == errno.ENOSPC
        assert sorted(p.name for p in out.iterdir()) == ["round-000"]  # no half-written directory, no staging
    monkeypatch.undo()
    assert_peft_loads(tiny_model, out / "round-000", previous)


KILLED_WRITER = """
import os, pathlib, signal, sys
import torch
from tsotsa.training.export import write_adapter
from tsotsa.training.lora import LoraSettings
# Everything is written and synced; the process dies where the staging directory would be renamed.
pathlib.Path.rename = lambda self, target: os.kill(os.getpid(), signal.SIGKILL)
settings = LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=5)
write_adapter(pathlib.Path(sys.argv[1]), torch.load(sys.argv[2]), settings, sys.argv[3])
"""


def test_a_writer_killed_before_its_rename_leaves_the_previous_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    previous, newer = adapter(tiny_model, 1), adapter(tiny_model, 2)
    out = tmp_path / "run"
    write_adapter(out / "round-000", previous, SETTINGS, str(tiny_model))
    torch.save(newer, tmp_path / "newer.pt")
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out / "round-001"), str(tmp_path / "newer.pt"),
                            str(tiny_model)], capture_output=True, text=True, timeout=WAIT)
    assert child.returncode == -9, child.stderr
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and left[1] == "round-000" and left[0].startswith(".round-001."), left
    assert_peft_loads(tiny_model, out / "round-000", previous)
    assert read_adapter(out / "round-000")[0].keys() == previous.keys()
    write_adapter(out / "round-001", newer, SETTINGS, str(tiny_model))  # the round written again, by a live writer
    assert sorted(p.name for p in out.iterdir()) == ["round-000", "round-001"]  # the dead writer's staging is gone
    assert_peft_loads(tiny_model, out / "round-001", newer)


def test_a_full_disk_makes_the_run_wait_then_write_the_checkpoint(base: BaseModel, swarm: Swarm, tiny_model: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """RunDriver.export_round, as a round's end calls it, on a disk that is full for two tries."""
    store = RunStore(tmp_path / "coordinator.sqlite")
    spec = RunSpec(name="disk", train_file="", eval_file=None, out_dir=str(tmp_path / "out"), rounds=2,
                   lora=SETTINGS)
    store.create_run(spec.name, spec.to_dict())
    log = EventLog()
    driver = RunDriver(spec, store, base, swarm, log.emit, signer=RunSigner(tmp_path / "run-signing.key"))
    driver.adapter = adapter(tiny_model, 3)
    replica = ServerRecord("peer-a", "127.0.0.1:1", 0, 4, ServerState.ONLINE, 1.0)
    tries = []
    real_write = export.write_durably

    def write(path: Path, data: bytes) -> None:
        tries.append(path)
        if len(tries) <= 2:
            full_disk(path, data)
        real_write(path, data)

    monkeypatch.setattr(export, "write_durably", write)
    monkeypatch.setattr(trainer, "DISK_FULL_WAIT_SECONDS", 0.01)
    out = driver.export_round(1, [(replica, driver.adapter, 8)])
    monkeypatch.undo()
    assert out == tmp_path / "out" / "round-001" and len(tries) == 3
    states = [(e.state, e.message) for e in log.follow(lambda: False)]
    assert states[0] == ("waiting", f"waiting: cannot write the round 2 adapter to {out}: No space left on device; "
                                    "trying again every 0.01 s")
    assert states[1:] == [("running", "round 2/2: its adapter is written")]
    assert store.get_run("disk").state == "running"
    assert_peft_loads(tiny_model, out, driver.adapter)
    kept = load_file(out / "replicas" / "peer-a.safetensors")
    assert kept.keys() == driver.adapter.keys()
    assert sorted(p.name for p in out.parent.iterdir()) == ["round-001"]
    store.close()


def test_a_run_resumes_from_the_checkpoint_before_a_failed_write(manager: RunManager, tiny_model: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    """A run with round 1 done whose round 2 adapter hit a full disk, then a coordinator restart (a new
    RunManager on the same database): the run takes up round 2 again from round 1's adapter, and waits for
    peers (there are none here; tests/test_finetune.py resumes a run through a swarm)."""
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN)
    out = tmp_path / "out"
    spec = RunSpec(name="resumed", train_file=str(train), eval_file=None, out_dir=str(out), rounds=2,
                   steps_per_round=1, micro_batch=1, seq_len=64, lora=SETTINGS)
    store = manager.store
    store.create_run(spec.name, spec.to_dict())
    previous = adapter(tiny_model, 4)
    store.start_round(spec.name, 0)
    write_adapter(out / "round-000", previous, SETTINGS, str(tiny_model))
    store.finish_round(spec.name, 0, train_loss=1.0, eval_loss=None, samples=1, tokens=8, tokens_per_s=None,
                       checkpoint=str(out / "round-000"), wire_bytes=0, participants=[])
    store.start_round(spec.name, 1)
    monkeypatch.setattr(export, "write_durably", full_disk)
    with pytest.raises(OSError):
        write_adapter(out / "round-001", adapter(tiny_model, 5), SETTINGS, str(tiny_model))
    monkeypatch.undo()
    store.set_state(spec.name, "waiting", "waiting: cannot write the round 2 adapter")

    assert manager.resume_unfinished() == ["resumed"]
    states = []
    for event in manager.watch("resumed"):
        states.append((event.state, event.message))
        if event.state == "waiting":
            break
    assert states == [("running", "round 2/2"), ("waiting", "waiting: no peer serves blocks 0:4")]
    driver = manager.drivers["resumed"]
    assert driver.adapter.keys() == previous.keys()
    assert all(torch.equal(driver.adapter[key], previous[key]) for key in previous)  # round 1's adapter
    assert [(r.round, r.state) for r in store.rounds("resumed")] == [(0, "done"), (1, "running")]
    assert store.last_checkpoint("resumed") == str(out / "round-000")
    assert sorted(p.name for p in out.iterdir()) == ["round-000"]


# ------------------------------------------------------ 6. a cap on streams


def test_streams_are_capped_below_the_workers_and_get_model_info_still_answers(coordinator: Coordinator) -> None:
    assert MAX_STREAMS < WORKERS
    name = "watched"
    coordinator.create_run(name)
    fetch = pb.FetchRequest(model_id=coordinator.model_id, file_names=["tokenizer.json"])
    held = [coordinator.stub.WatchRun(pb.RunRequest(name=name), timeout=10 * WAIT) for _ in range(MAX_STREAMS)]
    try:
        for call in held:
            assert next(call).kind == "state"  # its handler runs: it holds a slot (and a worker) from now on
        extra = coordinator.stub.WatchRun(pb.RunRequest(name=name), timeout=WAIT)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (f"the coordinator already serves {MAX_STREAMS} streams (Fetch, WatchRun, "
                                           "UploadData), its limit; WatchRun was refused: try again when one ends")
        with pytest.raises(grpc.RpcError) as refused:
            coordinator.stub.UploadData(iter([pb.DataChunk(name="d", total_bytes=1, data=b"x")]),
                                        metadata=((ADMIN_METADATA, ADMIN),), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "UploadData was refused" in \
            refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            list(coordinator.stub.Fetch(fetch, timeout=WAIT))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Fetch was refused" in \
            refused.value.details()
        answers = [coordinator.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=WAIT) for _ in range(3)]
        assert all(info.model_id == coordinator.model_id for info in answers)
        assert coordinator.stub.GetRun(pb.RunRequest(name=name), timeout=WAIT).name == name

        held.pop().cancel()  # a watcher hangs up: its slot comes back (within a second: no event is needed)
        chunks: list[pb.FetchChunk] = []

        def fetched() -> bool:
            try:
                chunks.extend(coordinator.stub.Fetch(fetch, timeout=WAIT))
                return True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return False

        wait_until(fetched, "a Fetch after a watcher hung up")
        assert chunks and chunks[0].name == "tokenizer.json" and chunks[-1].sha256
    finally:
        for call in held:
            call.cancel()
        coordinator.stop_run(name)
