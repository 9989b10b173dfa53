"""The coordinator's fine-tuning state in one SQLite file, so that a run survives a coordinator restart.

A run is a sequence of rounds; a round becomes "done" only together with its metrics, its checkpoint and its
participants (one transaction), so after a crash the store never holds a half-finished round: a round left
"running" is simply started again. One connection serves every thread of the coordinator (the gRPC server's and
each run's driver), serialised by a lock: SQLite would otherwise refuse a connection used across threads, and a
single writer is all a coordinator needs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tsotsa.errors import TsotsaError

RUN_STATES = ("queued", "running", "waiting", "stopping", "stopped", "finished", "failed")
# The states a restarted coordinator picks up again; the others are final.
UNFINISHED_STATES = ("queued", "running", "waiting", "stopping")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name     TEXT PRIMARY KEY,
    config   TEXT NOT NULL,
    state    TEXT NOT NULL,
    message  TEXT NOT NULL,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run           TEXT NOT NULL REFERENCES runs(name),
    round         INTEGER NOT NULL,
    state         TEXT NOT NULL,
    started       REAL NOT NULL,
    finished      REAL,
    train_loss    REAL,
    eval_loss     REAL,
    samples       INTEGER NOT NULL,
    tokens        INTEGER NOT NULL,
    tokens_per_s  REAL,
    checkpoint    TEXT,
    wire_bytes    INTEGER NOT NULL,
    PRIMARY KEY (run, round)
);
CREATE TABLE IF NOT EXISTS participants (
    id           INTEGER PRIMARY KEY,
    run          TEXT NOT NULL,
    round        INTEGER NOT NULL,
    peer_id      TEXT NOT NULL,
    address      TEXT NOT NULL,
    start_block  INTEGER NOT NULL,
    end_block    INTEGER NOT NULL,
    samples      INTEGER NOT NULL,
    FOREIGN KEY (run, round) REFERENCES rounds(run, round)
);
CREATE INDEX IF NOT EXISTS participants_by_round ON participants(run, round);
"""

# rounds_done is derived rather than stored so that it can never disagree with the rounds themselves.
RUN_COLUMNS = """
    SELECT name, config, state, message, created, updated,
           (SELECT COUNT(*) FROM rounds WHERE rounds.run = runs.name AND rounds.state = 'done') AS rounds_done
    FROM runs
"""


class RunExists(TsotsaError):
    """A run with this name is already in the store: names identify runs across restarts, so they stay unique."""


@dataclass
class RunRecord:
    name: str
    config: dict
    state: str
    message: str
    created: float
    updated: float
    rounds_done: int


@dataclass
class RoundRecord:
    run: str
    round: int
    state: str
    started: float
    finished: float | None
    train_loss: float | None
    eval_loss: float | None
    samples: int
    tokens: int
    tokens_per_s: float | None
    checkpoint: str | None
    wire_bytes: int


@dataclass
class Participant:
    peer_id: str
    address: str
    start: int
    end: int
    samples: int


class RunStore:
    """Runs, their rounds and each round's participants, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False)
        try:
            self._conn.row_factory = sqlite3.Row
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise TsotsaError(f"run store {path} has schema version {version}, newer than this tsotsa "
                                  f"understands ({SCHEMA_VERSION}); upgrade tsotsa")
            # WAL lets a reader (e.g. `tsotsa` inspecting the file) proceed while the coordinator writes.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._conn:
                self._conn.executescript(SCHEMA)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise TsotsaError(f"cannot open run store {path}: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create_run(self, name: str, config: dict) -> RunRecord:
        """Adds a run in state "queued"; its driver picks it up from there."""
        now = time.time()
        with self._lock, self._conn:
            inserted = self._conn.execute(
                "INSERT INTO runs (name, config, state, message, created, updated) VALUES (?, ?, 'queued', '', ?, ?)"
                " ON CONFLICT (name) DO NOTHING", (name, json.dumps(config), now, now)).rowcount
        if not inserted:
            raise RunExists(f"a run named {name!r} already exists")
        return RunRecord(name=name, config=config, state="queued", message="", created=now, updated=now,
                         rounds_done=0)

    def get_run(self, name: str) -> RunRecord | None:
        with self._lock:
            row = self._conn.execute(RUN_COLUMNS + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _run(row)

    def list_runs(self) -> list[RunRecord]:
        """Oldest first, the order in which runs were submitted."""
        with self._lock:
            rows = self._conn.execute(RUN_COLUMNS + " ORDER BY created, rowid").fetchall()
        return [_run(row) for row in rows]

    def set_state(self, name: str, state: str, message: str = "") -> None:
        """Records where the run stands; `message` says why in words a person reads (e.g. what it waits for)."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(RUN_STATES)}")
        with self._lock, self._conn:
            updated = self._conn.execute("UPDATE runs SET state = ?, message = ?, updated = ? WHERE name = ?",
                                         (state, message, time.time(), name)).rowcount
        if not updated:
            raise KeyError(name)

    def unfinished_runs(self) -> list[RunRecord]:
        """The runs a restarted coordinator resumes, oldest first."""
        marks = ", ".join("?" * len(UNFINISHED_STATES))
        with self._lock:
            rows = self._conn.execute(RUN_COLUMNS + f" WHERE state IN ({marks}) ORDER BY created, rowid",
                                      UNFINISHED_STATES).fetchall()
        return [_run(row) for row in rows]

    def start_round(self, run: str, round: int) -> None:
        """Marks the round running; a round interrupted by a restart starts over, so its partial results go."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO rounds (run, round, state, started, samples, tokens, wire_bytes)"
                " VALUES (?, ?, 'running', ?, 0, 0, 0)"
                " ON CONFLICT (run, round) DO UPDATE SET state = 'running', started = excluded.started,"
                " finished = NULL, train_loss = NULL, eval_loss = NULL, samples = 0, tokens = 0,"
                " tokens_per_s = NULL, checkpoint = NULL, wire_bytes = 0",
                (run, round, time.time()))
            self._conn.execute("DELETE FROM participants WHERE run = ? AND round = ?", (run, round))

    def finish_round(self, run: str, round: int, *, train_loss: float | None, eval_loss: float | None,
                     samples: int, tokens: int, tokens_per_s: float | None, checkpoint: str | None,
                     wire_bytes: int, participants: list[Participant]) -> None:
        """Marks the round done with its results, all at once, so a crash never leaves a round half recorded."""
        with self._lock, self._conn:
            updated = self._conn.execute(
                "UPDATE rounds SET state = 'done', finished = ?, train_loss = ?, eval_loss = ?, samples = ?,"
                " tokens = ?, tokens_per_s = ?, checkpoint = ?, wire_bytes = ? WHERE run = ? AND round = ?",
                (time.time(), train_loss, eval_loss, samples, tokens, tokens_per_s, checkpoint, wire_bytes,
                 run, round)).rowcount
            if not updated:
                raise KeyError(f"round {round} of run {run!r} was never started")
            self._conn.execute("DELETE FROM participants WHERE run = ? AND round = ?", (run, round))
            self._conn.executemany(
                "INSERT INTO participants (run, round, peer_id, address, start_block, end_block, samples)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run, round, p.peer_id, p.address, p.start, p.end, p.samples) for p in participants])

    def rounds(self, run: str) -> list[RoundRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM rounds WHERE run = ? ORDER BY round", (run,)).fetchall()
        return [RoundRecord(**dict(row)) for row in rows]

    def participants(self, run: str, round: int) -> list[Participant]:
        """In the order the round reported them."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT peer_id, address, start_block, end_block, samples FROM participants"
                " WHERE run = ? AND round = ? ORDER BY id", (run, round)).fetchall()
        return [Participant(peer_id=r["peer_id"], address=r["address"], start=r["start_block"], end=r["end_block"],
                            samples=r["samples"]) for r in rows]

    def last_checkpoint(self, run: str) -> str | None:
        """The adapter a resumed run continues from: that of its highest done round."""
        with self._lock:
            row = self._conn.execute(
                "SELECT checkpoint FROM rounds WHERE run = ? AND state = 'done' ORDER BY round DESC LIMIT 1",
                (run,)).fetchone()
        return None if row is None else row["checkpoint"]


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(name=row["name"], config=json.loads(row["config"]), state=row["state"], message=row["message"],
                     created=row["created"], updated=row["updated"], rounds_done=row["rounds_done"])
