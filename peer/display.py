"""What `tsotsa-peer join` shows its operator besides its announcement lines: progress while its blocks are
fetched and loaded, then a live status line.

On a terminal: a progress bar per phase, then one status line redrawn every heartbeat (span, open sessions,
tokens served, tokens/s over the last interval), under which the announcement lines and log records
scroll. Anywhere else (tests, systemd, a pipe) stdout stays what scripts parse: a progress line only when
a phase has taken longer than `progress_every` (a multi-gigabyte load: one line every 10 s, none for a
quick one), and a one-line summary every `summary_every` seconds in which tokens were served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

Say = Callable[[str], None]


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


class BlockProgress:
    """One phase of block loading ("fetching blocks 0:4", "loading blocks 0:4"): `advance(nbytes)` per block."""

    def __init__(self, display: "PeerDisplay", what: str, total: int) -> None:
        self.display, self.what, self.total = display, what, total
        self.done, self.nbytes = 0, 0
        self._began = self._last = time.monotonic()
        self._bar = self._task = None
        if display.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[size]}"), TimeElapsedColumn())
            self._task = self._bar.add_task(what, total=total, size=_mib(0))

    def __enter__(self) -> "BlockProgress":
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.nbytes += nbytes
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, size=_mib(self.nbytes))
            return
        now = time.monotonic()
        if now - self._last >= self.display.progress_every:
            self._last = now
            self.display.say(f"{self.what}: {self.done}/{self.total} ({_mib(self.nbytes)})")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()


class PeerDisplay:
    """`live`: draw progress bars and the status line (a terminal); else only rare plain lines through `say`."""

    def __init__(self, say: Say, live: bool, *, progress_every: float = 10.0, summary_every: float = 600.0) -> None:
        self.say, self.live = say, live
        self.progress_every, self.summary_every = progress_every, summary_every
        self._status = None  # rich Live while the peer serves on a terminal
        self._last: tuple[float, int] | None = None  # (time, tokens served) at the previous heartbeat
        self._summary: tuple[float, int] | None = None  # the same at the previous summary line

    def blocks(self, what: str, total: int) -> BlockProgress:
        return BlockProgress(self, what, total)

    def serving(self, span: str, open_sessions: int, max_sessions: int, tokens_served: int) -> None:
        """Called at every heartbeat while the peer serves; rates count from the first call."""
        now = time.monotonic()
        if self.live:
            rate = "-" if self._last is None else \
                f"{(tokens_served - self._last[1]) / max(now - self._last[0], 1e-9):.1f}"
            self._last = (now, tokens_served)
            self._show(f"blocks {span} · {open_sessions}/{max_sessions} sessions open · "
                       f"{tokens_served:,} tokens served · {rate} tok/s")
            return
        if self._summary is None:
            self._summary = (now, tokens_served)
        elif now - self._summary[0] >= self.summary_every:
            since, before = self._summary
            if tokens_served != before:
                self.say(f"blocks {span}: {open_sessions} sessions open, {tokens_served} tokens served, "
                         f"{(tokens_served - before) / (now - since):.1f} tok/s over the last {now - since:.0f} s")
            self._summary = (now, tokens_served)

    def close(self) -> None:
        """Removes the status line (before the peer's last lines)."""
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _show(self, line: str) -> None:
        from rich.text import Text

        if self._status is None:
            from rich.live import Live

            # stdout and stderr are redirected above the line while it shows: announcements and log records
            # scroll past it instead of being written into it
            self._status = Live(Text(line), auto_refresh=False, transient=True)
            self._status.start()
        self._status.update(Text(line), refresh=True)
