"""The coordinator's fine-tuning runs: creating them (data checked first), one driver thread each, their
progress as events, stopping them, and resuming those a restart interrupted."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from tsotsa.client.swarm import Swarm
from tsotsa.errors import TsotsaError
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.training.lora import check_run_name
from tsotsa.coordinator.data import Example, parse_jsonl, tokenize
from tsotsa.coordinator.store import RunRecord, RunStore, UNFINISHED_STATES
from tsotsa.coordinator.trainer import BaseModel, RunDriver, RunSpec

MAX_EVENTS = 10_000  # per run: a watcher that joins late replays at most this many


class RunError(TsotsaError):
    pass


class EventLog:
    """A run's progress events; watchers read from the start and then follow until the run ends."""

    def __init__(self) -> None:
        self.events: list[pb.RunEvent] = []
        self.closed = False
        self._changed = threading.Condition()

    def emit(self, event: pb.RunEvent) -> None:
        with self._changed:
            self.events.append(event)
            del self.events[:-MAX_EVENTS]
            if event.kind == "state" and event.state not in UNFINISHED_STATES:
                self.closed = True
            self._changed.notify_all()

    def follow(self, alive) -> Iterator[pb.RunEvent]:
        seen = 0
        while True:
            with self._changed:
                while seen >= len(self.events) and not self.closed and alive():
                    self._changed.wait(1.0)
                pending, seen = self.events[seen:], len(self.events)
                finished = self.closed or not alive()
            yield from pending
            if finished and seen >= len(self.events):
                return


class RunManager:
    def __init__(self, store: RunStore, state_dir: Path, base: BaseModel, swarm: Swarm) -> None:
        self.store, self.state_dir, self.base, self.swarm = store, state_dir, base, swarm
        self.drivers: dict[str, RunDriver] = {}
        self.logs: dict[str, EventLog] = {}
        self._lock = threading.Lock()

    def create(self, name: str, spec_fields: dict, train_name: str, train: bytes, eval_name: str,
               eval_data: bytes) -> RunRecord:
        """Checks the data (a bad file fails here, naming its line) and starts the run."""
        check_run_name(name)
        if self.store.get_run(name) is not None:
            raise RunError(f"a run named {name!r} exists already")
        examples = (self._tokenize(train, train_name or "train data", spec_fields["seq_len"]),
                    self._tokenize(eval_data, eval_name or "eval data", spec_fields["seq_len"]) if eval_data else [])
        run_dir = self.state_dir / "runs" / name
        out_dir = Path(spec_fields.pop("out_dir", None) or run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        train_file = run_dir / "train.jsonl"
        train_file.write_bytes(train)
        eval_file = None
        if eval_data:
            eval_file = run_dir / "eval.jsonl"
            eval_file.write_bytes(eval_data)
        spec = RunSpec(name=name, train_file=str(train_file), eval_file=eval_file and str(eval_file),
                       out_dir=str(out_dir), **spec_fields)
        try:
            record = self.store.create_run(name, spec.to_dict())
        except TsotsaError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        self._start(spec, examples)
        return record

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

    def watch(self, name: str) -> Iterator[pb.RunEvent]:
        record = self._record(name)
        log = self.logs.get(name)
        if log is None:  # a run that ended before this coordinator started: its end is all there is to see
            yield pb.RunEvent(kind="state", state=record.state, message=record.message)
            return
        driver = self.drivers[name]
        yield from log.follow(lambda: driver.alive)

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
        driver = RunDriver(spec, self.store, self.base, self.swarm, log.emit, examples)
        with self._lock:
            self.drivers[spec.name], self.logs[spec.name] = driver, log
        driver.start()

    def _record(self, name: str) -> RunRecord:
        record = self.store.get_run(name)
        if record is None:
            raise KeyError(name)
        return record

