"""The chat input history on disk: written whole to a temporary name then renamed; leftovers dropped."""

from __future__ import annotations

import os
from pathlib import Path

from llmrun.storage import process_alive


def save_history(readline, path: Path) -> None:
    """Write readline's history to `path` atomically: a crash or Ctrl-C leaves the old file whole.

    GNU readline writes over an existing file through its own `history-<pid>.tmp`; writing to a
    fresh name of that shape ourselves and renaming it gives one pattern for leftovers to match.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_dead_temp_files(path)
    temp = path.with_name(f"{path.name}-{os.getpid()}.tmp")
    try:
        temp.unlink(missing_ok=True)  # readline must create it, not write through a temp of its own
        readline.write_history_file(str(temp))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def drop_dead_temp_files(path: Path) -> None:
    """Remove `<name>-<pid>.tmp` files beside `path` whose writing process no longer runs."""
    try:
        temps = list(path.parent.glob(f"{path.name}-*.tmp"))
    except OSError:
        return
    for temp in temps:
        pid = temp.name[len(path.name) + 1:-len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            try:
                temp.unlink()
            except OSError:
                continue
