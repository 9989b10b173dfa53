"""The coordinator's run store: runs, rounds and participants in SQLite, surviving a coordinator restart."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from tsotsa.coordinator.store import RUN_STATES, Participant, RunExists, RunStore
from tsotsa.errors import TsotsaError

CONFIG = {"model": "tiny", "lr": 1e-4, "rounds": 3, "blocks": [0, 4]}
PEERS = [Participant("peer-a", "10.0.0.1:7071", 0, 2, 16), Participant("peer-b", "10.0.0.2:7071", 2, 4, 16)]


@pytest.fixture
def store(tmp_path: Path):
    store = RunStore(tmp_path / "state" / "runs.sqlite")
    yield store
    store.close()


def finish(store: RunStore, run: str, round: int, checkpoint: str | None = None, participants=PEERS) -> None:
    store.finish_round(run, round, train_loss=2.5 - round, eval_loss=2.6 - round, samples=32, tokens=4096,
                       tokens_per_s=512.0, checkpoint=checkpoint, wire_bytes=1 << 20, participants=participants)


def test_create_get_list(store: RunStore):
    created = store.create_run("first", CONFIG)
    store.create_run("second", {})
    assert created.state == "queued" and created.rounds_done == 0 and created.message == ""
    assert store.get_run("first") == created
    assert store.get_run("first").config == CONFIG
    assert store.get_run("missing") is None
    assert [run.name for run in store.list_runs()] == ["first", "second"]


def test_duplicate_name(store: RunStore):
    store.create_run("run", CONFIG)
    with pytest.raises(RunExists, match="run"):
        store.create_run("run", {"other": True})
    assert isinstance(RunExists("x"), TsotsaError)
    assert store.get_run("run").config == CONFIG


def test_states(store: RunStore):
    created = store.create_run("run", CONFIG)
    store.set_state("run", "waiting", "waiting: no peer serves blocks 2:4")
    run = store.get_run("run")
    assert (run.state, run.message) == ("waiting", "waiting: no peer serves blocks 2:4")
    assert run.updated >= created.updated and run.created == created.created
    for state in RUN_STATES:
        store.set_state("run", state)
        assert store.get_run("run").state == state
    assert store.get_run("run").message == ""
    with pytest.raises(ValueError, match="bogus"):
        store.set_state("run", "bogus")
    with pytest.raises(KeyError):
        store.set_state("missing", "running")


def test_unfinished_runs(store: RunStore):
    for state in RUN_STATES:
        store.create_run(state, {})
        store.set_state(state, state)
    assert [run.name for run in store.unfinished_runs()] == ["queued", "running", "waiting", "stopping"]


def test_rounds_lifecycle(store: RunStore):
    store.create_run("run", CONFIG)
    assert store.rounds("run") == [] and store.last_checkpoint("run") is None
    store.start_round("run", 0)
    (r0,) = store.rounds("run")
    assert (r0.run, r0.round, r0.state, r0.finished, r0.train_loss, r0.checkpoint) == ("run", 0, "running", None,
                                                                                       None, None)
    assert store.get_run("run").rounds_done == 0

    finish(store, "run", 0, "/ckpt/round-0")
    (r0,) = store.rounds("run")
    assert r0.state == "done" and r0.finished >= r0.started
    assert (r0.train_loss, r0.eval_loss, r0.samples, r0.tokens, r0.tokens_per_s, r0.wire_bytes) == (
        2.5, 2.6, 32, 4096, 512.0, 1 << 20)
    assert store.get_run("run").rounds_done == 1
    assert store.last_checkpoint("run") == "/ckpt/round-0"

    store.start_round("run", 1)
    assert [r.state for r in store.rounds("run")] == ["done", "running"]
    assert store.last_checkpoint("run") == "/ckpt/round-0"  # a running round has no checkpoint yet
    finish(store, "run", 1, "/ckpt/round-1")
    assert store.last_checkpoint("run") == "/ckpt/round-1"
    assert store.get_run("run").rounds_done == 2


def test_finish_unstarted_round(store: RunStore):
    store.create_run("run", CONFIG)
    with pytest.raises(KeyError):
        finish(store, "run", 0)
    assert store.rounds("run") == [] and store.participants("run", 0) == []


def test_restart_interrupted_round(store: RunStore):
    store.create_run("run", CONFIG)
    store.start_round("run", 0)
    finish(store, "run", 0, "/ckpt/round-0")
    first_start = store.rounds("run")[0].started
    store.start_round("run", 0)  # starting a round again discards what it recorded before
    (r0,) = store.rounds("run")
    assert r0.state == "running" and r0.started >= first_start
    assert (r0.finished, r0.train_loss, r0.eval_loss, r0.tokens_per_s, r0.checkpoint) == (None,) * 5
    assert (r0.samples, r0.tokens, r0.wire_bytes) == (0, 0, 0)
    assert store.participants("run", 0) == []
    assert store.get_run("run").rounds_done == 0 and store.last_checkpoint("run") is None


def test_participants(store: RunStore):
    store.create_run("run", CONFIG)
    store.create_run("other", CONFIG)
    for run in ("run", "other"):
        store.start_round(run, 0)
    finish(store, "run", 0, participants=PEERS)
    finish(store, "other", 0, participants=PEERS[:1])
    assert store.participants("run", 0) == PEERS
    assert store.participants("other", 0) == PEERS[:1]
    assert store.participants("run", 1) == []
    store.start_round("run", 1)
    finish(store, "run", 1, participants=list(reversed(PEERS)))
    assert store.participants("run", 1) == list(reversed(PEERS))
    assert store.participants("run", 0) == PEERS


def test_survives_restart(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.create_run("resume-me", CONFIG)
    store.set_state("resume-me", "running", "round 1")
    store.start_round("resume-me", 0)
    finish(store, "resume-me", 0, "/ckpt/round-0")
    store.start_round("resume-me", 1)  # interrupted by the "crash" below
    store.create_run("done", {})
    store.set_state("done", "finished")
    store.close()

    store = RunStore(path)  # the restarted coordinator
    try:
        (run,) = store.unfinished_runs()
        assert (run.name, run.state, run.message, run.config, run.rounds_done) == (
            "resume-me", "running", "round 1", CONFIG, 1)
        assert [r.state for r in store.rounds("resume-me")] == ["done", "running"]
        assert store.last_checkpoint("resume-me") == "/ckpt/round-0"
        assert store.participants("resume-me", 0) == PEERS
        store.start_round("resume-me", run.rounds_done)
        finish(store, "resume-me", 1, "/ckpt/round-1")
        assert store.get_run("resume-me").rounds_done == 2
        assert [r.name for r in store.list_runs()] == ["resume-me", "done"]
    finally:
        store.close()


def test_file_settings(tmp_path: Path):
    path = tmp_path / "a" / "b" / "runs.sqlite"
    RunStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_foreign_keys(store: RunStore):
    with pytest.raises(sqlite3.IntegrityError):
        store.start_round("no-such-run", 0)


def test_refuses_newer_schema(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    with pytest.raises(TsotsaError, match="schema version 2"):
        RunStore(path)


def test_not_a_database(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TsotsaError, match="cannot open run store"):
        RunStore(path)


def test_threads(store: RunStore):
    errors: list[BaseException] = []

    def driver(i: int) -> None:
        try:
            name = f"run-{i}"
            store.create_run(name, {"i": i})
            store.set_state(name, "running")
            for r in range(5):
                store.start_round(name, r)
                finish(store, name, r, f"/ckpt/{name}/{r}")
            store.set_state(name, "finished")
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(50):
                for run in store.list_runs():
                    store.rounds(run.name)
                    store.participants(run.name, 0)
                store.unfinished_runs()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    runs = store.list_runs()
    assert len(runs) == 4 and all(run.state == "finished" and run.rounds_done == 5 for run in runs)
    assert store.last_checkpoint("run-2") == "/ckpt/run-2/4"
