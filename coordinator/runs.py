"""The coordinator's fine-tuning runs: creating them (data checked first), one driver thread each, their
progress as events, stopping them, and resuming those a restart interrupted."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from tsotsa.client.swarm import Swarm
from tsotsa.errors import TsotsaError
from tsotsa.run_credentials import RunSigner
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.training.lora import check_run_name
from tsotsa.coordinator.reports import PeerReports
from tsotsa.coordinator.data import Example, parse_jsonl, tokenize
from tsotsa.coordinator.store import RunExists, RunRecord, RunStore, UNFINISHED_STATES
from tsotsa.coordinator.trainer import BaseModel, RunDriver, RunSpec

MAX_EVENTS = 10_000  # kept per run: a watcher that joins late replays at most this many

logger = logging.getLogger(__name__)


class RunError(TsotsaError):
    pass


class EventLog:
    """A run's progress events; watchers read from the start and then follow until the run ends.

    Events are numbered from 0 for the life of the log, and only the last MAX_EVENTS are kept, so a
    watcher's place is an event number, not a position in what is kept (positions shift once old events
    go). A watcher that falls more than MAX_EVENTS behind (or joins after that many) goes on from the oldest
    event still kept: the ones it missed are gone, which is logged, and nothing else changes for it (the
    events after the gap are complete and in order, and the run's final state still ends its stream).
    """

    def __init__(self) -> None:
        self._events: deque[pb.RunEvent] = deque(maxlen=MAX_EVENTS)
        self._first = 0  # the number of the oldest kept event
        self.closed = False
        self._changed = threading.Condition()

    @property
    def emitted(self) -> int:
        """How many events the run has emitted, kept or not: the number the next one gets."""
        with self._changed:
            return self._first + len(self._events)

    def emit(self, event: pb.RunEvent) -> None:
        with self._changed:
            if len(self._events) == MAX_EVENTS:
                self._first += 1  # the deque drops its oldest on append
            self._events.append(event)
            if event.kind == "state" and event.state not in UNFINISHED_STATES:
                self.closed = True
            self._changed.notify_all()

    def follow(self, alive: Callable[[], bool]) -> Iterator[pb.RunEvent]:
        """Every event from the oldest kept one on, then each new one as it comes, until the log is closed
        (the run's final state) or `alive()` turns false; `alive` is checked at least once a second."""
        following = 0  # the number of the next event this watcher gets
        while True:
            with self._changed:
                while following >= self._first + len(self._events) and not self.closed and alive():
                    self._changed.wait(1.0)
                if following < self._first:
                    logger.info("a watcher fell %d events behind; it goes on from event %d", self._first - following,
                                self._first)
                    following = self._first
                pending = list(itertools.islice(self._events, following - self._first, None))
                following += len(pending)
                finished = self.closed or not alive()
            yield from pending
            if finished:
                with self._changed:
                    if following >= self._first + len(self._events):
                        return


class RunManager:
    def __init__(self, store: RunStore, state_dir: Path, base: BaseModel, swarm: Swarm, signer: RunSigner,
                 reports: PeerReports | None = None) -> None:
        """`signer`: the coordinator's key for the run credentials its training calls to peers carry;
        `reports`: where peers the runs' spot checks catch are recorded (for `tsotsa status`)."""
        self.store, self.state_dir, self.base, self.swarm, self.signer = store, state_dir, base, swarm, signer
        self.reports = reports or PeerReports()
        self.drivers: dict[str, RunDriver] = {}
        self.logs: dict[str, EventLog] = {}
        self._lock = threading.Lock()

    def create(self, name: str, spec_fields: dict, train_name: str, train: bytes, eval_name: str,
               eval_data: bytes) -> tuple[RunRecord, int, int]:
        """Checks the data (a bad file fails here, naming its line) and starts the run; returns its record
        and how many training and evaluation examples the data holds.

        The store's insert claims the name before anything touches the disk: of two calls with one name,
        the one whose insert loses gets RunExists having written and removed nothing, so it can never
        overwrite or delete the winner's directory. A coordinator killed between the insert and the data
        files leaves a queued run without them; resumed, it fails naming the missing file."""
        check_run_name(name)
        if self.store.get_run(name) is not None:  # refused before the tokenizing; the insert below decides races
            raise RunExists(f"a run named {name!r} already exists")
        examples = (self._tokenize(train, train_name or "train data", spec_fields["seq_len"]),
                    self._tokenize(eval_data, eval_name or "eval data", spec_fields["seq_len"]) if eval_data else [])
        run_dir = self.state_dir / "runs" / name
        out_dir = Path(spec_fields.pop("out_dir", None) or run_dir)
        train_file, eval_file = run_dir / "train.jsonl", run_dir / "eval.jsonl" if eval_data else None
        spec = RunSpec(name=name, train_file=str(train_file), eval_file=eval_file and str(eval_file),
                       out_dir=str(out_dir), **spec_fields)
        record = self.store.create_run(name, spec.to_dict())
        try:
            run_dir.mkdir(parents=True, exist_ok=True)  # the name is this call's now, and so is its directory
            train_file.write_bytes(train)
            if eval_file is not None:
                eval_file.write_bytes(eval_data)
        except OSError as error:
            message = f"cannot write the run's data into {run_dir}: {error.strerror or error}"
            self.store.set_state(name, "failed", message)
            raise RunError(message) from None
        self._start(spec, examples)
        return record, len(examples[0]), len(examples[1])

    def resume_unfinished(self) -> list[str]:
        """Runs a restart interrupted go on from their last completed round."""
        resumed = []
        for record in self.store.unfinished_runs():
            if record.state == "stopping":
                self.store.set_state(record.name, "stopped", "stopped by request")
                continue
            self._start(RunSpec.from_dict(record.config))
            resumed.append(record.name)
        return resumed

    def stop(self, name: str) -> RunRecord:
        record = self._record(name)
        driver = self.drivers.get(name)
        if record.state in UNFINISHED_STATES and driver is not None and driver.alive:
            self.store.set_state(name, "stopping", "stopping after the current step")
            driver.stop()
        return self._record(name)

    def get(self, name: str) -> RunRecord:
        return self._record(name)

    def watch(self, name: str, active: Callable[[], bool] = lambda: True) -> Iterator[pb.RunEvent]:
        """The run's events until it ends, or until `active()` (the watcher's stream is open) turns false,
        which is noticed within a second even while the run emits nothing."""
        record = self._record(name)
        log = self.logs.get(name)
        if log is None:  # a run that ended before this coordinator started: its end is all there is to see
            yield pb.RunEvent(kind="state", state=record.state, message=record.message)
            return
        driver = self.drivers[name]
        yield from log.follow(lambda: driver.alive and active())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Drivers leave between units; their runs stay unfinished and resume when a coordinator restarts."""
        for driver in self.drivers.values():
            driver.stop(leaving=True)
        for driver in self.drivers.values():
            driver.join(timeout)

    def _tokenize(self, data: bytes, name: str, seq_len: int) -> list[Example]:
        return tokenize(parse_jsonl(data, name), self.base.tokenizer, seq_len, name)

    def _start(self, spec: RunSpec, examples: tuple[list[Example], list[Example]] | None = None) -> None:
        log = EventLog()
        driver = RunDriver(spec, self.store, self.base, self.swarm, log.emit, examples, signer=self.signer,
                           on_liar=self.reports.add)
        with self._lock:
            self.drivers[spec.name], self.logs[spec.name] = driver, log
        driver.start()

    def _record(self, name: str) -> RunRecord:
        """The stored run, except that a state its driver could not write yet (the store locked or its disk
        full) is the one reported: that is where the run stands, whatever the store still says."""
        record = self.store.get_run(name)
        if record is None:
            raise KeyError(name)
        driver = self.drivers.get(name)
        unsaved = driver.unsaved_state if driver is not None else None
        if unsaved is not None:
            record.state, record.message = unsaved
        return record

