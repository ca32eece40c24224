"""A sequence's text: incremental detokenization and stop strings.

Stop strings are cut exactly: the text ends right before the first occurrence of any of
them. While streaming, text that could still become the start of a stop string is held
back until it is ruled out, so a client never receives part of a stop string.
"""
from __future__ import annotations

from ..tokenizer import QWenTokenizer, StreamingDetokenizer


class IncrementalText:
    def __init__(self, tokenizer: QWenTokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self._detok = StreamingDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.text = ""  # decoded so far, cut at a stop string once one appeared
        self.released = 0  # characters of `text` handed out by release()
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> bool:
        """Append a generated token; True when this completed a stop string (the text is cut).
        After a stop string, the text is final: further tokens are ignored."""
        if self.stopped_by is not None:
            return True
        start = max(0, len(self.text) - self._longest + 1)  # a new match must end in the new piece
        self.text += self._detok.add(token_id)
        return self._cut_at_stop(start)

    def finish(self) -> None:
        """End of generation: decode bytes still held for an unfinished character."""
        if self.stopped_by is None:
            start = max(0, len(self.text) - self._longest + 1)
            self.text += self._detok.flush()
            self._cut_at_stop(start)

    def release(self, final: bool = False) -> str:
        """The text not handed out yet, minus (unless `final`) a tail that may start a stop string."""
        end = len(self.text) if final or self.stopped_by is not None else len(self.text) - self._held_back()
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece

    def _cut_at_stop(self, start: int) -> bool:
        if not self.stop:
            return False
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return False
        index, stop = min(found)
        self.text, self.stopped_by = self.text[:index], stop
        return True

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
