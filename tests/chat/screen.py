"""A real terminal for tests: pexpect runs `python -m llmrun` in a pty, pyte renders the screen."""

from __future__ import annotations

import signal
import sys
import time

import pexpect
import pyte

PROMPT = ">>>"


class Terminal:
    """What a person would see: the screen (plus scrollback) of a terminal running the command."""

    def __init__(self, argv, env: dict, rows: int = 40, cols: int = 100, cwd=None):
        """Run `python ARGV` (e.g. ["-m", "llmrun", "chat"]) in a rows x cols terminal."""
        self.rows, self.cols = rows, cols
        self.screen = pyte.HistoryScreen(cols, rows, history=5000)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        # SIGINT at its default in the child, as at a person's terminal: a suite started from a
        # background job inherits SIGINT ignored (the shell's rule for `&`), and Ctrl-C would do nothing.
        self.child = pexpect.spawn(sys.executable, [str(a) for a in argv], env=env, dimensions=(rows, cols),
                                   cwd=cwd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def _pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.05)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return
            self.raw.extend(data)
            self.stream.feed(data)

    def text(self) -> str:
        """The visible screen, trailing spaces and empty lines removed."""
        return "\n".join(line.rstrip() for line in self.screen.display).rstrip()

    def all_text(self) -> str:
        """Scrollback and screen together."""
        scrolled = ["".join(line[x].data for x in range(self.cols)).rstrip() for line in self.screen.history.top]
        return "\n".join([*scrolled, self.text()])

    def wait(self, predicate, timeout: float = 120, what: str = "") -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._pump(0.1)
            if predicate(self.text()):
                return self.text()
            if not self.child.isalive() and not self.child.closed:
                self._pump(0.3)
                if predicate(self.text()):
                    return self.text()
                break
        raise AssertionError(f"timed out waiting for {what or predicate}; the screen shows:\n{self.text()}")

    def at_prompt(self) -> str:
        """Wait for the empty prompt on the last line."""
        return self.wait(lambda s: s.splitlines()[-1:] == [PROMPT], what="the prompt")

    def send_line(self, line: str) -> None:
        self.child.send(line + "\r")

    def ask(self, line: str, timeout: float = 180) -> str:
        """Type a line, wait for the next prompt; returns what appeared between the two prompts."""
        self.send_line(line)
        echoed = f"{PROMPT} {line}"

        def done(screen: str) -> bool:
            lines = screen.splitlines()
            return echoed in lines and lines[-1] == PROMPT and len(lines) - 1 > _last_index(lines, echoed)

        screen = self.wait(done, timeout, f"the reply to {line!r}").splitlines()
        return "\n".join(screen[_last_index(screen, echoed) + 1 : -1])

    def exit_status(self, timeout: float = 30) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus


def _last_index(lines: list[str], line: str) -> int:
    return len(lines) - 1 - lines[::-1].index(line)
