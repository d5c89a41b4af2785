"""Per-request text streaming with stop strings.

Wraps `DetokenizeStream` (valid UTF-8 deltas) and watches for stop
strings, which may span tokens: the last (longest stop - 1) characters are
held back until the next delta shows whether they begin a stop string.
The text a client sees never includes a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardline.worker.tokenizer import DetokenizeStream, Tokenizer


@dataclass(frozen=True)
class TextDelta:
    text: str
    stop: str | None = None  # the stop string that ended the request, if any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._stream = DetokenizeStream(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._holdback_chars = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""   # decoded but not yet released
        self._stopped = False

    def push(self, token_id: int) -> TextDelta:
        if self._stopped:
            return TextDelta("")
        self._pending += self._stream.push(token_id)
        return self._release(final=False)

    def flush(self) -> TextDelta:
        """At the end of the request: everything still held back."""
        if self._stopped:
            return TextDelta("")
        self._pending += self._stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> TextDelta:
        hits = [(self._pending.find(s), s) for s in self._stop if s in self._pending]
        if hits:
            index, stop = min(hits)
            text, self._pending, self._stopped = self._pending[:index], "", True
            return TextDelta(text, stop)
        keep = 0 if final else min(self._holdback_chars, len(self._pending))
        text = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(text):]
        return TextDelta(text)
