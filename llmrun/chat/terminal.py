"""The terminal side of chat: reading inputs (readline, history, prompts, pipes); Ctrl-C at the prompt."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from llmrun.chat.commands import ALIASES, COMMANDS
from llmrun.chat.multiline import InputAssembler

PROMPT = ">>> "
CONTINUATION = "... "
HISTORY_LENGTH = 1000


class InputReader:
    """Whole inputs one at a time (None at the end), from a terminal with readline or from a pipe.

    In a pipe each line is an input, with the same multi-line markers. At a terminal, Ctrl-D ends,
    Ctrl-C clears what was typed, and Ctrl-C at an empty prompt ends.
    """

    def __init__(self, interactive: bool, history_path: Optional[Path] = None):
        self.interactive = interactive
        self.history_path = history_path
        self._readline = _setup_readline(history_path) if interactive else None

    def read(self) -> Optional[str]:
        return self._read_terminal() if self.interactive else self._read_pipe()

    def _read_pipe(self) -> Optional[str]:
        assembler = InputAssembler()
        for line in sys.stdin or ():
            text = assembler.feed(line)
            if text is not None and text.strip():
                return text
        return assembler.flush()

    def _read_terminal(self) -> Optional[str]:
        assembler = InputAssembler()
        while True:
            try:
                line = self._input(CONTINUATION if assembler.pending else PROMPT)
            except EOFError:  # Ctrl-D
                _newline()
                return None
            except KeyboardInterrupt:
                typed = self._readline.get_line_buffer() if self._readline is not None else ""
                _newline()
                if typed or assembler.pending:
                    assembler.reset()
                    continue
                return None
            text = assembler.feed(line)
            if text is not None:
                self.save_history()
                return text

    def _input(self, prompt: str) -> str:
        if sys.stdout.isatty():
            return input(prompt)  # readline draws the prompt and edits the line
        sys.stderr.write(prompt)  # stdout carries replies only
        sys.stderr.flush()
        return input()

    def save_history(self) -> None:
        if self._readline is None or self.history_path is None:
            return
        from llmrun.chat.history_file import save_history

        try:
            save_history(self._readline, self.history_path)  # atomic; leftover temp files dropped
        except OSError:
            pass  # an unwritable data dir costs the history, not the chat


def _newline() -> None:
    (sys.stdout if sys.stdout.isatty() else sys.stderr).write("\n")


def _setup_readline(history_path: Optional[Path]):
    """GNU readline (or libedit) with persistent history and /command completion; None if absent."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    if history_path is not None:
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            readline.read_history_file(str(history_path))
        except OSError:
            pass
    names = sorted({f"/{name}" for name in (*COMMANDS, *ALIASES) if name.isalpha()})

    def complete(text: str, state: int) -> Optional[str]:
        matches = [n + " " for n in names if n.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    libedit = "libedit" in (readline.__doc__ or "")
    readline.parse_and_bind("bind ^I rl_complete" if libedit else "tab: complete")
    return readline
