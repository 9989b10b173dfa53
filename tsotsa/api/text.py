"""From generated token ids to the text a client sees, piece by piece: stop sequences and partial characters.

The whole generated text is decoded again at every token (byte-level BPE merges change how earlier bytes
read, and a character may span tokens); what was already sent is never taken back, so text that could
still turn into a stop sequence, or ends in half a UTF-8 character, is held until it is settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


@dataclass
class TextStream:
    """Feeds on token ids; `push` returns the text that may be sent now. `stopped` once a stop sequence
    appeared (the text ends before it, as OpenAI's does)."""

    tokenizer: object
    stops: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False
    tokens_in_text: int = 0  # how many of `ids` the text up to the stop came from (all, without a stop)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self.tokens_in_text = len(self.ids)
            return self._send(text[:cut])
        self.tokens_in_text = len(self.ids)
        settled = len(text) - self._held(text)
        return self._send(text[:settled])

    def finish(self) -> str:
        """The rest of the text once generation ended (held text that never became a stop)."""
        if self.stopped:
            return ""
        return self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # a re-decode changed earlier text (rare with byte-level BPE): send nothing new now
        piece, self.sent = text[len(self.sent):], text
        return piece

    def _stop_at(self, text: str) -> int | None:
        """The index where the earliest stop sequence begins in the text not yet sent (or partly sent)."""
        longest = max((len(s) for s in self.stops), default=0)
        window = max(0, len(self.sent) - longest + 1)
        found = [index for stop in self.stops if (index := text.find(stop, window)) >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """How many trailing characters to hold back: a partial character, or the start of a stop sequence."""
        held = 0
        if text.endswith(REPLACEMENT):
            held = len(text) - len(text.rstrip(REPLACEMENT))
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    held = max(held, length)
                    break
        return held
