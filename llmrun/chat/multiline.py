"""Multi-line input: a line ending in a backslash continues; a \"\"\" line opens a block until \"\"\"."""

from __future__ import annotations

from typing import Optional

FENCE = '"""'


class InputAssembler:
    """Feed it lines one at a time; it returns the whole input once the last line arrives."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._in_block = False

    @property
    def pending(self) -> bool:
        """Whether earlier lines wait for more (show a continuation prompt)."""
        return bool(self._lines) or self._in_block

    def reset(self) -> None:
        self._lines, self._in_block = [], False

    def flush(self) -> Optional[str]:
        """At the end of input: what an unfinished block or continuation holds (None if nothing)."""
        return self._finish(drop_empty_ends=self._in_block) if self.pending else None

    def feed(self, line: str) -> Optional[str]:
        """Add a line (without its newline); returns the complete input, or None for "more"."""
        line = line.rstrip("\r\n")
        if self._in_block:
            if line.rstrip().endswith(FENCE):
                self._lines.append(line.rstrip()[: -len(FENCE)])
                return self._finish(drop_empty_ends=True)
            self._lines.append(line)
            return None
        if line.lstrip().startswith(FENCE):
            rest = line.lstrip()[len(FENCE):]
            if len(rest.rstrip()) >= len(FENCE) and rest.rstrip().endswith(FENCE):  # """one line"""
                self._lines.append(rest.rstrip()[: -len(FENCE)])
                return self._finish()
            self._in_block = True
            self._lines.append(rest)
            return None
        if line.endswith("\\"):
            self._lines.append(line[:-1])
            return None
        self._lines.append(line)
        return self._finish()

    def _finish(self, drop_empty_ends: bool = False) -> str:
        lines = self._lines
        if drop_empty_ends:  # the lines holding only the fences are not part of the text
            if lines and not lines[0].strip():
                lines = lines[1:]
            if lines and not lines[-1].strip():
                lines = lines[:-1]
        self.reset()
        return "\n".join(lines)
