"""TextStream: incremental detokenization with stop strings held back and never emitted."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Text that may still change (an incomplete UTF-8 character) or that may be the start of a stop
    string is held back until it is settled.
    """

    WINDOW = 8  # tokens of context decoded again with each new token

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""            # everything emitted so far
        self._decoded = ""        # the full decode of `ids`
        # The decode of `ids` is kept as _base + (decode(ids[_start:]) minus its first
        # len(_start_text) chars), where _start_text = decode(ids[_start:_base_end]): each token
        # decodes a short window, not the whole output, yet the window's first tokens give the
        # tokenizer the context it needs (leading spaces, characters split across tokens).
        self._base, self._start, self._start_text = "", 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _update_decoded(self) -> None:
        window = self._decode(self.ids[self._start:])
        if window.startswith(self._start_text):
            self._decoded = self._base + window[len(self._start_text):]
        else:  # the tokenizer spelled the window's start differently: decode everything once
            self._decoded = self._decode(self.ids)
            self._base, self._start, self._start_text = self._decoded, len(self.ids), ""
        if len(self.ids) - self._start >= 2 * self.WINDOW and not self._decoded.endswith("\ufffd"):
            # Slide: everything so far becomes the base; the last WINDOW tokens stay as context.
            self._start = len(self.ids) - self.WINDOW
            self._base, self._start_text = self._decoded, self._decode(self.ids[self._start:])

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text to emit, whether a stop string was reached)."""
        self.ids.append(token_id)
        self._update_decoded()
        stop_at = self._find_stop(self._decoded)
        if stop_at is not None:
            return self._emit_until(stop_at), True
        return self._emit_until(len(self._decoded) - self._holdback(self._decoded)), False

    def flush(self) -> str:
        """At the end of generation: everything still held back (minus a trailing partial char)."""
        end = len(self._decoded)
        if self._decoded.endswith("\ufffd"):
            end -= 1
        return self._emit_until(end)

    def _emit_until(self, end: int) -> str:
        end = max(end, len(self.text))
        delta = self._decoded[len(self.text) : end]
        self.text += delta
        return delta

    def _find_stop(self, decoded: str):
        # Search only where a stop string could newly appear (it may straddle emitted text).
        window_start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [decoded.find(s, window_start) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _holdback(self, decoded: str) -> int:
        held = 1 if decoded.endswith("\ufffd") else 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(decoded)), 0, -1):
                if decoded.endswith(stop[:length]):
                    held = max(held, length)
                    break
        return held
