"""The coordinator's fine-tuning state in one SQLite file, so that a run survives a coordinator restart.

A run is a sequence of rounds; a round becomes "done" only together with its metrics, its checkpoint and its
participants (one transaction), so after a crash the store never holds a half-finished round: a round left
"running" is simply started again. One connection serves every thread of the coordinator (the gRPC server's and
each run's driver), serialised by a lock: SQLite would otherwise refuse a connection used across threads, and a
single writer is all a coordinator needs.

Another process may still hold the file's write lock for a while (`sqlite3` inspecting it, a backup, a
second tool writing): every call waits for it (SQLite's busy timeout) and, when the lock outlasts that, tries
again a bounded number of times before giving up with `StoreBusy`, so a lock held for seconds delays the
coordinator instead of failing a run or a request at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tsotsa.errors import TsotsaError

logger = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT = 5.0  # seconds SQLite itself waits for another connection's lock, per attempt
BUSY_RETRIES = 3    # further attempts after that, each after a growing pause (RETRY_PAUSE, doubled each time)
RETRY_PAUSE = 0.5
# The primary result codes of a lock another connection holds: worth waiting for. Any other error is not.
TRANSIENT_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

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


class StoreBusy(TsotsaError):
    """Another connection held the store's lock through every attempt: the call did nothing."""


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

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT, retries: int = BUSY_RETRIES,
                 retry_pause: float = RETRY_PAUSE) -> None:
        """`busy_timeout`: seconds SQLite waits for another connection's lock in one attempt; `retries`: how
        many more attempts follow one that timed out, the k-th after `retry_pause * 2**k` seconds."""
        if busy_timeout < 0 or retries < 0 or retry_pause < 0:
            raise ValueError("busy_timeout, retries and retry_pause must not be negative")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.retries, self.retry_pause = path, retries, retry_pause
        self._lock = threading.Lock()
        # `timeout` is SQLite's busy timeout (sqlite3_busy_timeout): how long one statement waits for a lock.
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=busy_timeout)
        try:
            self._conn.row_factory = sqlite3.Row
            self._transact(self._set_up)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise TsotsaError(f"cannot open run store {path}: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    def _set_up(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise TsotsaError(f"run store {self.path} has schema version {version}, newer than this tsotsa "
                              f"understands ({SCHEMA_VERSION}); upgrade tsotsa")
        # WAL lets a reader (e.g. `tsotsa` inspecting the file) proceed while the coordinator writes.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.commit()

    def _transact(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)` in one transaction (committed, or rolled back if it raises), tried again while
        another connection's lock makes it fail; a lock that outlasts every attempt raises StoreBusy."""
        attempt = 0
        while True:
            try:
                with self._lock, self._conn:
                    return work(self._conn)
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorcode", 0) & 0xFF not in TRANSIENT_CODES:
                    raise
                if attempt >= self.retries:
                    raise StoreBusy(f"run store {self.path} stayed locked by another connection through "
                                    f"{attempt + 1} attempts ({error})") from None
                pause = self.retry_pause * 2 ** attempt
                attempt += 1
                logger.warning("run store %s is locked by another connection (%s); attempt %d of %d in %.2g s",
                               self.path, error, attempt + 1, self.retries + 1, pause)
            time.sleep(pause)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create_run(self, name: str, config: dict) -> RunRecord:
        """Adds a run in state "queued"; its driver picks it up from there. The name's uniqueness is the
        table's: of two concurrent calls with one name exactly one inserts, the other gets RunExists."""
        now = time.time()
        inserted = self._transact(lambda conn: conn.execute(
            "INSERT INTO runs (name, config, state, message, created, updated) VALUES (?, ?, 'queued', '', ?, ?)"
            " ON CONFLICT (name) DO NOTHING", (name, json.dumps(config), now, now)).rowcount)
        if not inserted:
            raise RunExists(f"a run named {name!r} already exists")
        return RunRecord(name=name, config=config, state="queued", message="", created=now, updated=now,
                         rounds_done=0)

    def get_run(self, name: str) -> RunRecord | None:
        row = self._transact(lambda conn: conn.execute(RUN_COLUMNS + " WHERE name = ?", (name,)).fetchone())
        return None if row is None else _run(row)

    def list_runs(self) -> list[RunRecord]:
        """Oldest first, the order in which runs were submitted."""
        rows = self._transact(lambda conn: conn.execute(RUN_COLUMNS + " ORDER BY created, rowid").fetchall())
        return [_run(row) for row in rows]

    def set_state(self, name: str, state: str, message: str = "") -> None:
        """Records where the run stands; `message` says why in words a person reads (e.g. what it waits for)."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(RUN_STATES)}")
        updated = self._transact(lambda conn: conn.execute(
            "UPDATE runs SET state = ?, message = ?, updated = ? WHERE name = ?",
            (state, message, time.time(), name)).rowcount)
        if not updated:
            raise KeyError(name)

    def unfinished_runs(self) -> list[RunRecord]:
        """The runs a restarted coordinator resumes, oldest first."""
        marks = ", ".join("?" * len(UNFINISHED_STATES))
        rows = self._transact(lambda conn: conn.execute(
            RUN_COLUMNS + f" WHERE state IN ({marks}) ORDER BY created, rowid", UNFINISHED_STATES).fetchall())
        return [_run(row) for row in rows]

    def start_round(self, run: str, round: int) -> None:
        """Marks the round running; a round interrupted by a restart starts over, so its partial results go."""
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO rounds (run, round, state, started, samples, tokens, wire_bytes)"
                " VALUES (?, ?, 'running', ?, 0, 0, 0)"
                " ON CONFLICT (run, round) DO UPDATE SET state = 'running', started = excluded.started,"
                " finished = NULL, train_loss = NULL, eval_loss = NULL, samples = 0, tokens = 0,"
                " tokens_per_s = NULL, checkpoint = NULL, wire_bytes = 0",
                (run, round, time.time()))
            conn.execute("DELETE FROM participants WHERE run = ? AND round = ?", (run, round))

        self._transact(work)

    def finish_round(self, run: str, round: int, *, train_loss: float | None, eval_loss: float | None,
                     samples: int, tokens: int, tokens_per_s: float | None, checkpoint: str | None,
                     wire_bytes: int, participants: list[Participant]) -> None:
        """Marks the round done with its results, all at once, so a crash never leaves a round half recorded."""
        def work(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE rounds SET state = 'done', finished = ?, train_loss = ?, eval_loss = ?, samples = ?,"
                " tokens = ?, tokens_per_s = ?, checkpoint = ?, wire_bytes = ? WHERE run = ? AND round = ?",
                (time.time(), train_loss, eval_loss, samples, tokens, tokens_per_s, checkpoint, wire_bytes,
                 run, round)).rowcount
            if not updated:
                raise KeyError(f"round {round} of run {run!r} was never started")
            conn.execute("DELETE FROM participants WHERE run = ? AND round = ?", (run, round))
            conn.executemany(
                "INSERT INTO participants (run, round, peer_id, address, start_block, end_block, samples)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run, round, p.peer_id, p.address, p.start, p.end, p.samples) for p in participants])

        self._transact(work)

    def rounds(self, run: str) -> list[RoundRecord]:
        rows = self._transact(lambda conn: conn.execute(
            "SELECT * FROM rounds WHERE run = ? ORDER BY round", (run,)).fetchall())
        return [RoundRecord(**dict(row)) for row in rows]

    def participants(self, run: str, round: int) -> list[Participant]:
        """In the order the round reported them."""
        rows = self._transact(lambda conn: conn.execute(
            "SELECT peer_id, address, start_block, end_block, samples FROM participants"
            " WHERE run = ? AND round = ? ORDER BY id", (run, round)).fetchall())
        return [Participant(peer_id=r["peer_id"], address=r["address"], start=r["start_block"], end=r["end_block"],
                            samples=r["samples"]) for r in rows]

    def last_checkpoint(self, run: str) -> str | None:
        """The adapter a resumed run continues from: that of its highest done round."""
        row = self._transact(lambda conn: conn.execute(
            "SELECT checkpoint FROM rounds WHERE run = ? AND state = 'done' ORDER BY round DESC LIMIT 1",
            (run,)).fetchone())
        return None if row is None else row["checkpoint"]


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(name=row["name"], config=json.loads(row["config"]), state=row["state"], message=row["message"],
                     created=row["created"], updated=row["updated"], rounds_done=row["rounds_done"])
