"""The chat input history: saved whole or not at all, and temporary files of dead writers removed."""

import os
import readline

import pytest

from llmrun.chat.terminal import InputReader


@pytest.fixture()
def reader(tmp_path):
    history = tmp_path / "history"
    history.write_text("old one\nold two\n")
    readline.clear_history()
    made = InputReader(interactive=True, history_path=history)  # loads the file into readline
    yield made
    readline.clear_history()


def test_history_is_saved_through_readline_without_leftovers(reader):
    readline.add_history("new three")
    reader.save_history()
    assert reader.history_path.read_text().splitlines() == ["old one", "old two", "new three"]
    assert sorted(p.name for p in reader.history_path.parent.iterdir()) == ["history"]


def test_an_interrupted_save_keeps_the_old_history(reader):
    class InterruptedReadline:
        def write_history_file(self, path):
            with open(path, "w") as handle:
                handle.write("half a li")
            raise KeyboardInterrupt

    reader._readline = InterruptedReadline()
    with pytest.raises(KeyboardInterrupt):
        reader.save_history()
    assert reader.history_path.read_text() == "old one\nold two\n"
    assert sorted(p.name for p in reader.history_path.parent.iterdir()) == ["history"]


def test_temporary_files_of_dead_writers_are_removed(reader):
    folder = reader.history_path.parent
    dead = folder / f"history-{2**22 + 4321}.tmp"  # above the default pid_max: no such process
    running = folder / f"history-{os.getppid()}.tmp"  # another chat still writing its history
    other = folder / "notes-1.tmp"
    for path in (dead, running, other):
        path.write_text("x")
    reader.save_history()
    assert not dead.exists() and running.exists() and other.exists()
