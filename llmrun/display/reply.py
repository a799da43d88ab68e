"""A reply on stdout (live Markdown on a TTY, plain text in a pipe) and the chat's own lines."""

from __future__ import annotations

import sys
from llmrun.display.progress import stderr_is_tty

class _MarkdownTail:
    """A growing text as Markdown, cut to the last lines that fit the terminal while it streams
    (a Live region taller than the screen would leave stale copies in the scrollback)."""

    def __init__(self) -> None:
        self.text = ""

    def __rich_console__(self, console, options):
        from rich.markdown import Markdown
        from rich.segment import Segment

        # No height: render_lines would pad to it, and crop the top rather than keep the tail.
        lines = console.render_lines(Markdown(self.text), options.update(height=None), pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


class ReplyView:
    """One reply (run or chat) on stdout: live Markdown on a TTY (its tail while it grows, then all of it,
    so code blocks and lists render right); plain text otherwise."""

    def __init__(self, live: bool):
        self.text = ""
        self._live = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._tail = _MarkdownTail()
            self._live = Live(self._tail, console=self._console, refresh_per_second=12, transient=True)

    def __enter__(self) -> "ReplyView":
        if self._live is not None:
            self._live.start()
        return self

    def write(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if self._live is not None:
            self._tail.text = self.text  # the Live thread re-renders it
        else:
            sys.stdout.write(delta)
            sys.stdout.flush()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.text and self._live is None:
            return  # nothing was shown: an error before the first token leaves stdout empty
        if self._live is not None:
            from rich.markdown import Markdown

            self._live.stop()
            if self.text.strip():
                self._console.print(Markdown(self.text))
        elif not self.text.endswith("\n"):  # every reply ends a line, even an empty one
            sys.stdout.write("\n")
            sys.stdout.flush()


def chat_line(message: str, style: str = "dim") -> None:
    """A line for the person at the terminal (stderr): styled on a TTY, plain otherwise."""
    if stderr_is_tty():
        from rich.console import Console

        Console(stderr=True).print(message, style=style, highlight=False, markup=False)
    else:
        print(message, file=sys.stderr, flush=True)


def chat_warning(message: str) -> None:
    chat_line(f"llmrun: {message}", style="yellow")


def chat_error(message: str) -> None:
    chat_line(f"llmrun: error: {message}", style="red")


def chat_rows(rows: list[tuple[str, str]]) -> None:
    """Two columns (name, value) on stderr, for /help, /set and /stats."""
    if not stderr_is_tty():
        width = max((len(name) for name, _ in rows), default=0)
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value}", file=sys.stderr)
        sys.stderr.flush()
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in rows:
        table.add_row(Text(name), Text(value))  # no markup: values may hold [brackets]
    Console(stderr=True).print(table, highlight=False)
