"""The process's standard streams: one error line, stdin read leniently, a closed pipe ended quietly."""

from __future__ import annotations

import sys

from llmrun.errors import LlmrunError


def fail(err: LlmrunError) -> None:
    print(f"llmrun: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def lenient_stdin() -> None:
    """stdin bytes that are not UTF-8 become U+FFFD, with one note on stderr, instead of a
    UnicodeDecodeError in the middle of a run or a chat."""
    import codecs

    noted = []

    def replace(err: UnicodeDecodeError):
        if not noted:
            noted.append(True)
            print("llmrun: note: stdin is not valid UTF-8; undecodable bytes were replaced by U+FFFD",
                  file=sys.stderr)
        return "\ufffd", err.end

    codecs.register_error("llmrun-stdin", replace)
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="llmrun-stdin")


def end_quietly() -> None:
    """The reader went away (`| head`): a normal end, status 0, without a second error at exit."""
    flush_std_streams()
    sys.exit(0)


def flush_std_streams() -> None:
    """Flush stdout and stderr; one whose reader went away is pointed at /dev/null, so what its
    buffer still holds cannot fail again at interpreter exit ("Exception ignored ...", status 120)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                stream.flush()
            except (OSError, ValueError):
                pass
        except (AttributeError, OSError, ValueError):  # no stream, or one already closed
            pass


def exit_now(code) -> None:
    """End the process with `code` (a SystemExit's: None is 0, a text is printed and means 1) once a
    command is done: the exit handlers run and the streams are flushed as at a normal exit, but the
    interpreter's teardown of every module, which takes ~0.3 s once torch is loaded, is skipped.
    Where another non-daemon thread still runs, the normal exit waits for it instead."""
    import atexit
    import os
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if any(t.is_alive() for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    flush_std_streams()
    os._exit(code)
